"""Training recipe: optimizer step counts, LR schedules, best-model choice, CLI errors and a real MiniLM run.

Fast tests train a tiny random-initialised BERT (see `tiny.py`) in this process; each run takes seconds.
"""

from __future__ import annotations

import os

# Set before transformers and datasets are imported, because they read these variables once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from finetune.config import validate_config  # noqa: E402
from finetune.stopping import metric_greater_is_better  # noqa: E402
from finetune.train import FineTuneRecipe, parse_args  # noqa: E402
from tiny import events_of, make_reviews_csv, make_tiny_bert, merge, run_recipe, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEAK_LR = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("model") / "tiny_bert")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Cache tokenised data per test, and train on one thread: two threads on a busy 2-core machine spin
    against other processes and make a tiny step about 10 times slower."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=subprocess_env(), cwd=REPO,
    )


# ---------------------------------------------------------------------------------------------------------------
# Optimizer steps with gradient accumulation (one process)

# (train rows, batch size, gradient_accumulation_steps, epochs, max_steps)
STEP_CASES = [
    (32, 4, 3, 2, None),  # 8 micro-batches per epoch: groups of 3, 3 and 2
    (30, 4, 1, 1, None),  # the last batch has 2 rows
    (30, 8, 2, 2, None),  # 4 micro-batches: two full groups
    (32, 4, 3, 3, 5),  # max_steps ends the run in the second epoch
    (13, 4, 5, 2, None),  # accumulation longer than the epoch: one short group per epoch
]


def expected_steps(rows: int, batch: int, accumulation: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """Return (optimizer steps per epoch, total steps) for one process."""
    per_epoch = math.ceil(math.ceil(rows / batch) / accumulation)
    total = per_epoch * epochs
    return per_epoch, total if max_steps is None else min(total, max_steps)


def expected_step_epochs(rows: int, batch: int, accumulation: int, total: int) -> list[float]:
    """Return the fractional epoch after each optimizer step: every group ends a step, a short last group too."""
    micro_batches = math.ceil(rows / batch)
    group_ends = list(range(accumulation, micro_batches, accumulation)) + [micro_batches]
    epochs = []
    epoch = 0
    while len(epochs) < total:
        epochs += [round(epoch + end / micro_batches, 6) for end in group_ends]
        epoch += 1
    return epochs[:total]


def step_run_config(tmp_path, model_dir, rows, batch, accumulation, epochs, max_steps) -> dict:
    # 16 more rows than trained on: tiny_config carves 8 validation and 8 test rows.
    csv_path = make_reviews_csv(tmp_path / "reviews.csv", rows + 16)
    return tiny_config(
        tmp_path,
        model={"name_or_path": str(model_dir)},
        data={"train": str(csv_path)},
        training={
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accumulation,
            "num_train_epochs": epochs,
            "max_steps": max_steps,
            "eval_strategy": "no",
        },
    )


@pytest.mark.parametrize(("rows", "batch", "accumulation", "epochs", "max_steps"), STEP_CASES)
def test_step_count_with_accumulation(tmp_path, model_dir, rows, batch, accumulation, epochs, max_steps):
    config = step_run_config(tmp_path, model_dir, rows, batch, accumulation, epochs, max_steps)
    per_epoch, total = expected_steps(rows, batch, accumulation, epochs, max_steps)

    code, events = run_recipe(config)
    start = events_of(events, "run_start")[0]
    train_events = events_of(events, "train")

    assert code == 0
    assert start["num_examples"]["train"] == rows
    assert start["num_update_steps_per_epoch"] == per_epoch
    assert start["total_steps"] == total
    assert [event["step"] for event in train_events] == list(range(1, total + 1))
    assert [event["epoch"] for event in train_events] == expected_step_epochs(rows, batch, accumulation, total)
    assert events_of(events, "run_end")[0]["step"] == total
    assert events_of(events, "run_end")[0]["status"] == "completed"


def test_short_group_loss_is_mean(tmp_path, model_dir):
    # 8 micro-batches in groups of 3, 3, 2. An untrained 2-class model has a loss near ln 2 on every batch.
    # The short group's step loss is near ln 2 only when it is divided by 2, its real size. Dividing it by
    # gradient_accumulation_steps would give about 2/3 of that.
    config = step_run_config(tmp_path, model_dir, 32, 4, 3, 1, None)
    code, events = run_recipe(config)
    losses = {event["step"]: event["loss"] for event in events_of(events, "train")}
    assert code == 0
    assert losses[3] == pytest.approx(math.log(2), abs=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


def expected_lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """Return the LR multiplier after `step` optimizer steps, i.e. the one the next step uses.

    Warm-up climbs linearly to the peak, which is reached at step `warmup`. Linear and cosine decay then reach 0
    at `total`, with the same formulas as transformers' get_linear/cosine_schedule_with_warmup (5.x). Unlike
    those, the first step already uses 1/(warmup+1) of the peak instead of 0, so no step runs at rate 0.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / (total - warmup)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def lr_run(tmp_path, model_dir, kind: str, **warmup) -> list[dict]:
    # 32 train rows in batches of 4: 8 optimizer steps.
    config = tiny_config(
        tmp_path,
        model={"name_or_path": str(model_dir)},
        training={"lr_scheduler_type": kind, "learning_rate": PEAK_LR, "eval_strategy": "no", **warmup},
    )
    code, events = run_recipe(config)
    assert code == 0
    return events


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_follows_schedule(tmp_path, model_dir, kind):
    events = lr_run(tmp_path, model_dir, kind, warmup_steps=3)
    logged = {event["step"]: event["learning_rate"] for event in events_of(events, "train")}
    expected = {step: PEAK_LR * expected_lr_factor(kind, step, 3, 8) for step in range(1, 9)}
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_lr_decays_to_zero(tmp_path, model_dir, kind):
    events = lr_run(tmp_path, model_dir, kind, warmup_steps=3)
    train_events = events_of(events, "train")
    assert train_events[-1]["step"] == 8
    assert train_events[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-15)


def test_lr_warmup_starts_low(tmp_path, model_dir):
    events = lr_run(tmp_path, model_dir, "linear", warmup_steps=3)
    first_rates = events_of(events, "stage")[0]["learning_rates"]  # in force for the first optimizer step
    logged = {event["step"]: event["learning_rate"] for event in events_of(events, "train")}
    assert first_rates["head"] == pytest.approx(PEAK_LR / 4)
    assert logged[3] == pytest.approx(PEAK_LR)
    assert max(logged.values()) == pytest.approx(PEAK_LR)


def test_lr_warmup_ratio_rounds_up(tmp_path, model_dir):
    # warmup_ratio 0.3 of 8 steps is 2.4 steps: 3 steps of warm-up, the same as warmup_steps 3.
    events = lr_run(tmp_path, model_dir, "linear", warmup_ratio=0.3)
    logged = {event["step"]: event["learning_rate"] for event in events_of(events, "train")}
    expected = {step: PEAK_LR * expected_lr_factor("linear", step, 3, 8) for step in range(1, 9)}
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_lr_max_steps_sizes_schedule(tmp_path, model_dir):
    # max_steps 5 of the 8 steps in an epoch: the decay must reach 0 at step 5, not at step 8.
    config = tiny_config(
        tmp_path,
        model={"name_or_path": str(model_dir)},
        training={"learning_rate": PEAK_LR, "eval_strategy": "no", "max_steps": 5},
    )
    code, events = run_recipe(config)
    logged = {event["step"]: event["learning_rate"] for event in events_of(events, "train")}
    assert code == 0
    assert logged == pytest.approx({step: PEAK_LR * (5 - step) / 5 for step in range(1, 6)}, rel=1e-9, abs=1e-15)


def test_lr_sized_by_accumulated_steps(tmp_path, model_dir):
    # 8 micro-batches in groups of 3, 3, 2 over 2 epochs: 6 optimizer steps, so the decay ends at step 6.
    config = tiny_config(
        tmp_path,
        model={"name_or_path": str(model_dir)},
        training={"learning_rate": PEAK_LR, "eval_strategy": "no", "gradient_accumulation_steps": 3, "num_train_epochs": 2},
    )
    code, events = run_recipe(config)
    logged = {event["step"]: event["learning_rate"] for event in events_of(events, "train")}
    assert code == 0
    assert logged == pytest.approx({step: PEAK_LR * (6 - step) / 6 for step in range(1, 7)}, rel=1e-9, abs=1e-15)


def test_train_loss_spans_epoch_end(tmp_path, model_dir):
    # 4 steps per epoch, a train event every 3 steps: the event at step 6 averages steps 4, 5 and 6, across the
    # epoch boundary, as metrics.jsonl documents ("mean over the micro-batches since the last train event").
    per_step, every_third = {}, {}
    for logging_steps, losses in ((1, per_step), (3, every_third)):
        config = tiny_config(
            tmp_path,
            model={"name_or_path": str(model_dir)},
            training={"per_device_train_batch_size": 8, "num_train_epochs": 2, "logging_steps": logging_steps},
            output={"run_dir": str(tmp_path / f"every{logging_steps}")},
        )
        code, events = run_recipe(config)
        assert code == 0
        losses.update({event["step"]: event["loss"] for event in events_of(events, "train")})
    assert sorted(every_third) == [3, 6]
    assert every_third[3] == pytest.approx((per_step[1] + per_step[2] + per_step[3]) / 3, rel=1e-6)
    assert every_third[6] == pytest.approx((per_step[4] + per_step[5] + per_step[6]) / 3, rel=1e-6)


@pytest.mark.parametrize(("max_grad_norm", "has_norm"), [(1.0, True), (None, False)], ids=["clipped", "unclipped"])
def test_train_event_fields(tmp_path, model_dir, max_grad_norm, has_norm):
    config = tiny_config(
        tmp_path,
        model={"name_or_path": str(model_dir)},
        training={"max_steps": 2, "eval_strategy": "no", "max_grad_norm": max_grad_norm},
    )
    code, events = run_recipe(config)
    train_events = events_of(events, "train")
    assert code == 0
    assert len(train_events) == 2
    assert all(event["samples_per_second"] > 0 for event in train_events)
    assert all(math.isfinite(event["loss"]) for event in train_events)
    assert all((event["grad_norm"] is not None) is has_norm for event in train_events)


# ---------------------------------------------------------------------------------------------------------------
# Metric direction and the exported model


@pytest.mark.parametrize(
    ("name", "override", "expected"),
    [
        ("loss", None, False),
        ("eval_loss", None, False),
        ("Validation_LOSS", None, False),
        ("accuracy", None, True),
        ("f1_macro", None, True),
        ("loss", True, True),
        ("accuracy", False, False),
    ],
)
def test_metric_direction(name, override, expected):
    assert metric_greater_is_better(name, override) is expected


@pytest.mark.parametrize(("greater_is_better", "pick"), [(None, min), (True, max)], ids=["inferred", "overridden"])
def test_export_is_best_by_loss(tmp_path, model_dir, greater_is_better, pick):
    # A high learning rate makes the validation loss move at each of the 16 evaluations. The lowest and the
    # highest loss cannot both be the final one, so between the two cases the export differs from the final model.
    config = tiny_config(
        tmp_path,
        model={"name_or_path": str(model_dir)},
        training={
            "num_train_epochs": 2,
            "learning_rate": 1e-2,
            "eval_strategy": "steps",
            "eval_steps": 1,
            "metric_for_best_model": "loss",
            "greater_is_better": greater_is_better,
        },
    )
    code, events = run_recipe(config)
    evaluations = events_of(events, "eval", split="validation")
    losses = [event["loss"] for event in evaluations]
    best = losses.index(pick(losses))
    exported = json.loads((tmp_path / "run" / "export" / "eval_results.json").read_text())
    run_end = events_of(events, "run_end")[0]

    assert code == 0
    assert len(losses) == 16
    assert len(set(losses)) > 1
    assert exported["validation"]["loss"] == pytest.approx(losses[best], rel=1e-6)
    assert run_end["best_step"] == evaluations[best]["step"]
    assert run_end["best_value"] == pytest.approx(losses[best], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Config and pre-flight errors through the CLI


def test_run_dir_on_file_rejected(tmp_path, model_dir):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder\n")
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)}, output={"run_dir": str(taken)})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    completed = run_cli("train", str(path))

    assert completed.returncode == 2
    assert f"output.run_dir = '{taken}': cannot be created (FileExistsError" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_run_dir_in_use_rejected(tmp_path, model_dir):
    import fcntl

    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # This test process acts as a run that is still training in the folder.
    with open(run_dir / ".lock", "a+", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        completed = run_cli("train", str(path))

    assert completed.returncode == 2
    assert "is in use by another training run (process 4242)" in completed.stderr
    assert not (run_dir / "config.yaml").exists()
    assert run_cli("train", str(path)).returncode == 0


def test_cli_lists_every_config_error(tmp_path, model_dir):
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)})
    config["training"].update(learnig_rate=1e-3, num_train_epochs=0, lr_scheduler_type="cosin")
    config["data"]["validation_size"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))

    completed = run_cli("train", str(path))

    assert completed.returncode == 2
    assert "4 problem(s)" in completed.stderr
    assert "training.learnig_rate" in completed.stderr
    assert "did you mean 'learning_rate'" in completed.stderr
    assert "training.num_train_epochs = 0" in completed.stderr
    assert "training.lr_scheduler_type = 'cosin'" in completed.stderr
    assert "data.validation_size = -1" in completed.stderr
    assert not (tmp_path / "run").exists()


def test_cli_data_error_before_weights(tmp_path):
    # A model folder without weights: the data check has to fail first, or loading would fail differently.
    model_dir = make_tiny_bert(tmp_path / "no_weights")
    (model_dir / "model.safetensors").unlink()
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)}, data={"text_column": "review"})
    path = tmp_path / "missing_column.yaml"
    path.write_text(yaml.safe_dump(config))

    completed = run_cli("train", str(path))

    assert completed.returncode == 2
    assert "'review' not found" in completed.stderr
    assert "Available columns: text, label" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_data_error_ends_run_log(tmp_path, model_dir):
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)}, data={"label_column": "category"})
    code, events = run_recipe(config)
    run_end = events_of(events, "run_end")
    assert code == 2
    assert len(run_end) == 1
    assert run_end[0]["status"] == "failed"
    assert "'category' not found" in run_end[0]["error"]
    assert events_of(events, "run_start") == []


# ---------------------------------------------------------------------------------------------------------------
# A real pretrained backbone on real reviews


@pytest.mark.slow
def test_minilm_beats_chance(tmp_path):
    config = {
        "task": "text-classification",
        "model": {"name_or_path": "asset:minilm"},
        "data": {
            "train": "asset:rotten_tomatoes",
            "text_column": "text",
            "label_column": "category",
            "keep_labels": ["fresh", "rotten"],
            "validation_size": 0.1,
            "test_size": 0.1,
            "max_length": 64,
            "max_train_samples": 1200,
            "max_eval_samples": 300,
        },
        "training": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 32,
            "per_device_eval_batch_size": 128,
            "learning_rate": 1e-4,
            "warmup_ratio": 0.1,
            "mixed_precision": "auto",
            "logging_steps": 10,
            "eval_strategy": "no",  # the test split is evaluated once at the end either way
        },
        "checkpoint": {"save_every_epoch": False, "save_steps": 1000},
        "output": {"run_dir": str(tmp_path / "run"), "export": "final"},
    }
    code, events = run_recipe(config)
    test = events_of(events, "eval", split="test")[0]

    assert code == 0
    assert test["num_examples"] == 300
    assert test["accuracy"] > 0.6


# ---------------------------------------------------------------------------------------------------------------
# Reproducibility and early configuration checks


def test_same_seed_same_run(tmp_path, model_dir):
    runs = []
    for name in ("first", "second"):
        config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)}, output={"run_dir": str(tmp_path / name)})
        code, events = run_recipe(config)
        assert code == 0
        runs.append(events)
    losses = [[event["loss"] for event in events_of(events, "train")] for events in runs]
    validation = [[event["loss"] for event in events_of(events, "eval", split="validation")] for events in runs]
    assert losses[0] == losses[1]
    assert validation[0] == validation[1]


def test_other_seed_other_run(tmp_path, model_dir):
    losses = []
    for seed in (0, 1):
        config = tiny_config(
            tmp_path, model={"name_or_path": str(model_dir)}, training={"seed": seed, "max_steps": 3},
            output={"run_dir": str(tmp_path / f"seed{seed}")},
        )
        code, events = run_recipe(config)
        assert code == 0
        losses.append([event["loss"] for event in events_of(events, "train")])
    assert losses[0] != losses[1]


def test_unknown_metric_rejected_before_training(tmp_path, model_dir):
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)}, training={"metric_for_best_model": "f1"})
    recipe = FineTuneRecipe(validate_config(config))
    try:
        code = recipe.run()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert code == 2
    assert "training.metric_for_best_model = 'f1'" in recipe.error
    assert "use one of: accuracy, f1_macro" in recipe.error
    assert not (tmp_path / "run").exists()  # rejected before the run folder is written


def test_trainer_metric_name_points_to_ours():
    from finetune.train import _unknown_metric_issue

    issue = _unknown_metric_issue("eval_loss", dict.fromkeys(["accuracy", "loss", "num_examples"]))
    assert issue.value == "eval_loss"
    assert "use 'loss'" in issue.fix


@pytest.mark.parametrize(
    "argv",
    [
        ["run.yaml", "training.learning_rate=3e-5", "data.max_length=64"],
        ["--config", "run.yaml", "training.learning_rate=3e-5", "data.max_length=64"],
        ["training.learning_rate=3e-5", "--config", "run.yaml", "data.max_length=64"],
        ["training.learning_rate=3e-5", "data.max_length=64", "--config", "run.yaml"],
    ],
    ids=["positional", "option_first", "option_between", "option_last"],
)
def test_train_arguments(argv):
    args = parse_args(argv)
    assert args.config_path == "run.yaml"
    assert args.overrides == ["training.learning_rate=3e-5", "data.max_length=64"]


def test_train_arguments_need_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([])
    assert exit_info.value.code == 2
    assert "a config file is required" in capsys.readouterr().err


def test_train_arguments_two_configs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["a.yaml", "--config", "b.yaml"])
    assert exit_info.value.code == 2
    assert "two config files given, a.yaml and --config b.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Re-using a run folder


def test_fresh_start_sets_previous_run_aside(tmp_path, model_dir):
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)})
    first_code, _ = run_recipe(config)
    second_code, events = run_recipe(merge(config, {"checkpoint": {"resume": "never"}}))
    run_dir = Path(config["output"]["run_dir"])
    previous = sorted(run_dir.glob("previous-*"))
    assert (first_code, second_code) == (0, 0)
    assert len(previous) == 1
    assert list((previous[0] / "checkpoints").glob("checkpoint-*"))
    assert len(events_of(events, "run_start")) == 1
    assert events_of(events, "run_start")[0]["resumed_from"] is None


def test_resume_warns_about_changed_settings(tmp_path, model_dir, finetune_records):
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)},
                         training__num_train_epochs=1, checkpoint={"save_every_epoch": True, "save_steps": None})
    run_recipe(config)
    changed = merge(config, {"training": {"num_train_epochs": 2, "learning_rate": 5e-4}})
    code, events = run_recipe(changed)
    warnings = [record.getMessage() for record in finetune_records if "changed settings" in record.getMessage()]
    assert code == 0
    assert events_of(events, "run_start")[-1]["resumed_from"] is not None
    assert len(warnings) == 1
    assert "training.learning_rate: 0.001 -> 0.0005" in warnings[0]


def test_resume_setting_not_a_change(tmp_path, model_dir, finetune_records):
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)}, training__num_train_epochs=1,
                         checkpoint={"save_every_epoch": True, "save_steps": None, "resume": "never"})
    run_recipe(config)
    resumed = merge(config, {"training": {"num_train_epochs": 2}, "checkpoint": {"resume": "auto"}})
    code, events = run_recipe(resumed)
    warnings = [record.getMessage() for record in finetune_records if "changed settings" in record.getMessage()]
    assert code == 0
    assert events_of(events, "run_start")[-1]["resumed_from"] is not None
    assert len(warnings) == 1
    assert "training.num_train_epochs: 1 -> 2" in warnings[0]
    assert "checkpoint.resume: " not in warnings[0]


def test_resume_past_max_steps_warns(tmp_path, model_dir, finetune_records):
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)},
                         checkpoint={"save_every_epoch": True, "save_steps": None})
    run_recipe(config)
    shorter = merge(config, {"training": {"max_steps": 3}})
    code, events = run_recipe(shorter)
    warnings = [record.getMessage() for record in finetune_records if "no training step runs" in record.getMessage()]
    assert code == 0
    assert len(warnings) == 1
    assert "at step 8, but this run ends at step 3" in warnings[0]
    assert events_of(events, "train")[-1]["step"] == 8


def test_resume_with_other_accumulation_whole_groups(tmp_path, model_dir, monkeypatch):
    # 32 training rows in batches of 4: 8 micro-batches per epoch. With accumulation 3 the checkpoint of
    # step 1 stops after micro-batch 3, which is not a group boundary for accumulation 2.
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)},
                         training={"gradient_accumulation_steps": 3, "num_train_epochs": 1},
                         checkpoint={"save_every_epoch": False, "save_steps": 1, "save_total_limit": 10})
    run_recipe(config)
    run_dir = Path(config["output"]["run_dir"])
    for checkpoint in sorted((run_dir / "checkpoints").glob("checkpoint-*")):
        if checkpoint.name != "checkpoint-1":
            shutil.rmtree(checkpoint)

    calls: list[object] = []
    forward_backward, begin_step = FineTuneRecipe._forward_backward, FineTuneRecipe._begin_step

    def record_forward_backward(self, batch, group_size, sync):
        calls.append(group_size)
        return forward_backward(self, batch, group_size, sync)

    def record_begin_step(self):
        calls.append("step")
        return begin_step(self)

    monkeypatch.setattr(FineTuneRecipe, "_forward_backward", record_forward_backward)
    monkeypatch.setattr(FineTuneRecipe, "_begin_step", record_begin_step)
    code, _ = run_recipe(merge(config, {"training": {"gradient_accumulation_steps": 2}}))
    assert code == 0
    # Micro-batches 3-4, 5-6 and 7: each step begins with a stage update and divides by its own group size.
    assert calls == ["step", 2, 2, "step", 2, 2, "step", 1]


def test_ineffective_settings_warned(tmp_path, model_dir, finetune_records):
    config = tiny_config(tmp_path, model={"name_or_path": str(model_dir)},
                         training={"max_steps": 2, "warmup_steps": 5, "eval_steps": 3})
    code, _ = run_recipe(config)
    warnings = [record.getMessage() for record in finetune_records if record.levelname == "WARNING"]
    assert code == 0
    assert any("training.warmup_steps is 5 but the run has 2 optimizer steps" in message for message in warnings)
    assert any("training.eval_steps (3) is ignored with eval_strategy 'epoch'" in message for message in warnings)
