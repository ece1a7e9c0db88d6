"""Progress of a job for readers (the app's table, `finetune jobs list`), from its run folder alone.

Everything here comes from `metrics.jsonl` (see `finetune.runlog`) and the job's row. No training code is
imported, so reading progress is cheap and safe in the web app's process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from ..runlog import read_events

if TYPE_CHECKING:
    from .store import Job

# Event fields that are bookkeeping, not metrics.
_EVENT_KEYS = {"event", "time", "step", "epoch", "split"}


@dataclass
class Progress:
    """A snapshot of one job's progress.

    `step` counts optimizer steps of the whole run, and resumed attempts continue the count. `fraction` is
    step / total_steps in [0, 1]. `eta_seconds` extrapolates the current attempt's step rate. It is None
    when the job is not running or the attempt has no step yet. `best_*` follow
    `training.metric_for_best_model`: the run's own `run_end` values when the run has ended, else the best
    validation value so far.
    """

    job_id: int
    status: str
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    num_train_epochs: int | None = None
    fraction: float = 0.0
    stage: str | None = None
    stage_index: int | None = None
    eta_seconds: float | None = None
    train_metrics: dict[str, Any] = field(default_factory=dict)
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    last_event_time: float | None = None
    export_dir: str | None = None


def read_progress(job: Job, now: float | None = None) -> Progress:
    """Return the progress of `job` from its run folder's `metrics.jsonl`."""
    progress = Progress(job_id=job.id, status=job.status.value)
    events = read_events(job.run_dir)
    metric, greater_is_better = _best_metric_rule(job.config)
    progress.best_metric = metric
    attempt_start = None
    for event in events:
        _apply_event(progress, event, metric, greater_is_better)
        if event.get("event") == "run_start":
            attempt_start = event
    if progress.total_steps:
        progress.fraction = min(1.0, progress.step / progress.total_steps)
    if job.status.value == "completed":
        progress.fraction = 1.0
    if job.status.value in ("running", "stopping") and attempt_start is not None:
        progress.eta_seconds = _eta_seconds(progress, attempt_start, now if now is not None else time.time())
    return progress


def _apply_event(progress: Progress, event: dict, metric: str, greater_is_better: bool) -> None:
    kind = event.get("event")
    progress.step = int(event.get("step", progress.step))
    progress.epoch = float(event.get("epoch", progress.epoch))
    progress.last_event_time = event.get("time", progress.last_event_time)
    if kind == "run_start":
        progress.total_steps = event.get("total_steps")
        progress.num_train_epochs = event.get("num_train_epochs")
    elif kind == "train":
        progress.train_metrics = _metrics(event)
    elif kind == "eval" and event.get("split", "validation") == "validation":
        progress.validation_metrics = _metrics(event)
        _update_best(progress, progress.validation_metrics.get(metric), progress.step, greater_is_better)
    elif kind == "eval":
        progress.test_metrics = _metrics(event)
    elif kind == "stage":
        progress.stage = event.get("name")
        progress.stage_index = event.get("stage")
    elif kind == "run_end":
        _apply_run_end(progress, event)


def _apply_run_end(progress: Progress, event: dict) -> None:
    if event.get("best_value") is not None:
        progress.best_metric = event.get("best_metric") or progress.best_metric
        progress.best_value = _number(event["best_value"])
        progress.best_step = event.get("best_step")
    if isinstance(event.get("test"), dict):
        progress.test_metrics = dict(event["test"])
    progress.export_dir = event.get("export_dir") or progress.export_dir


def _metrics(event: dict) -> dict[str, Any]:
    return {key: value for key, value in event.items() if key not in _EVENT_KEYS}


def _number(value: Any) -> float | None:
    # runlog writes non-finite floats as text ("nan", "inf").
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _update_best(progress: Progress, value: Any, step: int, greater_is_better: bool) -> None:
    value = _number(value)
    if value is None or value != value:  # Skip missing values and NaN.
        return
    better = progress.best_value is None or (value > progress.best_value if greater_is_better else value < progress.best_value)
    if better:
        progress.best_value, progress.best_step = value, step


def _best_metric_rule(config_text: str) -> tuple[str, bool]:
    """Return (metric name, greater is better) as the run decides them (names containing 'loss' are minimised)."""
    try:
        training = (yaml.safe_load(config_text) or {}).get("training") or {}
    except yaml.YAMLError:
        training = {}
    metric = str(training.get("metric_for_best_model") or "accuracy")
    greater = training.get("greater_is_better")
    return metric, bool(greater) if greater is not None else "loss" not in metric


def _eta_seconds(progress: Progress, attempt_start: dict, now: float) -> float | None:
    """Extrapolate the current attempt's steps per second to the remaining steps; None without a rate yet."""
    if not progress.total_steps or progress.last_event_time is None:
        return None
    steps_done = progress.step - int(attempt_start.get("step", 0))
    elapsed = progress.last_event_time - float(attempt_start.get("time", progress.last_event_time))
    if steps_done <= 0 or elapsed <= 0:
        return None
    remaining_steps = max(0, progress.total_steps - progress.step)
    since_last_event = max(0.0, now - progress.last_event_time)
    return max(0.0, remaining_steps * elapsed / steps_done - since_last_event)
