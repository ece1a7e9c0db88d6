"""Vision benchmark: finetune's engine against a plain Accelerate loop and `transformers.Trainer`, in one run.

    python bench/bench_vision.py            # both cases, 3 repeats; prints Markdown and writes JSON
    python bench/bench_vision.py --quick    # 1 repeat
    python bench/bench_vision.py --cases pipeline --steps 8

Backbone, image size, augmentation, learning rate and precision come from the vision demo config
(`--config`): EfficientNet-Lite0 with ImageNet weights in the folder `finetune convert-efficientnet` writes
(converted first when missing). The images are the first training images of Fashion-MNIST (Debian package
`dataset-fashion-mnist`), read with `finetune.data.idx` and saved once as a `save_to_disk` folder that every
system reads. Each measurement runs in its own process (see `harness.py` for how throughput and peak memory
are measured).

Cases:
- systems: the same model class (transformers' timm wrapper), batch size, image size and DataLoader worker count
  for all three systems. The engine runs its recipe (decoding and augmentation in its DataLoader, evaluation
  and export left out). The plain loop and Trainer decode the images with a `datasets` transform that applies
  the same torchvision v2 augmentation, with the size, interpolation, mean and std of the backbone's processor.
- pipeline: the engine's training DataLoader alone (decoding and augmentation, no model, 4x `--steps` batches)
  against one model step alone (forward, backward and AdamW on one fixed batch) and against engine training,
  for `dataloader_num_workers` 0 and 2. A data loader slower than the model step alone makes the data pipeline
  the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from harness import (
    add_timing_arguments,
    cuda_available,
    log_progress,
    machine_description,
    measure_interleaved,
    measure_repeats,
    ratio_table,
    run_worker,
    throughput,
    time_engine_steps,
    write_report,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "efficientnet_lite0_fashion_mnist.yaml"
BATCH_SIZE = 32
# The engine carves these images out of the subset as its validation split; evaluation is off, so they only
# have to exist. The plain loop and Trainer train on the whole subset.
VALIDATION_IMAGES = 32
PIPELINE_WORKER_COUNTS = (0, 2)
# The data loader alone times this many batches per optimizer step of the other measurements. Up to
# prefetch_factor (2) x num_workers batches are ready before timing starts, and over a short run they would
# inflate its rate.
LOADER_BATCHES_PER_STEP = 4
SEED = 0


# ----------------------------------------------------------------------------------------------------------
# Data and model, shared by the plain loop, Trainer and the model-step worker


def demo_settings(args):
    from finetune.config import load_config

    return load_config(args.config)


def write_image_subset(folder: Path, rows: int) -> Path:
    """Save the first `rows` Fashion-MNIST training images (PNG bytes) and labels as a `save_to_disk` folder."""
    from finetune.assets import fashion_mnist_dir
    from finetune.data.idx import FASHION_MNIST_LABELS, find_idx_files, load_idx_split

    images_path, labels_path = find_idx_files(fashion_mnist_dir(), "train")
    subset = load_idx_split(images_path, labels_path, FASHION_MNIST_LABELS).select(range(rows))
    path = folder / "fashion_mnist_subset"
    subset.save_to_disk(str(path))
    return path


def ensure_model_folder(name_or_path: str) -> str:
    """Return the model to load: a local folder as an absolute path, anything else (a Hub id) unchanged.

    The packaged EfficientNet-Lite0 weights are converted first when the config names the default folder of
    `finetune convert-efficientnet` and it has no model yet. Relative paths start at the working directory.
    """
    from finetune.convert import DEFAULT_OUTPUT_DIR, convert_efficientnet_lite0

    folder = Path(name_or_path)
    if folder.resolve() == Path(DEFAULT_OUTPUT_DIR).resolve() and not (folder / "config.json").is_file():
        from finetune.assets import efficientnet_lite0_weights

        log_progress(f"Converting the EfficientNet-Lite0 weights into {folder}")
        convert_efficientnet_lite0(efficientnet_lite0_weights(), folder)
    return str(folder.resolve()) if folder.is_dir() else name_or_path


def reference_transform(model_dir: str, image_size: int, augmentation):
    """Build the torchvision v2 training transform that a hand-written loop would write for this backbone.

    Interpolation, mean, std and crop ratio come from the backbone's processor (timm's data config), and the
    steps follow the demo config's `data.augmentation`, as the engine's `TrainTransform` does.
    """
    import torch
    from torchvision.transforms import InterpolationMode, v2
    from transformers import AutoImageProcessor

    data_config = AutoImageProcessor.from_pretrained(model_dir).data_config
    interpolation = InterpolationMode(data_config["interpolation"])
    steps = []
    if augmentation.random_resized_crop:
        steps.append(v2.RandomResizedCrop((image_size, image_size), scale=(augmentation.crop_scale_min, 1.0),
                                          interpolation=interpolation, antialias=True))
    else:
        steps += [v2.Resize(int(image_size / data_config["crop_pct"]), interpolation=interpolation),
                  v2.CenterCrop(image_size)]
    if augmentation.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if augmentation.policy == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    elif augmentation.policy == "randaugment":
        steps.append(v2.RandAugment(interpolation=interpolation))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(list(data_config["mean"]), list(data_config["std"]))]
    return v2.Compose(steps)


class BatchTransform:
    """`datasets` transform: greyscale PIL images to normalised [3, H, W] tensors, `label` to `labels`."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        return {"pixel_values": [self.transform(image.convert("RGB")) for image in batch["image"]],
                "labels": batch["label"]}


def collate(examples: list[dict]) -> dict:
    import torch

    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples])}


def reference_dataset(args, settings):
    """Load the subset with the reference transform applied on access (in DataLoader workers when there are any)."""
    import datasets

    dataset = datasets.load_from_disk(args.data)
    image_size = args.image_size or settings.data.image_size
    transform = reference_transform(args.model, image_size, settings.data.augmentation)
    return dataset.with_transform(BatchTransform(transform))


def load_backbone(model_dir: str, label_names: list[str]):
    """Load the backbone with a new head for `label_names`, as the engine does (same class, same arguments)."""
    from transformers import AutoModelForImageClassification

    id2label = dict(enumerate(label_names))
    return AutoModelForImageClassification.from_pretrained(
        model_dir, num_labels=len(label_names), id2label=id2label,
        label2id={name: index for index, name in id2label.items()}, ignore_mismatched_sizes=True,
    )


def accelerate_precision(settings) -> str:
    from finetune.precision import resolve_mixed_precision

    return resolve_mixed_precision(settings.training.mixed_precision)


# ----------------------------------------------------------------------------------------------------------
# Workers: each measures one system in its own process.


def setup_plain(args, num_workers: int):
    """Return the accelerator, model, optimizer, LR scheduler and DataLoader of the plain loop, prepared."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    settings = demo_settings(args)
    set_seed(SEED)
    accelerator = Accelerator(mixed_precision=accelerate_precision(settings))
    dataset = reference_dataset(args, settings)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=num_workers,
                        collate_fn=collate, pin_memory=cuda_available())
    model = load_backbone(args.model, dataset.features["label"].names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.training.learning_rate,
                                  weight_decay=settings.training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    return accelerator, *accelerator.prepare(model, optimizer, scheduler, loader)


def train_step(accelerator, model, optimizer, scheduler, batch: dict) -> None:
    loss = model(**batch).loss
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()  # the engine and Trainer read the loss each step too


def run_plain(args) -> dict:
    """Train with a hand-written Accelerate loop: v2 augmentation in the DataLoader, AdamW, linear decay, clipping."""
    accelerator, model, optimizer, scheduler, loader = setup_plain(args, args.num_workers)
    model.train()
    step_ends: list[float] = []
    while len(step_ends) < args.steps:
        for batch in loader:
            train_step(accelerator, model, optimizer, scheduler, batch)
            step_ends.append(time.perf_counter())
            if len(step_ends) == args.steps:
                break
    return {"samples_per_second": throughput(step_ends, args.warmup, args.batch_size)}


def run_model_step(args) -> dict:
    """Repeat the plain loop's step on one fixed batch, which times the model compute without data loading."""
    accelerator, model, optimizer, scheduler, loader = setup_plain(args, num_workers=0)
    batch = next(iter(loader))
    model.train()
    step_ends: list[float] = []
    for _ in range(args.steps):
        train_step(accelerator, model, optimizer, scheduler, batch)
        step_ends.append(time.perf_counter())
    return {"samples_per_second": throughput(step_ends, args.warmup, args.batch_size)}


def run_trainer(args) -> dict:
    """Train with transformers.Trainer on a `with_transform` dataset and a stacking collator, as HF tutorials do."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    settings = demo_settings(args)
    dataset = reference_dataset(args, settings)
    precision = accelerate_precision(settings)
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        # remove_unused_columns=False: the dataset's columns are `image` and `label`, which the model's forward
        # does not take, so Trainer would drop both before the transform makes `pixel_values` and `labels`.
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=settings.training.learning_rate, weight_decay=settings.training.weight_decay,
            bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda_available(),
            dataloader_num_workers=args.num_workers, remove_unused_columns=False, logging_steps=10**6,
            save_strategy="no", report_to=[], seed=SEED, disable_tqdm=True,
        )
        model = load_backbone(args.model, dataset.features["label"].names)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                          callbacks=[StepClock()])
        trainer.train()
    return {"samples_per_second": throughput(step_ends, args.warmup, args.batch_size)}


def engine_config(args) -> dict:
    """Return the demo config changed to train on the subset for `--steps` steps without evaluation or checkpoints."""
    raw = demo_settings(args).model_dump(mode="json")
    raw["model"]["name_or_path"] = args.model
    raw["data"].update({
        "train": str(args.data), "format": "disk", "validation": None, "test": None,
        "validation_size": VALIDATION_IMAGES, "test_size": 0, "max_train_samples": None, "max_eval_samples": None,
        "image_size": args.image_size or raw["data"]["image_size"], "bad_image_policy": "error",
    })
    raw["training"].update({
        "per_device_train_batch_size": args.batch_size, "max_steps": args.steps, "num_train_epochs": 100,
        "eval_strategy": "no", "logging_steps": 10**6, "dataloader_num_workers": args.num_workers, "seed": SEED,
        "early_stopping_patience": None,
    })
    raw["checkpoint"].update({"save_every_epoch": False, "save_steps": 10**6, "resume": "never"})
    raw["output"].update({"run_dir": str(args.run_dir), "export": "final"})
    raw["tracking"]["report_to"] = []
    return raw


def run_engine(args) -> dict:
    """Run finetune's recipe, timed at the end of each optimizer step. Evaluation and export are left out."""
    step_ends = time_engine_steps(engine_config(args))
    return {"samples_per_second": throughput(step_ends, args.warmup, args.batch_size)}


def run_loader(args) -> dict:
    """Iterate the engine's prepared training DataLoader alone: decoding, augmentation and collation, no model."""
    from finetune.config import validate_config
    from finetune.train import FineTuneRecipe

    recipe = FineTuneRecipe(validate_config(engine_config(args)))
    # NOTE: these are the steps of FineTuneRecipe.setup that the training DataLoader depends on, in its order;
    # the model, optimizer and checkpoint steps are left out. Renaming them in the recipe breaks this worker.
    recipe._setup_accelerator()
    recipe._setup_run_dir()
    recipe._setup_data()
    recipe._setup_dataloaders()
    loader = recipe.accelerator.prepare(recipe.train_loader)
    # The per-epoch seeding that FineTuneRecipe._train_epoch does before it iterates.
    recipe.train_sampler.set_epoch(0)
    loader.set_epoch(0)
    recipe.data.train.set_epoch(0)
    batch_ends: list[float] = []
    try:
        for _ in loader:
            batch_ends.append(time.perf_counter())
            if len(batch_ends) == args.steps * LOADER_BATCHES_PER_STEP:
                break
    finally:
        recipe.cleanup()
    return {"samples_per_second": throughput(batch_ends, args.warmup, args.batch_size)}


WORKERS = {"plain": run_plain, "trainer": run_trainer, "engine": run_engine, "loader": run_loader,
           "model_step": run_model_step}


# ----------------------------------------------------------------------------------------------------------
# Driver


def worker_options(args, data: Path, num_workers: int) -> dict:
    options = {"config": args.config, "model": args.model, "data": data, "batch_size": args.batch_size, "num_workers": num_workers,
               "steps": args.steps, "warmup": args.warmup}
    if args.image_size:
        options["image_size"] = args.image_size
    return options


def systems_case(args, data: Path, scratch: Path) -> dict:
    rows = measure_interleaved(__file__, ["plain", "trainer", "engine"], worker_options(args, data, args.num_workers),
                               args.repeats, scratch / "systems")
    log_progress(f"systems: {rows}")
    return rows


def pipeline_case(args, data: Path, scratch: Path) -> dict:
    """Measure the model step alone once, then the data loader alone and engine training per worker count."""
    result = {"model_step": measure_repeats(__file__, "model_step", worker_options(args, data, 0), args.repeats,
                                            scratch / "pipeline-model_step"),
              "num_workers": {}}
    log_progress(f"pipeline model_step: {result['model_step']}")
    for num_workers in PIPELINE_WORKER_COUNTS:
        rows = {}
        for worker in ("loader", "engine"):
            rows[worker] = measure_repeats(__file__, worker, worker_options(args, data, num_workers), args.repeats,
                                           scratch / f"pipeline-{worker}-{num_workers}")
            log_progress(f"pipeline {worker} with {num_workers} DataLoader workers: {rows[worker]}")
        result["num_workers"][str(num_workers)] = rows
    return result


def run_cases(args) -> dict:
    settings = demo_settings(args)
    args.model = ensure_model_folder(settings.model.name_or_path)
    image_size = args.image_size or settings.data.image_size
    report: dict = {"machine": machine_description(), "config": str(args.config),
                    "model": args.model, "batch_size": args.batch_size, "image_size": image_size,
                    "num_workers": args.num_workers, "steps": args.steps, "warmup": args.warmup,
                    "repeats": args.repeats, "cases": {}}
    # One epoch of the engine's training split covers every measured batch, so no measurement restarts its
    # DataLoader (and its worker processes) mid-run.
    rows = args.batch_size * (args.steps * LOADER_BATCHES_PER_STEP + 1) + VALIDATION_IMAGES
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = write_image_subset(scratch, rows)
        if "systems" in args.cases:
            report["cases"]["systems"] = systems_case(args, data, scratch)
        if "pipeline" in args.cases:
            report["cases"]["pipeline"] = pipeline_case(args, data, scratch)
    return report


def markdown(report: dict) -> str:
    lines = []
    if "systems" in report["cases"]:
        case = f"{report['image_size']} px, num_workers {report['num_workers']}"
        lines += ratio_table({case: report["cases"]["systems"]})
    if "pipeline" in report["cases"]:
        pipeline = report["cases"]["pipeline"]
        model_step = pipeline["model_step"]["samples_per_second"]
        lines += ["", "| dataloader_num_workers | data loader alone (samples/s) | model step alone (samples/s) | "
                  "engine training (samples/s) | loader ÷ model step |", "|---|---|---|---|---|"]
        for num_workers, rows in pipeline["num_workers"].items():
            loader = rows["loader"]["samples_per_second"]
            lines.append(f"| {num_workers} | {loader:.1f} | {model_step:.1f} | "
                         f"{rows['engine']['samples_per_second']:.1f} | {loader / model_step:.2f}x |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["systems", "pipeline"], choices=["systems", "pipeline"])
    parser.add_argument("--config", default=str(DEMO_CONFIG),
                        help="Config whose model, image size, augmentation and optimizer settings all systems use.")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"Images per optimizer step, for every system (default {BATCH_SIZE}).")
    parser.add_argument("--image-size", type=int, default=None,
                        help="Input size in pixels (default: data.image_size of --config).")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="DataLoader worker processes of every system in the systems case (default 1).")
    parser.add_argument("--quick", action="store_true", help="One run per measurement instead of --repeats.")
    add_timing_arguments(parser, list(WORKERS), steps=12, warmup=3, repeats=3, output="bench/results_vision.json")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(WORKERS, args)
        return
    report = run_cases(args)
    write_report(report, args.output)
    print(markdown(report))


if __name__ == "__main__":
    main()
