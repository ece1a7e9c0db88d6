"""The job store: one SQLite file in the workspace, shared by the app, the CLI and schedulers.

Every status change is one `BEGIN IMMEDIATE` transaction, so several processes and threads can write at once.
SQLite takes the write lock at the start of the transaction, and a second writer waits up to the busy timeout
instead of failing half-way. WAL mode lets readers (the app's job table) read while a writer holds the lock.
Each call opens its own connection, so a `JobStore` may be shared between threads.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

DB_FILE = "jobs.sqlite"
RUNS_DIR = "runs"
# Files the job service adds to a run folder, next to those of `finetune.runlog`.
JOB_CONFIG_FILE = "job_config.yaml"
STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
EXIT_FILE = "exit_code.json"  # Written by finetune.jobs.runner when an attempt ends.
SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 60.0


class JobStatus(str, enum.Enum):
    """Lifecycle of a job. `stopping` means SIGTERM was sent and the run is writing its checkpoint."""

    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


ACTIVE_STATUSES = (JobStatus.RUNNING, JobStatus.STOPPING)
FINAL_STATUSES = (JobStatus.STOPPED, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
RESUMABLE_STATUSES = (JobStatus.STOPPED, JobStatus.FAILED)

# Allowed status changes; anything else raises InvalidTransition.
TRANSITIONS: dict[JobStatus, tuple[JobStatus, ...]] = {
    JobStatus.QUEUED: (JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED),
    JobStatus.RUNNING: (JobStatus.STOPPING, JobStatus.STOPPED, JobStatus.COMPLETED, JobStatus.FAILED),
    JobStatus.STOPPING: (JobStatus.STOPPED, JobStatus.COMPLETED, JobStatus.FAILED),
    JobStatus.STOPPED: (JobStatus.QUEUED,),
    JobStatus.FAILED: (JobStatus.QUEUED,),
    JobStatus.COMPLETED: (),
    JobStatus.CANCELLED: (),
}


class JobError(Exception):
    """Base class of job service errors; the message names the job and what to do."""


class JobNotFound(JobError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message.
        return str(self.args[0])


class InvalidTransition(JobError, ValueError):
    """Raised when an action does not apply to a job in its current status (e.g. cancelling a running job)."""


@dataclass
class Job:
    """One row of the job store.

    `config` is the YAML text with the submit-time overrides applied; the run folder gets it as
    `job_config.yaml`. `requested_gpus` is None for "GPUs if the host has any"; `assigned_devices` is
    `["cpu"]` or GPU ids as given to `CUDA_VISIBLE_DEVICES`. `pid` and `pid_create_time` identify the job's
    runner process (`finetune.jobs.runner`); both must match for the process to count as the job's.
    Times are Unix seconds.
    """

    id: int
    name: str
    status: JobStatus
    config: str
    run_dir: Path
    created_at: float
    updated_at: float
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    num_processes: int = 1
    requested_gpus: int | None = None
    accelerate_config: str | None = None
    assigned_devices: list[str] = field(default_factory=list)
    pid: int | None = None
    pid_create_time: float | None = None
    attempt: int = 0
    token: str | None = None
    exit_code: int | None = None
    failure_reason: str | None = None
    stop_requested_at: float | None = None
    workdir: str | None = None
    source: str | None = None

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def is_resumable(self) -> bool:
        return self.status in RESUMABLE_STATUSES

    @property
    def uses_gpus(self) -> bool:
        return bool(self.assigned_devices) and self.assigned_devices != ["cpu"]


_COLUMNS = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    queued_at REAL,
    started_at REAL,
    finished_at REAL,
    num_processes INTEGER NOT NULL DEFAULT 1,
    requested_gpus INTEGER,
    accelerate_config TEXT,
    assigned_devices TEXT NOT NULL DEFAULT '[]',
    pid INTEGER,
    pid_create_time REAL,
    attempt INTEGER NOT NULL DEFAULT 0,
    token TEXT,
    exit_code INTEGER,
    failure_reason TEXT,
    stop_requested_at REAL,
    workdir TEXT,
    source TEXT
"""

_JOB_FIELDS = [line.split()[0] for line in _COLUMNS.strip().splitlines()]


class JobStore:
    """SQLite-backed job table of one workspace; every method is one short transaction."""

    def __init__(self, db_path: str | os.PathLike, runs_dir: str | os.PathLike):
        self.db_path = Path(db_path)
        self.runs_dir = Path(runs_dir)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._create_schema()

    # -- connections -------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves instead of Python's deferred BEGIN.
        connection = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Yield a connection inside `BEGIN IMMEDIATE`; commit on success, roll back on any exception."""
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        finally:
            connection.close()

    def _create_schema(self) -> None:
        connection = self._connect()
        try:
            # WAL is a property of the database file; setting it again is a no-op.
            connection.execute("PRAGMA journal_mode = WAL")
            with self.transaction() as tx:
                tx.execute(f"CREATE TABLE IF NOT EXISTS jobs ({_COLUMNS})")
                tx.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, queued_at, id)")
                tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            connection.close()

    # -- rows ----------------------------------------------------------------------------------------------------

    def run_dir(self, job_id: int) -> Path:
        return self.runs_dir / str(job_id)

    def _to_job(self, row: sqlite3.Row) -> Job:
        values = {name: row[name] for name in _JOB_FIELDS}
        values["status"] = JobStatus(values["status"])
        values["assigned_devices"] = json.loads(values["assigned_devices"] or "[]")
        return Job(run_dir=self.run_dir(values["id"]), **values)

    def insert(self, **values: Any) -> Job:
        """Insert a queued job and return it with its new id (ids are never reused, even after delete)."""
        now = time.time()
        values = {"status": JobStatus.QUEUED.value, "created_at": now, "updated_at": now, "queued_at": now, **values}
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self.transaction() as tx:
            cursor = tx.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", list(values.values()))
            row = tx.execute("SELECT * FROM jobs WHERE id = ?", (cursor.lastrowid,)).fetchone()
        return self._to_job(row)

    def get(self, job_id: int | str) -> Job:
        job_id = parse_job_id(job_id)
        connection = self._connect()
        try:
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        finally:
            connection.close()
        if row is None:
            raise JobNotFound(f"job {job_id} not found in {self.db_path}; run `finetune jobs list` to see the ids.")
        return self._to_job(row)

    def list(self, statuses: tuple[JobStatus, ...] | None = None) -> list[Job]:
        """Return jobs in id order, optionally only those with one of `statuses`."""
        query, params = "SELECT * FROM jobs", []
        if statuses:
            query += f" WHERE status IN ({', '.join('?' for _ in statuses)})"
            params = [JobStatus(status).value for status in statuses]
        connection = self._connect()
        try:
            rows = connection.execute(query + " ORDER BY id", params).fetchall()
        finally:
            connection.close()
        return [self._to_job(row) for row in rows]

    def update(self, job_id: int, expected: tuple[JobStatus, ...] | None = None, **values: Any) -> Job:
        """Set columns of one job in one transaction and return the updated job.

        With `expected`, the job must currently have one of those statuses. A new `status` must be a legal
        transition from the current one. Either violation raises `InvalidTransition`.
        """
        with self.transaction() as tx:
            return self.update_in(tx, job_id, expected, **values)

    def update_in(self, tx: sqlite3.Connection, job_id: int, expected: tuple[JobStatus, ...] | None = None, **values: Any) -> Job:
        """Like `update`, inside a transaction the caller holds (to read and write under one lock)."""
        row = tx.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id} not found in {self.db_path}; run `finetune jobs list` to see the ids.")
        current = JobStatus(row["status"])
        if expected is not None and current not in expected:
            expected_text = " or ".join(status.value for status in expected)
            raise InvalidTransition(f"job {job_id} is {current.value}, but this needs it {expected_text}.")
        if "status" in values:
            new = JobStatus(values["status"])
            if new != current and new not in TRANSITIONS[current]:
                raise InvalidTransition(f"job {job_id} cannot go from {current.value} to {new.value}.")
            values["status"] = new.value
        if "assigned_devices" in values:
            values["assigned_devices"] = json.dumps(list(values["assigned_devices"]))
        values["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in values)
        tx.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values.values(), job_id])
        return self._to_job(tx.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def jobs_in(self, tx: sqlite3.Connection, statuses: tuple[JobStatus, ...]) -> list[Job]:
        """Return the jobs with one of `statuses`, oldest queue entry first, inside the caller's transaction."""
        marks = ", ".join("?" for _ in statuses)
        rows = tx.execute(
            f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY queued_at, id", [s.value for s in statuses]
        ).fetchall()
        return [self._to_job(row) for row in rows]

    def delete_row(self, job_id: int, allowed: tuple[JobStatus, ...]) -> Job:
        with self.transaction() as tx:
            job = self.update_in(tx, job_id, expected=allowed)
            tx.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job


def parse_job_id(job_id: int | str) -> int:
    """Accept a job id as an int or as text (from the CLI or a form), with a clear error for anything else."""
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        return job_id
    text = str(job_id).strip()
    if not text.isdigit():
        raise JobNotFound(f"invalid job id {job_id!r}: ids are positive whole numbers, as shown by `finetune jobs list`.")
    return int(text)


def write_exit_file(run_dir: Path, token: str, exit_code: int, status: str, launcher_returncode: int) -> None:
    """Write `exit_code.json` atomically (a reader never sees half a file)."""
    record = {
        "token": token, "exit_code": exit_code, "status": status,
        "launcher_returncode": launcher_returncode, "time": time.time(),
    }
    path = run_dir / EXIT_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_exit_file(run_dir: Path, token: str | None) -> dict | None:
    """Return the recorded outcome of the attempt with this token, or None when it wrote none."""
    path = Path(run_dir) / EXIT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if record.get("token") == token else None
