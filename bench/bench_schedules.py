"""Transfer-learning schedules on real pretrained models: test accuracy and wall time per preset.

    python bench/bench_schedules.py                      # MiniLM on Rotten Tomatoes, EfficientNet-Lite0 on Fashion-MNIST
    python bench/bench_schedules.py --models minilm --train-samples 2000

Each run is a real `finetune train` subprocess with the shipped demo config and overrides; its test accuracy
comes from the run's `metrics.jsonl` (`run_end` event) and its wall time includes data preparation, model
loading, training, evaluation and export. The `linear_probe_random` row shows what pretraining is worth: the
same linear probe on a copy of the backbone with freshly initialised weights (same architecture and processor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from finetune.runlog import read_events

# preset name -> overrides on top of the demo config. Shared settings come from `base_overrides`.
PRESETS = {
    "full": ["schedule.preset=full"],
    "linear_probe": ["schedule.preset=linear_probe", "training.learning_rate=1e-3", "schedule.head_lr_multiplier=1.0"],
    "freeze_then_unfreeze": ["schedule.preset=freeze_then_unfreeze", "schedule.freeze_epochs=1",
                             "schedule.layer_decay=0.8", "schedule.head_lr_multiplier=10", "schedule.unfreeze_warmup_steps=10"],
    "gradual": ["schedule.preset=gradual", "schedule.unfreeze_every_epochs=null", "schedule.layer_decay=0.8",
                "schedule.head_lr_multiplier=10", "schedule.unfreeze_warmup_steps=10"],
}

RANDOM_PROBE = "linear_probe_random"

MODELS = {
    "minilm": {"config": "configs/minilm_rotten_tomatoes.yaml", "steps_per_unfreeze": 8},
    "efficientnet_lite0": {"config": "configs/efficientnet_lite0_fashion_mnist.yaml", "steps_per_unfreeze": 8},
}


def random_copy(config_path: str, folder: Path) -> Path:
    """Write the config's backbone with freshly initialised weights (same architecture and processor) to `folder`."""
    import shutil

    import yaml
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    from finetune.assets import resolve_path

    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    source = Path(resolve_path(raw["model"]["name_or_path"]))
    model_class = (AutoModelForImageClassification if raw["task"] == "image-classification"
                   else AutoModelForSequenceClassification)
    model = model_class.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(folder)
    for item in source.iterdir():  # processor and tokenizer files, not the weights
        if item.is_file() and item.suffix in (".json", ".txt", ".model") and item.name != "config.json":
            shutil.copy(item, folder / item.name)
    return folder


def run_one(model: str, preset: str, args, scratch: Path) -> dict:
    spec = MODELS[model]
    run_dir = scratch / f"{model}-{preset}"
    extra = []
    if preset == RANDOM_PROBE:
        extra = [f"model.name_or_path={random_copy(spec['config'], scratch / f'{model}-random-weights')}"]
    overrides = [
        f"output.run_dir={run_dir}", "checkpoint.resume=never", f"training.num_train_epochs={args.epochs}",
        f"data.max_train_samples={args.train_samples}", f"data.max_eval_samples={args.eval_samples}",
        *PRESETS["linear_probe" if preset == RANDOM_PROBE else preset], *extra,
    ]
    if preset == "gradual":
        overrides.append(f"schedule.unfreeze_every_steps={spec['steps_per_unfreeze']}")
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "finetune.train", spec["config"], *overrides],
        capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{model} {preset} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    end = [event for event in read_events(run_dir) if event["event"] == "run_end"][-1]
    stages = [event for event in read_events(run_dir) if event["event"] == "stage"]
    return {"model": model, "preset": preset, "seconds": seconds, "test_accuracy": end["test"]["accuracy"],
            "test_f1_macro": end["test"]["f1_macro"], "stages": len(stages)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | schedule | test accuracy | macro F1 | stages | wall time (s) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['preset']} | {row['test_accuracy']:.4f} | {row['test_f1_macro']:.4f} | "
                     f"{row['stages']} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--presets", nargs="+", default=[*PRESETS, RANDOM_PROBE], choices=[*PRESETS, RANDOM_PROBE])
    parser.add_argument("--train-samples", type=int, default=2000, help="Training rows per run (default 2000).")
    parser.add_argument("--eval-samples", type=int, default=1000, help="Validation and test rows each (default 1000).")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per run (default 2).")
    parser.add_argument("--scratch", default="runs/bench_schedules", help="Folder for the run folders.")
    parser.add_argument("--output", default="bench/results_schedules.json", help="JSON file for the results.")
    args = parser.parse_args()
    scratch = Path(args.scratch)
    rows = []
    for model in args.models:
        for preset in args.presets:
            rows.append(run_one(model, preset, args, scratch))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    Path(args.output).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(markdown(rows))


if __name__ == "__main__":
    main()
