"""Process identity and signals for job processes that may not be our children.

A pid alone is not an identity: after a job's process exits, the kernel can give the same pid to an unrelated
process. A job is therefore identified by its runner's pid together with the process creation time (as psutil
reports it, Unix seconds). Every process of one attempt also carries `FINETUNE_JOB_TOKEN` in its environment,
so leftovers can be found even after they were re-parented.
"""

from __future__ import annotations

import os
import signal
from typing import Iterable

import psutil

TOKEN_ENV = "FINETUNE_JOB_TOKEN"
# psutil derives the creation time from the boot time and clock ticks, so one process always reads the same
# value. The tolerance only absorbs float rounding in the store.
CREATE_TIME_TOLERANCE_SECONDS = 0.01


def create_time(pid: int) -> float:
    """Return the creation time of a live process (Unix seconds)."""
    return psutil.Process(pid).create_time()


def find_process(pid: int | None, expected_create_time: float | None) -> psutil.Process | None:
    """Return the process with this pid if it is alive, not a zombie, and was created at the expected time."""
    if pid is None or expected_create_time is None:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - expected_create_time) > CREATE_TIME_TOLERANCE_SECONDS:
            return None  # A different process now has this pid.
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def processes_with_token(token: str) -> list[psutil.Process]:
    """Return live processes whose environment has `FINETUNE_JOB_TOKEN=token` (this user's processes only)."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.environ().get(TOKEN_ENV) == token and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def send_terminate(process: psutil.Process) -> None:
    """Send SIGTERM to the runner's process group; the runner forwards it to the training processes."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def kill_tree(process: psutil.Process | None, token: str | None) -> list[int]:
    """SIGKILL the runner, all its descendants and every process carrying the attempt's token; return the pids.

    Descendants are listed before anything is killed, because a killed parent's children are re-parented
    and no longer show up under it. Training workers started by torchrun live in sessions of their own, so
    killing the runner's process group alone would miss them.
    """
    targets: dict[int, psutil.Process] = {}
    if process is not None:
        try:
            targets[process.pid] = process
            targets.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    if token:
        targets.update({found.pid: found for found in processes_with_token(token)})
    targets.pop(os.getpid(), None)
    _kill_all(targets.values())
    return sorted(targets)


def _kill_all(processes: Iterable[psutil.Process]) -> None:
    processes = list(processes)
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(processes, timeout=10)
