"""`finetune jobs ...` and `finetune worker`: the job service from a terminal."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Callable

from ..config import ConfigError
from .progress import Progress, read_progress
from .store import FINAL_STATUSES, JobError
from .workspace import LOG_STREAMS, Workspace

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FOLLOW_POLL_SECONDS = 1.0


def main(argv: list[str] | None = None) -> int:
    """Run `finetune jobs COMMAND ...`; return the exit code (2 for a bad config or usage, 1 for job errors)."""
    parser = _jobs_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    try:
        return args.handler(Workspace(args.workspace), args)
    except ConfigError as error:
        print(f"finetune jobs: {error}", file=sys.stderr)
        return 2
    except (JobError, ValueError) as error:
        print(f"finetune jobs: {error}", file=sys.stderr)
        return 1


def worker_main(argv: list[str] | None = None) -> int:
    """Run `finetune worker`: the scheduler in the foreground until SIGTERM or Ctrl-C."""
    from .scheduler import Scheduler

    parser = argparse.ArgumentParser(prog="finetune worker", description="Run the job scheduler in the foreground.")
    _add_workspace_option(parser)
    parser.add_argument(
        "--max-cpu-jobs", type=_non_negative_int, default=1, help="CPU jobs that may run at once; 0 runs none (default 1)."
    )
    parser.add_argument(
        "--poll-seconds", type=_positive_float, default=2.0, help="Seconds between scheduler passes (default 2)."
    )
    parser.add_argument(
        "--stop-timeout", type=_non_negative_float, default=600.0,
        help="Seconds a stopping job gets to checkpoint before SIGKILL (default 600).",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")
    scheduler = Scheduler(Workspace(args.workspace), max_cpu_jobs=args.max_cpu_jobs, stop_timeout=args.stop_timeout)

    def request_shutdown(signum: int, frame: object) -> None:
        logger.info("worker received signal %d; shutting down after this pass", signum)
        scheduler.shutdown(timeout=0)

    signal.signal(signal.SIGTERM, request_shutdown)
    signal.signal(signal.SIGINT, request_shutdown)
    scheduler.run_forever(args.poll_seconds)
    return 0


# -- parser ------------------------------------------------------------------------------------------------------------


def _add_workspace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace", default=None, help="Workspace folder (job store and run folders); default $FINETUNE_WORKSPACE or ./workspace."
    )


def _jobs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune jobs", description="Submit, list, watch, stop and resume training jobs.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _add_workspace_option(common)

    def add(name: str, handler: Callable, help_text: str, with_id: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        if with_id:
            sub.add_argument("job_id", metavar="ID", help="Job id, as shown by `finetune jobs list`.")
        sub.set_defaults(handler=handler)
        return sub

    submit = add("submit", _submit, "Validate a config and queue it as a job.", with_id=False)
    submit.add_argument("config", metavar="CONFIG", help="YAML config file.")
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides, e.g. training.learning_rate=3e-5.")
    _add_device_options(submit)
    add("list", _list, "Show all jobs with progress, ETA, stage and best metric.", with_id=False)
    add("show", _show, "Show one job's fields and progress.")
    logs = add("logs", _logs, "Print a job's log.")
    logs.add_argument("--follow", "-f", action="store_true", help="Keep printing new lines until the job ends.")
    logs.add_argument("--stream", choices=sorted(LOG_STREAMS), default="stderr", help="Which log (default stderr, where the run logs).")
    logs.add_argument("--lines", type=_non_negative_int, default=200, help="Lines to print from the end (default 200).")
    add("stop", _stop, "Stop a running job (it checkpoints and can be resumed); a second stop kills it.")
    add("resume", _resume, "Queue a stopped or failed job again; it continues from its last checkpoint.")
    add("cancel", _cancel, "Cancel a queued job.")
    clone = add("clone", _clone, "Queue a copy of a job's config with overrides.")
    clone.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides for the copy.")
    clone.add_argument("--name", default=None, help="Name of the new job (default: the source's name plus -clone).")
    # The source's devices may not exist on this host. A job that cannot be placed fails with a message to clone it.
    clone.add_argument("--num-processes", type=int, default=None, help="Training processes (default: the source's).")
    clone.add_argument("--gpus", type=int, default=None, help="GPUs to use, one process each; 0 runs on the CPU (default: the source's).")
    clone.add_argument("--accelerate-config", default=None, help="Name of a file in configs/accelerate or a path (default: the source's).")
    add("delete", _delete, "Delete a job that is not running, with its run folder.")
    return parser


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}; give a whole number of at least 0.") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give a whole number of at least 0.")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0; give a number of seconds above 0, e.g. 2.")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give a number of seconds of at least 0.")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}; give a number of seconds, e.g. 2.") from None


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=None, help="Job name (default: the config's name or file name).")
    parser.add_argument("--num-processes", type=int, default=None, help="Training processes (default: --gpus, else 1).")
    parser.add_argument(
        "--gpus", type=int, default=None,
        help="GPUs to use, one process each; 0 runs on the CPU; default: --num-processes GPUs if the host has GPUs.",
    )
    parser.add_argument(
        "--accelerate-config", default=None, help="Name of a file in configs/accelerate (e.g. fsdp) or a path to one."
    )


# -- handlers -----------------------------------------------------------------------------------------------------------


def _submit(workspace: Workspace, args: argparse.Namespace) -> int:
    job = workspace.submit(
        args.config, args.overrides, name=args.name, num_processes=args.num_processes, gpus=args.gpus,
        accelerate_config=args.accelerate_config,
    )
    print(f"queued job {job.id} ({job.name}); run folder {job.run_dir}")
    return 0


def _list(workspace: Workspace, args: argparse.Namespace) -> int:
    rows = [("ID", "NAME", "STATUS", "PROGRESS", "ETA", "STAGE", "BEST")]
    for job in workspace.list_jobs():
        progress = read_progress(job)
        rows.append((
            str(job.id), job.name, job.status.value, _format_progress(progress), _format_duration(progress.eta_seconds),
            progress.stage or "-", _format_best(progress),
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _show(workspace: Workspace, args: argparse.Namespace) -> int:
    job = workspace.get(args.job_id)
    progress = read_progress(job)
    fields = [
        ("id", job.id), ("name", job.name), ("status", job.status.value), ("run folder", job.run_dir),
        # Relative paths in the config start here, so a "file not found" reason can be checked against it.
        ("working directory", job.workdir or "-"),
        ("created", _format_time(job.created_at)), ("started", _format_time(job.started_at)),
        ("finished", _format_time(job.finished_at)), ("attempts", job.attempt),
        ("processes", job.num_processes), ("requested GPUs", "auto" if job.requested_gpus is None else job.requested_gpus),
        ("devices", ",".join(job.assigned_devices) or "-"), ("accelerate config", job.accelerate_config or "-"),
        ("pid", job.pid or "-"), ("exit code", "-" if job.exit_code is None else job.exit_code),
        ("failure reason", job.failure_reason or "-"), ("progress", _format_progress(progress)),
        ("epoch", f"{progress.epoch:.2f}"), ("stage", progress.stage or "-"), ("ETA", _format_duration(progress.eta_seconds)),
        ("best", _format_best(progress)), ("train", _format_metrics(progress.train_metrics)),
        ("validation", _format_metrics(progress.validation_metrics)),
    ]
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        print(f"{label:<{width}}  {value}")
    # The scheduler passes output.run_dir=<run folder> to every attempt, so a run_dir in the config is not used.
    print("\nconfig (as submitted; the job writes to the run folder above, whatever output.run_dir says):")
    print(job.config.rstrip())
    return 0


def _logs(workspace: Workspace, args: argparse.Namespace) -> int:
    job = workspace.get(args.job_id)
    path = workspace.log_path(job.id, args.stream)
    text = workspace.tail_log(job.id, args.stream, args.lines)
    if text:
        print(text, flush=True)
    if not args.follow:
        return 0
    offset = path.stat().st_size if path.exists() else 0
    try:
        while True:
            offset = _print_new_bytes(path, offset)
            if workspace.get(job.id).status in FINAL_STATUSES:
                _print_new_bytes(path, offset)
                return 0
            time.sleep(FOLLOW_POLL_SECONDS)
    except KeyboardInterrupt:
        return 130


def _print_new_bytes(path, offset: int) -> int:
    if not path.exists():
        return offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    if data:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    return offset + len(data)


def _stop(workspace: Workspace, args: argparse.Namespace) -> int:
    job = workspace.stop(args.job_id)
    print(f"job {job.id} is {job.status.value}")
    return 0


def _resume(workspace: Workspace, args: argparse.Namespace) -> int:
    job = workspace.resume(args.job_id)
    print(f"job {job.id} is queued again; it resumes from its last checkpoint")
    return 0


def _cancel(workspace: Workspace, args: argparse.Namespace) -> int:
    job = workspace.cancel(args.job_id)
    print(f"job {job.id} is cancelled")
    return 0


def _clone(workspace: Workspace, args: argparse.Namespace) -> int:
    devices = {
        key: value for key, value in (
            ("num_processes", args.num_processes), ("gpus", args.gpus), ("accelerate_config", args.accelerate_config),
        ) if value is not None
    }
    if "gpus" in devices and "num_processes" not in devices:
        # A new GPU count without a process count would keep the source's processes and fail the match check.
        devices["num_processes"] = None
    job = workspace.clone(args.job_id, args.overrides, name=args.name, **devices)
    print(f"queued job {job.id} ({job.name}), a clone of job {args.job_id}; run folder {job.run_dir}")
    return 0


def _delete(workspace: Workspace, args: argparse.Namespace) -> int:
    job = workspace.delete(args.job_id)
    print(f"deleted job {job.id} and {job.run_dir}")
    return 0


# -- formatting ---------------------------------------------------------------------------------------------------------


def _format_progress(progress: Progress) -> str:
    if not progress.total_steps:
        return "-" if progress.step == 0 else f"step {progress.step}"
    return f"{progress.step}/{progress.total_steps} ({progress.fraction:.0%})"


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_best(progress: Progress) -> str:
    if progress.best_value is None:
        return "-"
    return f"{progress.best_metric}={progress.best_value:.4g}"


def _format_metrics(metrics: dict) -> str:
    formatted = [f"{key}={value:.4g}" for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return ", ".join(formatted) or "-"


def _format_time(timestamp: float | None) -> str:
    return "-" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
