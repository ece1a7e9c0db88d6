"""Exact resume: interrupted-and-resumed `finetune.train` runs end with the weights of an uninterrupted run.

Every run is a real `finetune.train.main` call in its own process, on a micro BERT (hidden size 8, a
31-word vocabulary) so that a step and a checkpoint take milliseconds. Processes are forked from a server
that has imported the engine already, so a restart costs well under a second instead of the import time.

Interruptions are real: SIGKILL or SIGTERM from outside at random moments, or SIGKILL that the training
process sends itself right after a chosen micro-batch. The latter hits exact places, such as the middle of a
gradient accumulation group or either side of an unfreeze. The same hook turns one micro-batch's loss into NaN.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from finetune import runlog
from finetune.checkpoint import checkpoint_step, is_complete, list_complete, read_checkpoint_record
from finetune.precision import cpu_supports_bf16
from forking import engine_forkserver, free_port
from tiny import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, make_reviews_csv, merge

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 300  # seconds for one training process; the runs here take a few seconds each


# ---------------------------------------------------------------------------------------------------------------
# Micro model and configs


def make_micro_bert(folder: Path, seed: int = 0) -> Path:
    """Save a random 2-layer BERT with hidden size 8 and a word-level tokenizer of the review words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {word: index for index, word in enumerate(specials + POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=32,
    )
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=32, num_labels=2,
    )
    torch.manual_seed(seed)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """The micro model folder and a 48-row review CSV (32 train, 8 validation, 8 test rows)."""
    folder = tmp_path_factory.mktemp("resume_assets")
    make_micro_bert(folder / "micro_bert")
    make_reviews_csv(folder / "reviews.csv", 48)
    return folder


def micro_config(assets: Path, run_dir: Path, **overrides) -> dict:
    """Return a config for the micro model: 2 epochs of 8 steps (batch 4), a checkpoint every 2 steps."""
    config = {
        "task": "text-classification",
        "model": {"name_or_path": str(assets / "micro_bert")},
        "data": {
            "train": str(assets / "reviews.csv"),
            "text_column": "text",
            "label_column": "label",
            "validation_size": 8,
            "test_size": 8,
            "max_length": 32,
        },
        "training": {
            "num_train_epochs": 2,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "learning_rate": 5e-3,
            "warmup_steps": 3,
            "mixed_precision": "no",
            "logging_steps": 1,
            "eval_strategy": "epoch",
            "seed": 7,
        },
        "checkpoint": {"save_steps": 2, "save_every_epoch": True, "save_total_limit": 2},
        "output": {"run_dir": str(run_dir), "export": "final"},
    }
    return merge(config, overrides)


def write_config(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Running training processes


@pytest.fixture(scope="module")
def forkserver():
    return engine_forkserver()


def _train_process(config_path: str, fault: tuple[str, int] | None) -> None:
    """Run `finetune.train.main` on `config_path` and exit with its code (target of a forked process).

    `fault` injects one failure right after the N-th forward/backward pass of this process: ("kill", N) sends
    the process SIGKILL, and ("nan", N) makes the loss returned to the loop for that micro-batch NaN.
    """
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    # One intra-op thread: the micro model gains nothing from more, and on a busy 2-core machine OpenMP
    # threads waiting for each other made a 16-step run about 5 times slower (11 s instead of 2.4 s, measured
    # with other jobs running).
    torch.set_num_threads(1)
    from finetune import train

    if fault is not None:
        kind, at_call = fault
        original = train.FineTuneRecipe._forward_backward
        calls = 0

        def forward_backward_with_fault(self, *args, **kwargs):
            nonlocal calls
            loss = original(self, *args, **kwargs)
            calls += 1
            if calls == at_call and kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if calls == at_call and kind == "nan":
                loss = loss * float("nan")
            return loss

        train.FineTuneRecipe._forward_backward = forward_backward_with_fault
    sys.exit(train.main([config_path]))


def start_training(forkserver, config_path: Path, fault: tuple[str, int] | None = None):
    process = forkserver.Process(target=_train_process, args=(str(config_path), fault))
    process.start()
    return process


def run_training(forkserver, config_path: Path, fault: tuple[str, int] | None = None) -> int:
    """Run one training process to its end; return its exit code (negative: killed by that signal)."""
    process = start_training(forkserver, config_path, fault)
    process.join(RUN_TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"training on {config_path} did not finish within {RUN_TIMEOUT} s")
    return process.exitcode


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / runlog.EXPORT_DIR / "model.safetensors"))


def different_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    """Return the names of tensors that are missing or not bit-identical."""
    names = sorted(set(expected) | set(actual))
    return [name for name in names if name not in expected or name not in actual or not torch.equal(expected[name], actual[name])]


def run_starts(run_dir: Path) -> list[dict]:
    return [event for event in runlog.read_events(run_dir) if event["event"] == "run_start"]


def run_end(run_dir: Path) -> dict:
    return [event for event in runlog.read_events(run_dir) if event["event"] == "run_end"][-1]


class Baselines:
    """Uninterrupted runs, one per config variant, computed once per module and reused by the tests."""

    def __init__(self, forkserver, assets: Path, root: Path):
        self.forkserver = forkserver
        self.assets = assets
        self.root = root
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, name: str, **overrides) -> dict[str, torch.Tensor]:
        if name not in self.weights:
            run_dir = self.root / name / "run"
            config_path = write_config(micro_config(self.assets, run_dir, **overrides), self.root / name / "config.yaml")
            code = run_training(self.forkserver, config_path)
            assert code == runlog.EXIT_COMPLETED, f"baseline {name} exited with {code}"
            self.weights[name] = exported_weights(run_dir)
        return self.weights[name]


@pytest.fixture(scope="module")
def baselines(forkserver, assets, tmp_path_factory) -> Baselines:
    return Baselines(forkserver, assets, tmp_path_factory.mktemp("baselines"))


def interrupt_and_resume(forkserver, config: dict, config_path: Path, kill_after: list[int]) -> Path:
    """Run `config`, killing the process after each count of micro-batches in `kill_after`, then finish it."""
    write_config(config, config_path)
    for count in kill_after:
        code = run_training(forkserver, config_path, fault=("kill", count))
        assert code == -signal.SIGKILL, f"the run was to be killed after {count} micro-batches, but exited with {code}"
    code = run_training(forkserver, config_path)
    assert code == runlog.EXIT_COMPLETED
    return Path(config["output"]["run_dir"])


# ---------------------------------------------------------------------------------------------------------------
# Exact resume at chosen places


def test_uninterrupted_runs_identical(forkserver, assets, baselines, tmp_path):
    # Exactness claims below rest on this: two uninterrupted runs give identical weights.
    run_dir = tmp_path / "run"
    code = run_training(forkserver, write_config(micro_config(assets, run_dir), tmp_path / "config.yaml"))
    assert code == runlog.EXIT_COMPLETED
    assert different_tensors(baselines.get("full"), exported_weights(run_dir)) == []


@pytest.mark.parametrize("kill_after", [[5], [11], [3, 5, 4]], ids=["epoch1", "epoch2", "three_times"])
def test_full_finetune_resume_exact(forkserver, assets, baselines, tmp_path, kill_after):
    config = micro_config(assets, tmp_path / "run")
    run_dir = interrupt_and_resume(forkserver, config, tmp_path / "config.yaml", kill_after)
    assert different_tensors(baselines.get("full"), exported_weights(run_dir)) == []
    resumed = [event["resumed_from"] for event in run_starts(run_dir)]
    assert resumed[0] is None
    assert all(path is not None for path in resumed[1:])
    assert len(resumed) == len(kill_after) + 1


def test_resume_continues_mid_epoch(forkserver, assets, tmp_path):
    # Killed after micro-batch 11 (epoch 2, step 11): the newest checkpoint is step 10, so the resumed run
    # starts at step 10 with 2 of epoch 2's 8 batches done, and logs steps 11 to 16 only.
    config = micro_config(assets, tmp_path / "run")
    run_dir = interrupt_and_resume(forkserver, config, tmp_path / "config.yaml", [11])
    second = run_starts(run_dir)[1]
    assert Path(second["resumed_from"]).name == "checkpoint-10"
    assert second["step"] == 10
    assert second["epoch"] == 1.25
    events = runlog.read_events(run_dir)
    resumed_index = events.index(second)
    train_steps = [event["step"] for event in events[resumed_index:] if event["event"] == "train"]
    assert train_steps == list(range(11, 17))


def test_resume_with_larger_batch_rejected(forkserver, assets, tmp_path):
    # Killed after micro-batch 7 of 8 (batch 4): checkpoint-6 is 6 micro-batches into epoch 1, past the end of
    # an epoch of batch 8, which has 4. The resumed run must stop instead of checkpointing step 6 forever.
    config = micro_config(assets, tmp_path / "run")
    config_path = write_config(config, tmp_path / "config.yaml")
    assert run_training(forkserver, config_path, fault=("kill", 7)) == -signal.SIGKILL
    larger = merge(config, {"training__per_device_train_batch_size": 8})
    assert run_training(forkserver, write_config(larger, config_path)) == runlog.EXIT_CONFIG_ERROR
    error = run_end(tmp_path / "run")["error"]
    assert "stopped after micro-batch 6 of epoch 1" in error
    assert "has 4 micro-batches per process" in error


def test_resume_keeps_learning_rate(forkserver, assets, tmp_path):
    # Killed during step 7 with checkpoints every 4 steps: steps 5 and 6 run again after resuming from
    # checkpoint-4, and must log the same learning rate both times.
    config = micro_config(assets, tmp_path / "run", checkpoint={"save_steps": 4})
    run_dir = interrupt_and_resume(forkserver, config, tmp_path / "config.yaml", [7])
    rates = {}
    for event in runlog.read_events(run_dir):
        if event["event"] == "train":
            rates.setdefault(event["step"], []).append(event["learning_rate"])
    assert sorted(rates) == list(range(1, 17))
    assert len(rates[5]) == 2
    assert rates[5][0] == rates[5][1]
    assert rates[6][0] == rates[6][1]


@pytest.mark.parametrize("kill_after", [[6], [11]], ids=["before_unfreeze", "after_unfreeze"])
def test_unfreeze_resume_exact(forkserver, assets, baselines, tmp_path, kill_after):
    # The head trains alone in epoch 1 (steps 1-8). From step 9 on everything trains, with layer-wise rates
    # and a 2-step warm-up of the newly unfrozen groups.
    schedule = {"preset": "freeze_then_unfreeze", "freeze_epochs": 1, "layer_decay": 0.7, "unfreeze_warmup_steps": 2}
    expected = baselines.get("unfreeze", schedule=schedule)
    config = micro_config(assets, tmp_path / "run", schedule=schedule, checkpoint={"save_steps": 3})
    run_dir = interrupt_and_resume(forkserver, config, tmp_path / "config.yaml", kill_after)
    assert different_tensors(expected, exported_weights(run_dir)) == []
    stages = [event["stage"] for event in runlog.read_events(run_dir) if event["event"] == "stage"]
    assert stages[-1] == 1


def test_accumulation_resume_mid_group(forkserver, assets, baselines, tmp_path):
    # With batches of 2 examples and 3 micro-batches per step, an epoch's 16 micro-batches make steps of 3,
    # 3, 3, 3, 3 and 1. The kill after 8 micro-batches lands after the second of step 3's three micro-batches,
    # and the resume replays them from checkpoint-2.
    training = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}
    expected = baselines.get("accumulation", training=training)
    config = micro_config(assets, tmp_path / "run", training=training, checkpoint={"save_steps": 1})
    run_dir = interrupt_and_resume(forkserver, config, tmp_path / "config.yaml", [8])
    assert different_tensors(expected, exported_weights(run_dir)) == []
    assert Path(run_starts(run_dir)[1]["resumed_from"]).name == "checkpoint-2"


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16, which finetune requires for bf16")
def test_bf16_resume_exact(forkserver, assets, baselines, tmp_path):
    training = {"mixed_precision": "bf16"}
    expected = baselines.get("bf16", training=training)
    config = micro_config(assets, tmp_path / "run", training=training)
    run_dir = interrupt_and_resume(forkserver, config, tmp_path / "config.yaml", [12])
    assert different_tensors(expected, exported_weights(run_dir)) == []
    assert different_tensors(baselines.get("full"), expected) != []  # bf16 really changed the arithmetic


# ---------------------------------------------------------------------------------------------------------------
# Kills and stops from outside


def newest_step(run_dir: Path) -> int:
    # Names only: a running process may delete an old checkpoint between listing and reading it.
    steps = [checkpoint_step(path) for path in list_complete(run_dir / runlog.CHECKPOINTS_DIR)]
    return max(steps, default=0)


def incomplete_visible(run_dir: Path) -> list[str]:
    """Return the names of visible checkpoint folders that are not complete."""
    folder = run_dir / runlog.CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return [child.name for child in folder.iterdir() if child.name.startswith("checkpoint-") and not is_complete(child)]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.001)
    return False


CHAOS = {"training": {"num_train_epochs": 8}, "checkpoint": {"save_steps": 1, "save_total_limit": 2}}


@pytest.mark.slow
def test_sigkill_chaos_resume_exact(forkserver, assets, baselines, tmp_path):
    # 8 epochs of 8 steps with a checkpoint after every step. Each cycle starts (or resumes) the run, waits
    # for one new checkpoint, then kills it: on even cycles while a checkpoint is being written, on odd
    # cycles after a random delay. The run must then finish with the uninterrupted run's weights.
    expected = baselines.get("chaos", **CHAOS)
    run_dir = tmp_path / "run"
    checkpoints = run_dir / runlog.CHECKPOINTS_DIR
    config_path = write_config(micro_config(assets, run_dir, **CHAOS), tmp_path / "config.yaml")
    rng = random.Random(20)
    kills = kills_during_write = 0
    while kills < 22:
        start_step = newest_step(run_dir)
        process = start_training(forkserver, config_path)
        try:
            assert wait_for(lambda: newest_step(run_dir) > start_step or not process.is_alive(), RUN_TIMEOUT)
            assert process.is_alive(), f"the run ended after {kills} kills with exit code {process.exitcode}"
            if kills % 2 == 0:
                kills_during_write += wait_for(lambda: any(checkpoints.glob(".tmp-checkpoint-*")), 30)
                time.sleep(rng.uniform(0, 0.003))
            else:
                time.sleep(rng.uniform(0, 0.08))
            process.kill()
        finally:
            process.join(30)
        assert process.exitcode == -signal.SIGKILL
        kills += 1
        assert incomplete_visible(run_dir) == [], f"after kill {kills}"

    assert run_training(forkserver, config_path) == runlog.EXIT_COMPLETED
    assert different_tensors(expected, exported_weights(run_dir)) == []
    assert kills_during_write >= 8
    assert len(run_starts(run_dir)) == kills + 1
    remaining = sorted(checkpoints.iterdir())
    assert [path.name for path in remaining if not is_complete(path)] == []
    for path in remaining:
        assert load_file(str(path / "model.safetensors"))


def test_sigterm_stops_then_resumes(forkserver, assets, baselines, tmp_path):
    expected = baselines.get("full")
    run_dir = tmp_path / "run"
    config_path = write_config(micro_config(assets, run_dir), tmp_path / "config.yaml")
    process = start_training(forkserver, config_path)
    try:
        assert wait_for(lambda: newest_step(run_dir) >= 2 or not process.is_alive(), RUN_TIMEOUT)
        process.terminate()  # SIGTERM
    finally:
        process.join(RUN_TIMEOUT)
    assert process.exitcode == runlog.EXIT_STOPPED
    end = run_end(run_dir)
    assert end["status"] == "stopped"
    stopped_step = end["step"]
    assert stopped_step < 16
    assert newest_step(run_dir) == stopped_step
    assert not (run_dir / runlog.EXPORT_DIR).exists()

    assert run_training(forkserver, config_path) == runlog.EXIT_COMPLETED
    assert Path(run_starts(run_dir)[1]["resumed_from"]).name == f"checkpoint-{stopped_step}"
    assert different_tensors(expected, exported_weights(run_dir)) == []


# ---------------------------------------------------------------------------------------------------------------
# Best model


def best_overrides(eval_steps: int) -> dict:
    return {
        "training": {"eval_strategy": "steps", "eval_steps": eval_steps, "metric_for_best_model": "loss"},
        "checkpoint": {"save_steps": 3, "save_total_limit": 1},
        "output": {"export": "best"},
    }


def best_checkpoint(run_dir: Path) -> Path:
    marked = [path for path in list_complete(run_dir / runlog.CHECKPOINTS_DIR) if read_checkpoint_record(path)["is_best"]]
    return marked[-1]


# With eval_steps 8 every evaluation falls on an epoch end, where the loop saves the same step a second time.
@pytest.mark.parametrize("eval_steps", [2, 8])
def test_best_export_equals_checkpoint(forkserver, assets, baselines, tmp_path, eval_steps):
    expected = baselines.get(f"best_every_{eval_steps}", **best_overrides(eval_steps))
    run_dir = tmp_path / "run"
    config = micro_config(assets, run_dir, **best_overrides(eval_steps))
    run_dir = interrupt_and_resume(forkserver, config, tmp_path / "config.yaml", [7])
    exported = exported_weights(run_dir)
    best = best_checkpoint(run_dir)
    assert different_tensors(load_file(str(best / "model.safetensors")), exported) == []
    assert different_tensors(expected, exported) == []

    losses = [(event["loss"], event["step"]) for event in runlog.read_events(run_dir)
              if event["event"] == "eval" and event["split"] == "validation"]
    lowest = min(loss for loss, _ in losses)
    first_lowest_step = min(step for loss, step in losses if loss == lowest)
    assert read_checkpoint_record(best)["step"] == first_lowest_step
    assert run_end(run_dir)["best_step"] == first_lowest_step


# ---------------------------------------------------------------------------------------------------------------
# Two processes


def launch(config_path: Path, processes: int) -> subprocess.CompletedProcess:
    """Run `finetune.train` to its end with `processes` CPU processes under `accelerate launch`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if processes == 1:
        command = [sys.executable, "-m", "finetune.train", str(config_path)]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no",
            "-m", "finetune.train", str(config_path),
        ]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, cwd=REPO)


def copy_checkpoint(source: Path, run_dir: Path) -> Path:
    target = run_dir / runlog.CHECKPOINTS_DIR / source.name
    shutil.copytree(source, target)
    return target


@pytest.mark.slow
def test_two_process_checkpoint_resumes(assets, tmp_path):
    # With 2 processes each epoch has 4 steps of 2 x 4 examples; checkpoint-2 is the middle of epoch 1.
    original = tmp_path / "two" / "run"
    config = micro_config(assets, original, checkpoint={"save_total_limit": 10})
    result = launch(write_config(config, tmp_path / "two" / "config.yaml"), processes=2)
    assert result.returncode == runlog.EXIT_COMPLETED, result.stderr[-3000:]
    saved = original / runlog.CHECKPOINTS_DIR / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {child.name for child in saved.iterdir()}
    assert read_checkpoint_record(saved)["fingerprint"]["world_size"] == 2

    resumed_two = tmp_path / "again_two" / "run"
    copy_checkpoint(saved, resumed_two)
    config = micro_config(assets, resumed_two, checkpoint={"save_total_limit": 10})
    result = launch(write_config(config, tmp_path / "again_two" / "config.yaml"), processes=2)
    assert result.returncode == runlog.EXIT_COMPLETED, result.stderr[-3000:]
    assert run_starts(resumed_two)[0]["resumed_from"].endswith("checkpoint-2")
    assert different_tensors(exported_weights(original), exported_weights(resumed_two)) == []

    resumed_one = tmp_path / "again_one" / "run"
    copy_checkpoint(saved, resumed_one)
    config = micro_config(assets, resumed_one, checkpoint={"save_total_limit": 10})
    result = launch(write_config(config, tmp_path / "again_one" / "config.yaml"), processes=1)
    assert result.returncode == runlog.EXIT_COMPLETED, result.stderr[-3000:]
    # Alone, the process continues after the 2 x 2 batches both processes had done: 4 more steps finish
    # epoch 1 and 8 steps make epoch 2, so the run ends after step 14 of its 16-step budget.
    start = run_starts(resumed_one)[0]
    assert start["resumed_from"].endswith("checkpoint-2")
    assert start["world_size"] == 1
    assert start["step"] == 2
    assert start["epoch"] == 0.5
    train_steps = [event["step"] for event in runlog.read_events(resumed_one) if event["event"] == "train"]
    assert train_steps == list(range(3, 15))
    assert run_end(resumed_one)["status"] == "completed"


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss and early stopping in real runs


def test_nan_loss_stops_run(forkserver, assets, tmp_path):
    # The loss of micro-batch 7 (step 7) becomes NaN; checkpoints exist for steps 2, 4 and 6.
    run_dir = tmp_path / "run"
    config_path = write_config(micro_config(assets, run_dir, checkpoint={"save_total_limit": 10}), tmp_path / "c.yaml")
    assert run_training(forkserver, config_path, fault=("nan", 7)) == runlog.EXIT_FAILED
    end = run_end(run_dir)
    assert end["status"] == "failed"
    assert "training loss is nan at optimizer step 7;" in end["error"]
    assert newest_step(run_dir) == 6
    assert incomplete_visible(run_dir) == []


def test_nan_loss_skips_step(forkserver, assets, tmp_path):
    run_dir = tmp_path / "run"
    config = micro_config(assets, run_dir, training={"nan_policy": "skip"})
    assert run_training(forkserver, write_config(config, tmp_path / "c.yaml"), fault=("nan", 7)) == runlog.EXIT_COMPLETED
    train_losses = {event["step"]: event["loss"] for event in runlog.read_events(run_dir) if event["event"] == "train"}
    assert train_losses[7] == "nan"
    assert sorted(train_losses) == list(range(1, 17))
    assert run_end(run_dir)["status"] == "completed"


def test_early_stopping_ends_run(forkserver, assets, tmp_path):
    # No later evaluation can beat the first by the threshold of 10, so patience 1 ends the run at the second.
    run_dir = tmp_path / "run"
    training = {"eval_strategy": "steps", "eval_steps": 2, "metric_for_best_model": "loss",
                "early_stopping_patience": 1, "early_stopping_threshold": 10.0}
    config = micro_config(assets, run_dir, training=training, output={"export": "best"})
    assert run_training(forkserver, write_config(config, tmp_path / "c.yaml")) == runlog.EXIT_COMPLETED
    end = run_end(run_dir)
    assert end["status"] == "early_stopped"
    assert end["step"] == 4
    assert end["best_metric"] == "loss"
    assert (run_dir / runlog.EXPORT_DIR / "model.safetensors").is_file()
