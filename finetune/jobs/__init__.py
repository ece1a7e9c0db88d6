"""The job service: a persistent queue of fine-tuning jobs that run with `accelerate launch`.

Typical use (the web app and the `finetune jobs` CLI do exactly this)::

    from finetune.jobs import Scheduler, Workspace, read_progress

    workspace = Workspace("workspace")            # jobs.sqlite + runs/<job id>/
    scheduler = Scheduler(workspace, max_cpu_jobs=1)
    scheduler.start_in_thread(poll_seconds=2.0)   # or run `finetune worker` in a terminal
    job = workspace.submit("configs/text.yaml", ["training.learning_rate=3e-5"], name="demo")
    progress = read_progress(workspace.get(job.id))
    workspace.stop(job.id); workspace.resume(job.id)

Actions on the wrong status raise `InvalidTransition`, unknown ids raise `JobNotFound`, and a bad config
raises `finetune.config.ConfigError` listing every problem.

Besides the files of `finetune.runlog`, a job's run folder `runs/<id>/` contains `job_config.yaml` (the
submitted config), `stdout.log` and `stderr.log` (the processes' output, where the run also logs), and
`exit_code.json` (the outcome of the last attempt, written by `finetune.jobs.runner`).
"""

from ..config import ConfigError
from .placement import Placement, PlacementError, available_accelerate_configs, detect_gpus
from .progress import Progress, read_progress
from .scheduler import Scheduler
from .store import (
    ACTIVE_STATUSES, FINAL_STATUSES, RESUMABLE_STATUSES, InvalidTransition, Job, JobError, JobNotFound, JobStatus,
    JobStore,
)
from .workspace import LOG_STREAMS, Workspace, default_workspace

__all__ = [
    "ACTIVE_STATUSES", "ConfigError", "FINAL_STATUSES", "InvalidTransition", "Job", "JobError", "JobNotFound",
    "JobStatus", "JobStore", "LOG_STREAMS", "Placement", "PlacementError", "Progress", "RESUMABLE_STATUSES",
    "Scheduler", "Workspace", "available_accelerate_configs", "default_workspace", "detect_gpus", "read_progress",
]
