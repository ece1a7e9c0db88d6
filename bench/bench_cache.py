"""Benchmark: a linear-probe epoch through the frozen MiniLM encoder against an epoch on cached features.

Usage: `python bench/bench_cache.py [--examples 2000] [--batch-size 32] [--cached-epochs 50]`

Uses the offline assets: all-MiniLM-L6-v2 (22.7M parameters) with a new 2-class head, and Rotten Tomatoes
reviews (fresh/rotten, deduplicated, a seeded sample). Both runs use the same ScheduleController
(`linear_probe`, frozen groups in eval mode) and AdamW; tokenisation is done beforehand and not timed.
The uncached epoch runs every batch through the encoder. The cached run computes the head's inputs once (timed
separately) and then trains the classifier on them for `--cached-epochs` epochs, and reports their mean.
Prints one line per measurement and the speed-up ratio; timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.optim.lr_scheduler import LambdaLR  # noqa: E402

from finetune.assets import minilm_model_dir, rotten_tomatoes_csv  # noqa: E402
from finetune.config import ScheduleConfig, TrainingConfig  # noqa: E402
from finetune.features import CachedHead, cache_head_inputs, feature_dataloader  # noqa: E402
from finetune.groups import discover_layer_groups  # noqa: E402
from finetune.schedule import ScheduleController  # noqa: E402


def load_reviews(count: int, seed: int) -> tuple[list[str], list[int]]:
    frame = pd.read_csv(rotten_tomatoes_csv())
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.sample(n=count, random_state=seed)
    return frame["text"].tolist(), (frame["category"] == "fresh").astype(int).tolist()


def tokenised_batches(tokenizer, texts: list[str], labels: list[int], batch_size: int) -> list[dict]:
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start:start + batch_size], truncation=True, max_length=128, padding=True, return_tensors="pt"
        )
        encoded["labels"] = torch.tensor(labels[start:start + batch_size])
        batches.append(dict(encoded))
    return batches


def build(model_dir: Path, steps_per_epoch: int):
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    controller = ScheduleController(
        model, discover_layer_groups(model), ScheduleConfig(preset="linear_probe"),
        TrainingConfig(learning_rate=1e-3), steps_per_epoch, steps_per_epoch,
    )
    optimizer = torch.optim.AdamW(controller.optimizer_param_groups())
    scheduler = LambdaLR(optimizer, controller.lr_lambdas(lambda step: 1.0))
    return model, controller, optimizer, scheduler


def time_uncached_epoch(model, controller, optimizer, scheduler, batches: list[dict]) -> float:
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        controller.update(step, 0)
        model.train()
        controller.set_modes(model)
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_cached_epochs(head: CachedHead, controller, optimizer, scheduler, features, labels, batch_size, epochs):
    head.train()
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        for batch in feature_dataloader(features, labels, batch_size, seed=epoch):
            controller.update(step, epoch)
            loss, _ = head.loss_and_logits(batch)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="Reviews in the training epoch.")
    parser.add_argument("--batch-size", type=int, default=32, help="Examples per optimizer step.")
    parser.add_argument("--cached-epochs", type=int, default=50, help="Cached epochs averaged for the cached time.")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads for both runs; default: torch's choice. On a busy machine 1 avoids "
        "OpenMP threads waiting on each other, which can slow tiny head steps 50-fold.",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model_dir = minilm_model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts, labels = load_reviews(args.examples, seed=0)
    batches = tokenised_batches(tokenizer, texts, labels, args.batch_size)
    print(f"MiniLM linear probe, {len(texts)} reviews, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    model, controller, optimizer, scheduler = build(model_dir, len(batches))
    uncached = time_uncached_epoch(model, controller, optimizer, scheduler, batches)
    print(f"uncached frozen epoch: {uncached:.2f} s")

    model, controller, optimizer, scheduler = build(model_dir, len(batches))
    head = CachedHead.from_model(model, controller.groups)
    start = time.perf_counter()
    features, cached_labels = cache_head_inputs(model, head.module, batches)
    caching = time.perf_counter() - start
    print(f"one-off feature caching: {caching:.2f} s, features {tuple(features.shape)}")
    cached = time_cached_epochs(
        head, controller, optimizer, scheduler, features, cached_labels, args.batch_size, args.cached_epochs
    )
    print(f"cached epoch (mean of {args.cached_epochs}): {cached * 1000:.1f} ms")
    print(f"speed-up per epoch: {uncached / cached:.0f}x")


if __name__ == "__main__":
    main()
