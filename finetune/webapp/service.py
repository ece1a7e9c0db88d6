"""The app's only door to training: the job service in `finetune.jobs` and the run folders it creates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import RunConfig
from ..log import get_logger
from .settings import AppSettings

logger = get_logger(__name__)


@dataclass(frozen=True)
class JobView:
    """One job as the app shows it: store fields plus progress read from its run folder."""

    id: str
    name: str
    status: str
    run_dir: Path
    created_at: float
    step: int
    total_steps: int | None
    epoch: float | None
    stage: str
    eta_seconds: float | None
    best: float | None
    metric: str
    failure_reason: str

    @property
    def progress_text(self) -> str:
        if not self.total_steps:
            return ""
        return f"{self.step}/{self.total_steps} ({100 * self.step / self.total_steps:.0f}%)"

    @property
    def eta_text(self) -> str:
        if self.eta_seconds is None or self.status != "running":
            return ""
        minutes, seconds = divmod(int(self.eta_seconds), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{seconds:02d}"

    @property
    def label(self) -> str:
        return f"{self.id} · {self.name} ({self.status})"


def export_zip_path(settings: AppSettings, job_id: str) -> Path:
    """Return where the Jobs tab writes the download zip of a job's export."""
    return settings.download_dir / f"job-{job_id}-export.zip"


class JobService:
    """Submit, list and control jobs of one workspace; optionally runs the scheduler in this process."""

    def __init__(self, settings: AppSettings):
        from ..jobs.workspace import Workspace

        self.settings = settings
        self.workspace = Workspace(settings.workspace)
        self._scheduler = None

    def start_scheduler(self) -> None:
        """Run the scheduler in a daemon thread of the app; jobs themselves run in their own process sessions."""
        from ..jobs import Scheduler

        self._scheduler = Scheduler(self.workspace)
        self._scheduler.start_in_thread()
        logger.info("job scheduler started in the app process for workspace %s", self.settings.workspace)

    def stop_scheduler(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown()

    def submit(self, config: RunConfig) -> str:
        """Queue a validated config (its paths already resolved inside the roots); return the new job's id."""
        # exclude_none keeps the YAML short; every omitted key is None, which is also its default.
        text = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
        job = self.workspace.submit(text, name=config.name, workdir=self.settings.workspace)
        logger.info("submitted job %s (%s) from the app", job.id, job.name)
        return str(job.id)

    def list_jobs(self) -> list[JobView]:
        return [self._view(job) for job in reversed(self.workspace.list_jobs())]

    def get(self, job_id: str) -> JobView:
        return self._view(self.workspace.get(job_id))

    def run_dir(self, job_id: str) -> Path:
        return Path(self.workspace.get(job_id).run_dir)

    def stop(self, job_id: str) -> str:
        self.workspace.stop(job_id)
        return f"Stop requested for job {job_id}; it writes a checkpoint and exits as stopped."

    def resume(self, job_id: str) -> str:
        self.workspace.resume(job_id)
        return f"Job {job_id} is queued again and continues from its last checkpoint."

    def cancel(self, job_id: str) -> str:
        self.workspace.cancel(job_id)
        return f"Job {job_id} cancelled."

    def clone(self, job_id: str) -> str:
        job = self.workspace.clone(job_id)
        return f"Job {job_id} cloned as job {job.id} (queued)."

    def config_for_new_job(self, job_id: str) -> str:
        """Return the job's config as YAML for the Train tab, without the keys the app sets for each job."""
        from . import configform

        raw = configform.parse_yaml(self.workspace.get(job_id).config)
        for section, key in (("output", "run_dir"), ("checkpoint", "resume")):
            values = raw.get(section)
            if isinstance(values, dict):
                values.pop(key, None)
                if not values:
                    raw.pop(section)
        return configform.dump_yaml(raw)

    def delete(self, job_id: str) -> str:
        self.workspace.delete(job_id)
        # The download zip is a copy of the export, and a later job may get the same id.
        export_zip_path(self.settings, job_id).unlink(missing_ok=True)
        return f"Job {job_id} and its run folder deleted."

    def _view(self, job) -> JobView:
        from ..jobs.progress import read_progress

        progress = read_progress(job)
        return JobView(
            id=str(job.id), name=job.name, status=str(job.status), run_dir=Path(job.run_dir),
            created_at=job.created_at, step=progress.step, total_steps=progress.total_steps, epoch=progress.epoch,
            stage=progress.stage or "", eta_seconds=progress.eta_seconds, best=progress.best_value,
            metric=progress.best_metric or "accuracy", failure_reason=job.failure_reason or "",
        )
