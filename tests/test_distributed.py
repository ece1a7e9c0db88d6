"""Evaluation counts and file writes in one process and in a real 2-process CPU run (gloo).

The validation split has 11 rows in evaluation batches of 4, 4 and 3 rows. Over 2 processes the last round is
uneven, so Accelerate pads it with duplicates that must not be counted.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from finetune import runlog  # noqa: E402
from tiny import events_of, make_reviews_csv, run_recipe, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VALIDATION_ROWS = 11
TEST_ROWS = 7
TRAIN_ROWS = 30  # 8 batches of 4 (the last one of 2 rows)


def uneven_config(tmp_path: Path) -> dict:
    csv_path = make_reviews_csv(tmp_path / "reviews.csv", TRAIN_ROWS + VALIDATION_ROWS + TEST_ROWS)
    return tiny_config(
        tmp_path,
        data={"train": str(csv_path), "validation_size": VALIDATION_ROWS, "test_size": TEST_ROWS},
        training={"num_train_epochs": 2, "eval_strategy": "epoch"},
    )


def check_validation_predictions(export_dir: Path, csv_path: Path) -> list[dict]:
    """Return the export's validation predictions after checking each row's label against the CSV's label
    for its text: outputs mapped back to the wrong rows would pair texts with other rows' labels."""
    labels_by_text = dict(zip(*[pd.read_csv(csv_path)[column] for column in ("text", "label")]))
    records = [json.loads(line) for line in (export_dir / "validation_predictions.jsonl").read_text().splitlines()]
    mismatched = [record for record in records if labels_by_text[record["text"]] != record["label"]]
    assert mismatched == []
    return records


def accuracy_of(records: list[dict]) -> float:
    return sum(record["label"] == record["prediction"] for record in records) / len(records)


# ---------------------------------------------------------------------------------------------------------------
# One process


@pytest.fixture
def one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine make tiny steps many times slower
    yield
    torch.set_num_threads(threads)


def test_eval_counts_one_process(tmp_path, one_thread):
    config = uneven_config(tmp_path)
    code, events = run_recipe(config)
    validation = events_of(events, "eval", split="validation")
    test = events_of(events, "eval", split="test")
    records = check_validation_predictions(tmp_path / "run" / "export", Path(config["data"]["train"]))
    results = json.loads((tmp_path / "run" / "export" / "eval_results.json").read_text())

    assert code == 0
    assert [event["num_examples"] for event in validation] == [VALIDATION_ROWS, VALIDATION_ROWS]
    assert [event["num_examples"] for event in test] == [TEST_ROWS]
    assert [record["index"] for record in records] == list(range(VALIDATION_ROWS))
    assert accuracy_of(records) == pytest.approx(results["validation"]["accuracy"])


# ---------------------------------------------------------------------------------------------------------------
# Two processes


def launch_two_processes(config_path: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", FINETUNE_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # --multi_gpu on a machine without GPUs starts 2 CPU processes over gloo (--cpu would start only one).
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "finetune.train", "--config", str(config_path),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("ddp")
    config = uneven_config(tmp_path)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    completed = launch_two_processes(config_path, tmp_path / "cache")
    run_dir = tmp_path / "run"
    return {"completed": completed, "events": runlog.read_events(run_dir), "run_dir": run_dir, "config": config}


@pytest.mark.slow
def test_two_process_run_exits_zero(two_process_run):
    completed = two_process_run["completed"]
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.slow
def test_two_process_step_count(two_process_run):
    start = events_of(two_process_run["events"], "run_start")[0]
    # Each process gets every 2nd batch: ceil(8 / 2) = 4 micro-batches, so 4 optimizer steps per epoch.
    assert start["world_size"] == 2
    assert start["num_update_steps_per_epoch"] == 4
    assert start["total_steps"] == 8
    assert [event["step"] for event in events_of(two_process_run["events"], "train")] == list(range(1, 9))


@pytest.mark.slow
def test_two_process_lr_ends_at_zero(two_process_run):
    # The scheduler is sized by the steps each process makes (8), not by the batches of one pass (16).
    train_events = events_of(two_process_run["events"], "train")
    assert train_events[3]["learning_rate"] == pytest.approx(1e-3 * 4 / 8)
    assert train_events[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.slow
def test_two_process_eval_counts(two_process_run):
    validation = events_of(two_process_run["events"], "eval", split="validation")
    test = events_of(two_process_run["events"], "eval", split="test")
    assert [event["num_examples"] for event in validation] == [VALIDATION_ROWS, VALIDATION_ROWS]
    assert [event["num_examples"] for event in test] == [TEST_ROWS]


@pytest.mark.slow
def test_two_process_predictions_aligned(two_process_run):
    export_dir = two_process_run["run_dir"] / "export"
    records = check_validation_predictions(export_dir, Path(two_process_run["config"]["data"]["train"]))
    results = json.loads((export_dir / "eval_results.json").read_text())
    assert [record["index"] for record in records] == list(range(VALIDATION_ROWS))
    assert accuracy_of(records) == pytest.approx(results["validation"]["accuracy"])


@pytest.mark.slow
def test_two_process_main_writes_once(two_process_run):
    events = two_process_run["events"]
    assert len(events_of(events, "run_start")) == 1
    assert len(events_of(events, "run_end")) == 1
    assert events_of(events, "run_end")[0]["status"] == "completed"
    assert sorted(path.name for path in two_process_run["run_dir"].iterdir()) == sorted(
        [runlog.CONFIG_FILE, runlog.METRICS_FILE, runlog.LOG_FILE, runlog.CHECKPOINTS_DIR, runlog.EXPORT_DIR, ".lock"]
    )
    assert (two_process_run["run_dir"] / runlog.EXPORT_DIR / "config.json").is_file()
