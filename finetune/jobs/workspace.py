"""The workspace: a job store plus one run folder per job, and the actions people take on jobs.

The web app and the `finetune jobs` CLI both call these methods; a `Scheduler` (in the app or in
`finetune worker`) starts the queued jobs. Actions validate the job's status inside one transaction, so two
people pressing stop and resume at the same moment cannot both win.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from .. import runlog
from ..config import ConfigError, ConfigIssue, apply_overrides, validate_config
from . import processes
from .placement import resolve_accelerate_config
from .progress import Progress, read_progress
from .store import (
    ACTIVE_STATUSES, DB_FILE, read_exit_file, JOB_CONFIG_FILE, RESUMABLE_STATUSES, RUNS_DIR, STDERR_FILE, STDOUT_FILE,
    InvalidTransition, Job, JobStatus, JobStore, parse_job_id,
)

logger = logging.getLogger(__name__)

WORKSPACE_ENV = "FINETUNE_WORKSPACE"
LOG_STREAMS = {"stderr": STDERR_FILE, "stdout": STDOUT_FILE, "train": "train.log"}
_SAME = object()  # "keep the source job's value" in clone().


def default_workspace() -> Path:
    """Return `$FINETUNE_WORKSPACE`, else `./workspace`."""
    return Path(os.environ.get(WORKSPACE_ENV) or "workspace")


class Workspace:
    """A folder with `jobs.sqlite` and `runs/<job id>/`; the entry point of the job service API.

    One workspace serves one host: process ids in the store are only meaningful there.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_workspace()
        self.path = self.path.expanduser().resolve()
        self.runs_dir = self.path / RUNS_DIR
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.path / DB_FILE, self.runs_dir)

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r})"

    # -- reading -------------------------------------------------------------------------------------------------

    def get(self, job_id: int | str) -> Job:
        """Return one job; raises `JobNotFound`."""
        return self.store.get(job_id)

    def list_jobs(self, statuses: tuple[JobStatus, ...] | None = None) -> list[Job]:
        """Return all jobs (or those with one of `statuses`) in id order."""
        return self.store.list(statuses)

    def progress(self, job_id: int | str) -> Progress:
        """Return the progress of one job, read from its run folder's `metrics.jsonl`."""
        return read_progress(self.get(job_id))

    def log_path(self, job_id: int | str, stream: str = "stderr") -> Path:
        """Return the path of a job's log: `stderr` (everything the run logs), `stdout`, or `train` (train.log)."""
        if stream not in LOG_STREAMS:
            raise ValueError(f"unknown log stream {stream!r}; use one of {', '.join(LOG_STREAMS)}.")
        return self.store.run_dir(parse_job_id(job_id)) / LOG_STREAMS[stream]

    def tail_log(self, job_id: int | str, stream: str = "stderr", max_lines: int = 200) -> str:
        """Return the last `max_lines` lines of a job's log ("" before the job wrote any)."""
        return tail_text(self.log_path(job_id, stream), max_lines)

    # -- actions ---------------------------------------------------------------------------------------------------

    def submit(
        self,
        config_path_or_text: str | os.PathLike,
        overrides: list[str] | None = None,
        name: str | None = None,
        num_processes: int | None = None,
        gpus: int | None = None,
        accelerate_config: str | None = None,
        workdir: str | os.PathLike | None = None,
    ) -> Job:
        """Validate a config and queue it as a new job; return the job.

        `config_path_or_text` is a YAML file path or the YAML text itself; `overrides` are dotted `KEY=VALUE`
        strings as on the command line. The job's config is stored with the overrides applied. `gpus`: None
        uses `num_processes` GPUs when the host has GPUs and the CPU otherwise, 0 forces the CPU, N takes N
        GPUs with one process each. `accelerate_config` names a file of `configs/accelerate/` (e.g. `fsdp`) or
        gives a path. Relative paths in the config are resolved from `workdir` (default: the current folder).
        Raises `ConfigError` with every config problem, or `ValueError` for invalid placement arguments,
        before anything is queued.
        """
        text, source, stem = _read_config_source(config_path_or_text)
        raw = _parse_yaml(text, source)
        job_name = name or raw.get("name") or stem or "job"
        raw["name"] = name or raw.get("name") or job_name
        issues = apply_overrides(raw, list(overrides or []))
        validate_config(raw, source=source, extra_issues=issues)
        num_processes, gpus = _check_devices(num_processes, gpus)
        if accelerate_config:
            resolve_accelerate_config(accelerate_config)
        job = self.store.insert(
            name=str(job_name), config=yaml.safe_dump(raw, sort_keys=False), num_processes=num_processes,
            requested_gpus=gpus, accelerate_config=accelerate_config,
            workdir=str(Path(workdir or os.getcwd()).resolve()), source=source,
        )
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / JOB_CONFIG_FILE).write_text(job.config, encoding="utf-8")
        logger.info("queued job %d (%s), run folder %s", job.id, job.name, job.run_dir)
        return job

    def stop(self, job_id: int | str) -> Job:
        """Ask a running job to stop: SIGTERM, so it checkpoints and ends as `stopped` (resumable).

        Stopping a job that is already `stopping` kills it with SIGKILL; it then resumes from its last
        complete checkpoint. Raises `InvalidTransition` for a job that is not running (cancel a queued one).
        """
        job_id = parse_job_id(job_id)
        with self.store.transaction() as tx:
            job = self.store.update_in(tx, job_id)
            if job.status == JobStatus.QUEUED:
                raise InvalidTransition(f"job {job_id} is queued, not running; cancel it instead.")
            if job.status not in ACTIVE_STATUSES:
                raise InvalidTransition(f"job {job_id} is {job.status.value}; only running jobs can be stopped.")
            second_stop = job.status == JobStatus.STOPPING
            if not second_stop:
                job = self.store.update_in(tx, job_id, status=JobStatus.STOPPING, stop_requested_at=time.time())
        if second_stop:
            return self.kill(job)
        process = processes.find_process(job.pid, job.pid_create_time)
        if process is not None:
            processes.send_terminate(process)
            logger.info("sent SIGTERM to job %d (pid %d)", job_id, job.pid)
        # Without a process yet, the scheduler sends SIGTERM as soon as it has started the job.
        return job

    def kill(self, job: Job, reason: str = "killed with SIGKILL after a stop request") -> Job:
        """SIGKILL every process of a job's attempt and record the outcome at once."""
        process = processes.find_process(job.pid, job.pid_create_time)
        killed = processes.kill_tree(process, job.token)
        logger.warning("job %d: %s (pids %s)", job.id, reason, killed)
        return finish_attempt(self.store, job, default_reason=reason) or self.get(job.id)

    def resume(self, job_id: int | str) -> Job:
        """Queue a stopped or failed job again; its run continues from the last checkpoint in its run folder."""
        job = self.store.update(
            parse_job_id(job_id), expected=RESUMABLE_STATUSES, status=JobStatus.QUEUED, queued_at=time.time(),
            finished_at=None, exit_code=None, failure_reason=None, stop_requested_at=None, pid=None,
            pid_create_time=None, assigned_devices=[],
        )
        logger.info("queued job %d again to resume it (attempt %d next)", job.id, job.attempt + 1)
        return job

    def cancel(self, job_id: int | str) -> Job:
        """Cancel a queued job; it never starts. Raises `InvalidTransition` for jobs that are not queued."""
        job = self.store.update(
            parse_job_id(job_id), expected=(JobStatus.QUEUED,), status=JobStatus.CANCELLED, finished_at=time.time()
        )
        logger.info("cancelled job %d", job.id)
        return job

    def clone(
        self, job_id: int | str, overrides: list[str] | None = None, name: str | None = None,
        num_processes: Any = _SAME, gpus: Any = _SAME, accelerate_config: Any = _SAME,
    ) -> Job:
        """Queue a new job with a job's config plus `overrides`; devices are the source's unless given."""
        source = self.get(job_id)
        raw = yaml.safe_load(source.config) or {}
        raw.pop("name", None)  # The clone's run name is its job name.
        return self.submit(
            yaml.safe_dump(raw, sort_keys=False), overrides, name=name or f"{source.name}-clone",
            num_processes=source.num_processes if num_processes is _SAME else num_processes,
            gpus=source.requested_gpus if gpus is _SAME else gpus,
            accelerate_config=source.accelerate_config if accelerate_config is _SAME else accelerate_config,
            workdir=source.workdir,
        )

    def delete(self, job_id: int | str) -> Job:
        """Delete a job that is not running, with its run folder (checkpoints and export included)."""
        allowed = tuple(status for status in JobStatus if status not in ACTIVE_STATUSES)
        try:
            job = self.store.delete_row(parse_job_id(job_id), allowed)
        except InvalidTransition:
            raise InvalidTransition(f"job {job_id} is running; stop it before deleting it.") from None
        if job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        logger.info("deleted job %d and its run folder %s", job.id, job.run_dir)
        return job


def finish_attempt(store: JobStore, job: Job, default_reason: str | None = None) -> Job | None:
    """Record the end of a job's attempt whose runner has exited; return the job, or None if already recorded.

    The outcome comes from the runner's `exit_code.json`. A killed runner writes none, so then a `run_end`
    event of this attempt decides. Without either, the job is stopped if a stop was requested, else failed.
    Leftover processes of the attempt are killed, so a resume never runs next to them.
    """
    record = read_exit_file(job.run_dir, job.token)
    if record is None and job.token:
        leftovers = processes.kill_tree(None, job.token)
        if leftovers:
            logger.warning("job %d: killed leftover processes %s of a runner that is gone", job.id, leftovers)
    status, exit_code, reason = _outcome(job, record, default_reason)
    with store.transaction() as tx:
        current = store.update_in(tx, job.id)
        if current.token != job.token or current.status not in ACTIVE_STATUSES:
            return None  # Another scheduler or a kill already recorded this attempt.
        finished = store.update_in(
            tx, job.id, status=status, exit_code=exit_code, failure_reason=reason, finished_at=time.time()
        )
    return finished


def _outcome(job: Job, record: dict | None, default_reason: str | None) -> tuple[JobStatus, int | None, str | None]:
    status, exit_code, reason = _reported_outcome(job, record, default_reason)
    if status == JobStatus.FAILED and job.stop_requested_at is not None:
        # A stop that came before the run set up its SIGTERM handler, or a kill after the stop timeout, ends
        # the run without a clean stop. A stop was requested, and resume uses the newest complete checkpoint
        # either way, so the job counts as stopped.
        return JobStatus.STOPPED, exit_code, f"stopped without a final checkpoint: {reason}"
    return status, exit_code, reason


def _reported_outcome(job: Job, record: dict | None, default_reason: str | None) -> tuple[JobStatus, int | None, str | None]:
    """Return the status, exit code and failure reason that the runner's record or the run's events give."""
    if record is not None:
        exit_code = int(record["exit_code"])
        if exit_code == runlog.EXIT_COMPLETED:
            return JobStatus.COMPLETED, exit_code, None
        if exit_code == runlog.EXIT_STOPPED:
            return JobStatus.STOPPED, exit_code, None
        return JobStatus.FAILED, exit_code, _failure_reason(job, exit_code)
    end = _last_run_end(job)
    if end is not None and end.get("status") in ("completed", "early_stopped"):
        return JobStatus.COMPLETED, runlog.EXIT_COMPLETED, None
    if end is not None and end.get("status") == "stopped":
        return JobStatus.STOPPED, runlog.EXIT_STOPPED, None
    reason = default_reason or (
        f"the job's process (pid {job.pid}) ended without recording an exit code, so it was killed "
        "(SIGKILL, out of memory, or a host restart); resume it to continue from the last checkpoint"
    )
    return JobStatus.FAILED, None, reason


def _last_run_end(job: Job) -> dict | None:
    for event in reversed(runlog.read_events(job.run_dir)):
        if job.started_at is not None and event.get("time", 0) < job.started_at:
            return None
        if event.get("event") == "run_end":
            return event
    return None


def _failure_reason(job: Job, exit_code: int) -> str:
    end = _last_run_end(job)
    if end is not None and end.get("error"):
        return str(end["error"])
    lines = _log_records(tail_text(job.run_dir / STDERR_FILE, 200))
    # The last traceback's final line names the exception; launcher noise after it is skipped.
    errors = [line for line in lines if "Error:" in line or "Exception:" in line]
    see_log = f"(see {job.run_dir / STDERR_FILE})"
    if errors:
        return f"exit code {exit_code}: {errors[-1][:500]} {see_log}"
    last_line = f"Last log line: {lines[-1][:500]}" if lines else "No output"
    if end is None:
        # `accelerate launch` turns a training process killed by a signal into exit code 1 and prints nothing,
        # so the missing run_end event is the only sign of the kill.
        return (
            f"exit code {exit_code}: the training process ended without recording a run_end event, so a signal "
            f"killed it (such as SIGKILL or the out-of-memory killer) or it crashed. Resume the job to continue from the last checkpoint. "
            f"{last_line} {see_log}"
        )
    return f"exit code {exit_code}. {last_line} {see_log}"


# A log record of finetune.log or of the runner, e.g. "02:02:19 INFO finetune.checkpoint: Saved ...".
_LOG_RECORD = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def _log_records(text: str) -> list[str]:
    """Return the non-empty lines of a job's stderr without progress bars and without the runner's records.

    tqdm redraws its bar after a carriage return and without a newline, so a log record often follows a bar
    on the same line. The record is then cut out of that line. The runner's own records are dropped because its
    final "runner ... finished" line would otherwise be the last line of every failed job.
    """
    records = []
    for line in text.splitlines():  # splitlines() also splits at the carriage returns of tqdm.
        match = _LOG_RECORD.search(line)
        if match is not None:
            line = line[match.start():]
        elif _PROGRESS_BAR.search(line):
            continue
        line = line.strip()
        if line and " finetune.jobs.runner: " not in line:
            records.append(line)
    return records


# A tqdm bar's counter and rate, e.g. "| 406/1500 [00:13<04:45,  3.83step/s".
_PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[[^\]]*(/s|s/\w+)")


def tail_text(path: Path, max_lines: int, max_bytes: int = 1 << 20) -> str:
    """Return the last `max_lines` lines of a text file, reading at most its last `max_bytes`."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return ""
    if max_lines <= 0:
        return ""  # lines[-0:] would be every line.
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-max_lines:])


def _read_config_source(config: str | os.PathLike) -> tuple[str, str | None, str | None]:
    """Return (YAML text, source path or None, file stem or None) for a path or a YAML text."""
    looks_like_path = isinstance(config, os.PathLike) or (
        "\n" not in str(config) and (str(config).endswith((".yaml", ".yml")) or Path(str(config)).is_file())
    )
    if not looks_like_path:
        return str(config), None, None
    path = Path(config).expanduser()
    if not path.is_file():
        raise ConfigError([ConfigIssue("config", str(path), "file not found.", "check the path.")])
    return path.read_text(encoding="utf-8"), str(path.resolve()), path.stem


def _parse_yaml(text: str, source: str | None) -> dict:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError([ConfigIssue("config", source or "<text>", f"is not valid YAML: {error}", "fix the YAML syntax.")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("config", type(raw).__name__, "must be a mapping of sections.", "start with `task:`.")], source)
    return raw


def _check_devices(num_processes: int | None, gpus: int | None) -> tuple[int, int | None]:
    for label, value in (("num_processes", num_processes), ("gpus", gpus)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{label}={value!r} is invalid; give a whole number of at least 0.")
    if num_processes == 0:
        raise ValueError("num_processes=0 is invalid; a job needs at least one process.")
    if gpus and num_processes is not None and num_processes != gpus:
        raise ValueError(
            f"num_processes={num_processes} does not match gpus={gpus}; a GPU job runs one process per GPU, "
            "so give only gpus, or the same number for both."
        )
    return (num_processes or gpus or 1), gpus
