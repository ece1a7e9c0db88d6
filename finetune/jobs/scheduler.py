"""The scheduler: starts queued jobs where devices are free, watches running ones and records how they end.

Jobs run as `python -m finetune.jobs.runner -- accelerate launch ... -m finetune.train ...` in sessions of
their own, so they outlive the scheduler. A scheduler that starts later re-attaches to live jobs (matching pid
and process creation time) and records the outcome of jobs that ended while no scheduler watched.
Several schedulers may share one workspace: claiming a queued job and counting busy devices happen in one
transaction.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import finetune

from . import processes
from .placement import Placement, PlacementError, detect_gpus, device_environment, gpus_needed, place, train_command
from .store import ACTIVE_STATUSES, EXIT_FILE, JOB_CONFIG_FILE, STDERR_FILE, STDOUT_FILE, Job, JobStatus
from .workspace import Workspace, finish_attempt

logger = logging.getLogger(__name__)

# A claimed job gets its pid within a second. A job still without one after this long lost its scheduler
# between the claim and the start.
LAUNCH_GRACE_SECONDS = 60.0
DEFAULT_STOP_TIMEOUT_SECONDS = 600.0


@dataclass
class _Child:
    popen: subprocess.Popen
    token: str


class Scheduler:
    """Runs a workspace's queued jobs in queue order, as many at once as the devices allow.

    `max_cpu_jobs` bounds CPU jobs running at once (GPU jobs are bounded by their GPUs). `gpu_count` fakes
    the number of GPUs (else `FINETUNE_GPU_COUNT` or torch's count). A job still `stopping` after
    `stop_timeout` seconds is killed. `train_module` is the module `accelerate launch -m` runs.
    """

    def __init__(
        self, workspace: Workspace | str | os.PathLike | None = None, max_cpu_jobs: int = 1,
        gpu_count: int | None = None, stop_timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS,
        train_module: str = "finetune.train",
    ):
        if max_cpu_jobs < 0:
            raise ValueError(f"max_cpu_jobs={max_cpu_jobs} is invalid; give 0 (no CPU jobs) or more.")
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.store = self.workspace.store
        self.max_cpu_jobs = max_cpu_jobs
        self.gpus = detect_gpus(gpu_count)
        self.stop_timeout = stop_timeout
        self.train_module = train_module
        self._children: dict[int, _Child] = {}
        self._attached: set[str] = set()  # Tokens of attempts this scheduler watches.
        self._stopping: set[str] = set()  # Tokens of attempts whose stop request was logged.
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # tick() from run_forever and from a test or the app never overlap.

    # -- loop ------------------------------------------------------------------------------------------------------

    def tick(self) -> list[Job]:
        """Record ended jobs, enforce stop timeouts, then start queued jobs; return the jobs started."""
        with self._lock:
            self._watch_active()
            return self._start_queued()

    def run_forever(self, poll_seconds: float = 2.0) -> None:
        """Call `tick()` every `poll_seconds` until `shutdown()`; errors are logged and the loop goes on."""
        logger.info(
            "scheduler started on %s: GPUs %s, at most %d CPU job(s) at once",
            self.workspace.path, ",".join(self.gpus) or "none", self.max_cpu_jobs,
        )
        while not self._stop_event.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("scheduler tick failed on %s; retrying in %.1f s", self.workspace.path, poll_seconds)
            self._stop_event.wait(poll_seconds)
        logger.info("scheduler stopped; running jobs keep running and the next scheduler re-attaches them")

    def start_in_thread(self, poll_seconds: float = 2.0) -> threading.Thread:
        """Run the loop in a daemon thread (for the web app); `shutdown()` ends it."""
        if self._thread is not None and self._thread.is_alive():
            return self._thread
        self._stop_event.clear()
        self._thread = threading.Thread(
            target=self.run_forever, args=(poll_seconds,), name="finetune-scheduler", daemon=True
        )
        self._thread.start()
        return self._thread

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """End the loop (jobs keep running in their own sessions) and wait for the thread, if any."""
        self._stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- watching --------------------------------------------------------------------------------------------------

    def _watch_active(self) -> None:
        now = time.time()
        for job in self.store.list(ACTIVE_STATUSES):
            if job.pid is None:
                if job.started_at is not None and now - job.started_at > LAUNCH_GRACE_SECONDS:
                    finish_attempt(self.store, job, "the scheduler stopped between claiming the job and starting it")
                continue
            process = self._live_process(job)
            if process is None:
                self._record_end(job)
                continue
            if job.token not in self._attached:
                self._attached.add(job.token)
                if job.id not in self._children:
                    logger.info("re-attached job %d (pid %d, attempt %d)", job.id, job.pid, job.attempt)
            if job.status == JobStatus.STOPPING and job.token not in self._stopping:
                self._stopping.add(job.token)
                logger.info("job %d is stopping (SIGTERM sent); it is killed if still running after %.0f s", job.id, self.stop_timeout)
            self._enforce_stop_timeout(job, process, now)

    def _live_process(self, job: Job):
        child = self._children.get(job.id)
        if child is not None and child.token == job.token and child.popen.poll() is not None:
            return None  # Our own child has exited (poll() also reaps it, so no zombie is left).
        return processes.find_process(job.pid, job.pid_create_time)

    def _record_end(self, job: Job) -> None:
        self._children.pop(job.id, None)
        self._attached.discard(job.token or "")
        self._stopping.discard(job.token or "")
        finished = finish_attempt(self.store, job)
        if finished is None:
            return
        detail = f": {finished.failure_reason}" if finished.failure_reason else ""
        # A process killed by a signal, or one that ended while no scheduler watched it, leaves no exit code.
        ending = "ended without an exit code" if finished.exit_code is None else f"exited with code {finished.exit_code}"
        log = logger.info if finished.status in (JobStatus.COMPLETED, JobStatus.STOPPED) else logger.warning
        log("job %d %s, now %s%s", job.id, ending, finished.status.value, detail)

    def _enforce_stop_timeout(self, job: Job, process, now: float) -> None:
        if job.status != JobStatus.STOPPING or job.stop_requested_at is None:
            return
        if now - job.stop_requested_at <= self.stop_timeout:
            return
        killed = processes.kill_tree(process, job.token)
        logger.warning("job %d did not stop within %.0f s of SIGTERM; killed pids %s", job.id, self.stop_timeout, killed)
        self._record_end(self.store.get(job.id))

    # -- starting --------------------------------------------------------------------------------------------------

    def _start_queued(self) -> list[Job]:
        started = []
        for job, placement in self.claim_queued():
            try:
                started.append(self._launch(job, placement))
            except OSError as error:
                logger.error("job %d failed to start: %s", job.id, error)
                finish_attempt(self.store, job, f"failed to start: {error}")
        return started

    def claim_queued(self) -> list[tuple[Job, Placement]]:
        """Mark the queued jobs that fit now as running, with their devices, in one transaction.

        `tick()` calls this and then starts each claimed job. Called alone, it only plans, which lets tests
        check placement on a faked GPU count.
        """
        claimed = []
        with self.store.transaction() as tx:
            active = self.store.jobs_in(tx, ACTIVE_STATUSES)
            busy_gpus = {device for job in active if job.uses_gpus for device in job.assigned_devices}
            cpu_jobs = sum(1 for job in active if not job.uses_gpus)
            waiting_pools: set[str] = set()
            for job in self.store.jobs_in(tx, (JobStatus.QUEUED,)):
                pool = "gpu" if gpus_needed(job.requested_gpus, job.num_processes, len(self.gpus)) else "cpu"
                if pool in waiting_pools:
                    continue  # Queue order within a pool: a later job never overtakes one that waits.
                try:
                    placement = place(job.requested_gpus, job.num_processes, self.gpus, busy_gpus, cpu_jobs, self.max_cpu_jobs)
                except PlacementError as error:
                    self.store.update_in(tx, job.id, status=JobStatus.FAILED, failure_reason=str(error), finished_at=time.time())
                    logger.error("job %d cannot run on this host: %s", job.id, error)
                    continue
                if placement is None:
                    waiting_pools.add(pool)
                    continue
                job = self.store.update_in(
                    tx, job.id, expected=(JobStatus.QUEUED,), status=JobStatus.RUNNING, started_at=time.time(),
                    assigned_devices=list(placement.devices), attempt=job.attempt + 1,
                    token=f"{job.id}-{uuid.uuid4().hex[:16]}", pid=None, pid_create_time=None,
                    exit_code=None, failure_reason=None, stop_requested_at=None, finished_at=None,
                )
                claimed.append((job, placement))
                busy_gpus.update(device for device in placement.devices if not placement.on_cpu)
                cpu_jobs += 1 if placement.on_cpu else 0
        return claimed

    def _launch(self, job: Job, placement: Placement) -> Job:
        run_dir = job.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / JOB_CONFIG_FILE).write_text(job.config, encoding="utf-8")
        (run_dir / EXIT_FILE).unlink(missing_ok=True)
        # Later attempts continue from the newest complete checkpoint, even when the config sets checkpoint.resume.
        overrides = ["checkpoint.resume=auto"] if job.attempt > 1 else []
        command = [
            sys.executable, "-m", "finetune.jobs.runner", "--run-dir", str(run_dir), "--token", job.token, "--",
            *train_command(run_dir, placement, job.accelerate_config, overrides, self.train_module),
        ]
        with open(run_dir / STDOUT_FILE, "ab") as stdout, open(run_dir / STDERR_FILE, "ab") as stderr:
            popen = subprocess.Popen(
                command, cwd=job.workdir or run_dir, env=self._environment(job, placement), stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=stderr, start_new_session=True,
            )
        self._children[job.id] = _Child(popen, job.token)
        self._attached.add(job.token)
        job = self.store.update(job.id, pid=popen.pid, pid_create_time=processes.create_time(popen.pid))
        logger.info(
            "started job %d (%s), attempt %d, on %s with %d process(es): pid %d, run folder %s",
            job.id, job.name, job.attempt, ",".join(placement.devices), placement.num_processes, popen.pid, run_dir,
        )
        process = processes.find_process(job.pid, job.pid_create_time)
        if job.status == JobStatus.STOPPING and process is not None:  # stop() came before the process existed.
            processes.send_terminate(process)
        return job

    def _environment(self, job: Job, placement: Placement) -> dict[str, str]:
        env = dict(os.environ)
        env.update(device_environment(placement))
        env[processes.TOKEN_ENV] = job.token
        env["PYTHONUNBUFFERED"] = "1"  # Logs reach stdout.log/stderr.log as they happen.
        # The job must import this same finetune package, even when it is not installed (a source checkout).
        package_root = str(Path(finetune.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        return env
