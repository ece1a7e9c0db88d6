"""Read-only views of run folders: config, events, log tail, summary row, validation predictions, export zip.

Everything here reads the files that `finetune.runlog` documents; nothing imports the training code.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from .. import runlog

# Logs of a run folder in order of preference: the job's captured stderr holds everything the run logs
# (train.log is the same records from the main process only), stdout holds printed results.
LOG_CANDIDATES = ("stderr.log", runlog.LOG_FILE, "stdout.log")
PREDICTIONS_FILE = "validation_predictions.jsonl"
JOB_CONFIG_FILE = "job_config.yaml"  # written by the job service at submit time


def read_config(run_dir: Path) -> dict:
    """Return the run's resolved config, or the config the job was submitted with before the run starts."""
    for name in (runlog.CONFIG_FILE, JOB_CONFIG_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {}


def tail_log(run_dir: Path, max_lines: int = 200, max_bytes: int = 256 * 1024) -> str:
    """Return the last `max_lines` lines of the run's first non-empty log, reading at most `max_bytes`."""
    for name in LOG_CANDIDATES:
        path = Path(run_dir) / name
        if not path.is_file() or path.stat().st_size == 0:
            continue
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
        return "\n".join(clean_log_lines(text)[-max_lines:])
    return "(no log yet)"


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean_log_lines(text: str) -> list[str]:
    """Split a captured log into lines as a terminal shows them: colour codes removed, and of each line
    redrawn with carriage returns (tqdm progress bars) only its last state kept."""
    lines = []
    for line in _ANSI_ESCAPE.sub("", text).split("\n"):
        last = line.rstrip("\r").rsplit("\r", 1)[-1]
        lines.append(last)
    return lines


def metric_name(config: dict) -> str:
    return (config.get("training") or {}).get("metric_for_best_model", "accuracy")


def summarize_run(run_dir: Path, events: list[dict] | None = None) -> dict:
    """Return one leaderboard row: best metric, backbone, schedule, precision and wall time of a run."""
    config = read_config(run_dir)
    events = runlog.read_events(run_dir) if events is None else events
    metric = metric_name(config)
    best = _best_value(events, metric, config)
    start = next((e for e in events if e.get("event") == "run_start"), None)
    times = [e["time"] for e in events if isinstance(e.get("time"), (int, float))]
    training = config.get("training") or {}
    return {
        "metric": metric,
        "best": best,
        "backbone": (config.get("model") or {}).get("name_or_path", ""),
        "schedule": (config.get("schedule") or {}).get("preset", "full"),
        "precision": (start or {}).get("mixed_precision") or training.get("mixed_precision", ""),
        "minutes": round((max(times) - min(times)) / 60, 2) if len(times) > 1 else 0.0,
        "task": config.get("task", ""),
    }


def _best_value(events: list[dict], metric: str, config: dict) -> float | None:
    for event in reversed(events):
        if event.get("event") == "run_end" and isinstance(event.get("best_value"), (int, float)):
            return event["best_value"]
    values = [e.get(metric) for e in events if e.get("event") == "eval" and e.get("split") == "validation"]
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None
    greater = (config.get("training") or {}).get("greater_is_better")
    if greater is None:
        greater = "loss" not in metric
    return max(values) if greater else min(values)


def export_dir(run_dir: Path) -> Path:
    return Path(run_dir) / runlog.EXPORT_DIR


def has_export(run_dir: Path) -> bool:
    return (export_dir(run_dir) / "config.json").is_file()


def read_validation_predictions(run_dir: Path) -> list[dict] | None:
    """Return the rows of `export/validation_predictions.jsonl`, or None when the run did not write it."""
    path = export_dir(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def label_names(run_dir: Path) -> list[str]:
    """Return the label names of an exported model in id order, from its config.json `id2label`."""
    path = export_dir(run_dir) / "config.json"
    if not path.is_file():
        return []
    id2label = json.loads(path.read_text(encoding="utf-8")).get("id2label") or {}
    return [id2label[key] for key in sorted(id2label, key=int)]


def zip_export(run_dir: Path, download_dir: Path, name: str) -> Path:
    """Zip the run's export folder into `download_dir/<name>.zip` and return the zip's path."""
    source = export_dir(run_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"Run {run_dir} has no export folder yet; it is written when the run completes.")
    download_dir.mkdir(parents=True, exist_ok=True)
    base = download_dir / name
    return Path(shutil.make_archive(str(base), "zip", root_dir=source))


def flatten(node, prefix: str = "") -> dict[str, object]:
    """Flatten nested config mappings into dotted keys, for diffs."""
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): node}
