"""The process that runs one job attempt: `python -m finetune.jobs.runner --run-dir DIR -- COMMAND...`.

The scheduler starts this runner in a new session, so it outlives the scheduler. The runner starts COMMAND
(`accelerate launch ... -m finetune.train ...`), waits for it and writes the attempt's outcome to `exit_code.json`
in the run folder, because a restarted scheduler cannot `wait()` for a process that is not its child.

Why not signal `accelerate launch` directly: on SIGTERM the launcher in accelerate 1.16 exits at once and kills
its child after 5 seconds, which can cut a checkpoint short. The runner therefore starts the launcher in a
process group of its own, and forwards SIGTERM only to the launcher's direct children (the training processes),
which checkpoint and exit with code 75. The launcher then notices them exit and returns by itself.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .. import runlog
from .store import write_exit_file

logger = logging.getLogger("finetune.jobs.runner")

# The format of finetune.log, which this process does not import: it would load torch for nothing.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# run_end statuses of metrics.jsonl mapped to the exit codes of runlog.
_STATUS_EXIT_CODES = {
    "completed": runlog.EXIT_COMPLETED,
    "early_stopped": runlog.EXIT_COMPLETED,
    "stopped": runlog.EXIT_STOPPED,
    "failed": runlog.EXIT_FAILED,
}
_PR_SET_CHILD_SUBREAPER = 36  # From <linux/prctl.h>.


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")
    started = time.time()
    _become_subreaper()
    launcher = subprocess.Popen(args.command, process_group=0)
    logger.info("runner %d started launcher %d: %s", os.getpid(), launcher.pid, " ".join(args.command))
    forwarder = _SignalForwarder(launcher.pid)
    signal.signal(signal.SIGTERM, forwarder.request)
    returncode = _wait_all(launcher, forwarder)
    exit_code, status = attempt_outcome(Path(args.run_dir), started, returncode)
    write_exit_file(Path(args.run_dir), args.token, exit_code, status, returncode)
    logger.info("runner %d finished: launcher exit %s, job exit %d (%s)", os.getpid(), returncode, exit_code, status)
    return exit_code


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.jobs.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="Run folder that receives exit_code.json.")
    parser.add_argument("--token", default=os.environ.get("FINETUNE_JOB_TOKEN", ""), help="Attempt token to record.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command to run, after `--`.")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("missing the command to run after `--`")
    return args


def _become_subreaper() -> None:
    # Orphaned descendants (a launcher killed before its workers) are re-parented to us instead of init, so
    # `_wait_all` returns only when every process of the attempt has exited. Linux only; elsewhere the
    # runner waits for the launcher alone.
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_CHILD_SUBREAPER) failed with errno %d; orphaned workers are not awaited.", ctypes.get_errno())


class _SignalForwarder:
    """Forwards SIGTERM to the launcher's direct children, including ones started after the signal came."""

    def __init__(self, launcher_pid: int):
        self.launcher_pid = launcher_pid
        self.signum: int | None = None
        self.signalled: set[int] = set()

    def request(self, signum: int, frame: object = None) -> None:
        logger.info("runner %d received signal %d; forwarding it to the training processes", os.getpid(), signum)
        self.signum = signum
        self.signalled.clear()  # A second SIGTERM is forwarded again (the training may then exit at once).
        self.forward()

    def forward(self) -> None:
        if self.signum is None:
            return
        try:
            children = psutil.Process(self.launcher_pid).children()
        except psutil.NoSuchProcess:
            return
        for child in children:
            if child.pid in self.signalled:
                continue
            try:
                child.send_signal(self.signum)
                self.signalled.add(child.pid)
            except psutil.NoSuchProcess:
                continue


def _wait_all(launcher: subprocess.Popen, forwarder: _SignalForwarder, poll_seconds: float = 0.2) -> int:
    """Wait for the launcher and then for every re-parented descendant; return the launcher's return code."""
    returncode = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break  # No children left.
        if pid == 0:
            forwarder.forward()
            time.sleep(poll_seconds)
            continue
        if pid == launcher.pid:
            returncode = os.waitstatus_to_exitcode(status)
            launcher.returncode = returncode
    return returncode if returncode is not None else runlog.EXIT_FAILED


def attempt_outcome(run_dir: Path, started: float, returncode: int) -> tuple[int, str]:
    """Return the attempt's exit code and status, preferring the run's own `run_end` event.

    The launcher's return code is not enough: `accelerate launch` turns every non-zero exit of the training
    process (75 for stopped, 2 for a config error) into 1. The `run_end` event written during this attempt
    states the real outcome.
    """
    for event in reversed(runlog.read_events(run_dir)):
        if event.get("time", 0) < started:
            break
        if event.get("event") == "run_end" and event.get("status") in _STATUS_EXIT_CODES:
            return _STATUS_EXIT_CODES[event["status"]], event["status"]
    if returncode == runlog.EXIT_COMPLETED:
        return runlog.EXIT_COMPLETED, "completed"
    if returncode == runlog.EXIT_STOPPED:
        return runlog.EXIT_STOPPED, "stopped"
    return (returncode if returncode > 0 else runlog.EXIT_FAILED), "failed"


if __name__ == "__main__":
    sys.exit(main())
