"""The run folder contract: file names, exit codes and the `metrics.jsonl` event log.

Readers (the job service, the web app, plotting scripts) rely only on what this module documents, never on
the training code. Every line of `metrics.jsonl` is one JSON object with at least:

- `event`: one of `run_start`, `train`, `eval`, `stage`, `checkpoint`, `run_end`;
- `time`: Unix time in seconds (float);
- `step`: optimizer steps done so far (one step = one optimizer update, after gradient accumulation);
- `epoch`: fractional epochs done so far (float).

Per event:

- `run_start`: `total_steps`, `num_update_steps_per_epoch`, `num_train_epochs`, `num_examples`
  (`{"train": n, "validation": n, "test": n}`), `label_names`, `world_size`, `mixed_precision`,
  `resumed_from` (checkpoint path or null), `task`, `model`.
- `train`: `loss` (mean over the micro-batches since the last train event), `learning_rate` (of the top group),
  `samples_per_second`, `grad_norm` (before clipping; null when not computed).
- `eval`: `split` (`validation` or `test`) and the metrics `loss`, `accuracy`, `f1_macro`, `f1_weighted`,
  `precision_macro`, `recall_macro`; validation events also carry `train_loss` and `train_accuracy`, measured on
  the training batches since the previous evaluation, so the two can be compared side by side.
- `stage`: `stage` (index), `name`, `trainable_groups` (names), `trainable_parameters` (count),
  `frozen_batchnorm_parameters` (the part of that count in BatchNorm layers of frozen groups, with
  `schedule.train_bn: true`), `learning_rates` (`{group: rate}` at the stage's first step).
- `checkpoint`: `path`, `is_best`.
- `run_end`: `status` (`completed`, `early_stopped`, `stopped`, `failed`), `best_metric` (name),
  `best_value`, `best_step`, `export_dir`, and `test` (the test metrics, when there is test data), `error`
  (message, when failed).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

# Names inside a run folder.
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"

# Process exit codes of `finetune train`.
EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after writing a checkpoint; resume continues it.

EVENTS = ("run_start", "train", "eval", "stage", "checkpoint", "run_end")


class RunLog:
    """Appends events to `metrics.jsonl`; one line per event, flushed at once so readers see it live."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def write(self, event: str, step: int, epoch: float, **fields: Any) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown metrics event {event!r}; expected one of {', '.join(EVENTS)}")
        record = {"event": event, "time": time.time(), "step": int(step), "epoch": round(float(epoch), 6)}
        record.update({key: _json_safe(value) for key, value in fields.items()})
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return record


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """Read every complete event of a run folder's `metrics.jsonl`; a half-written last line is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    events = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value
