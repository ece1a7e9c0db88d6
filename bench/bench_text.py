"""Text benchmark: finetune's engine against a plain Accelerate loop and `transformers.Trainer`, in one run.

    python bench/bench_text.py                 # all cases, prints a Markdown table and writes JSON
    python bench/bench_text.py --repeats 1 --steps 8 --cases fixed

Each measurement runs in its own subprocess, so peak memory (max RSS on CPU, max allocated on GPU) belongs to
that system alone. Throughput is samples per second over the optimizer steps after `--warmup` steps, counted
from the end of the last warm-up step to the end of the last step; the table shows the median over
`--repeats` runs and the ratio of the engine to each reference.

Cases:
- fixed: MiniLM, batch 32, every example exactly 128 tokens (real reviews joined, then truncated), so all three
  systems do identical work; precision bf16 where supported (`auto`) and fp32.
- variable: real Rotten Tomatoes reviews (mostly short). The plain loop pads to max_length as hand-written loops
  usually do, Trainer pads per batch (its default collator), the engine pads per batch and groups by length.
- precision: the engine trains one epoch on 2,000 reviews in fp32 and with `auto`, then reports test accuracy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
from harness import (
    add_timing_arguments,
    cuda_available,
    log_progress,
    machine_description,
    measure,
    measure_interleaved,
    ratio_table,
    run_worker,
    throughput,
    time_engine_steps,
    write_report,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH_SIZE = 32
SEQ_LENGTH = 128
LEARNING_RATE = 5e-5


# ----------------------------------------------------------------------------------------------------------
# Data


def reviews() -> pd.DataFrame:
    from finetune.assets import rotten_tomatoes_csv

    frame = pd.read_csv(rotten_tomatoes_csv())
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def write_case_csv(case: str, folder: Path, rows: int) -> Path:
    frame = reviews().head(rows * 10)
    if case == "fixed":
        # Ten reviews joined are far over 128 tokens, so truncation makes every example exactly 128 tokens.
        texts = [" ".join(frame["text"].iloc[i * 10 : i * 10 + 10]) for i in range(rows)]
        labels = frame["category"].iloc[: rows * 10 : 10].tolist()
        frame = pd.DataFrame({"text": texts, "category": labels})
    else:
        frame = frame.head(rows)[["text", "category"]]
    path = folder / f"{case}.csv"
    frame.to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------------------------------------
# Workers: each measures one system in its own process and prints one JSON line.


def tokenized(csv_path: Path, pad_to_max: bool):
    import torch
    from transformers import AutoTokenizer

    from finetune.assets import minilm_model_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_model_dir())
    frame = pd.read_csv(csv_path)
    labels = torch.tensor((frame["category"] == "fresh").astype(int).tolist())
    padding = "max_length" if pad_to_max else False
    encoded = tokenizer(frame["text"].tolist(), truncation=True, max_length=SEQ_LENGTH, padding=padding)
    return tokenizer, encoded, labels


def load_minilm():
    from transformers import AutoModelForSequenceClassification

    from finetune.assets import minilm_model_dir

    return AutoModelForSequenceClassification.from_pretrained(minilm_model_dir(), num_labels=2)


def run_plain(args) -> dict:
    """Measure a hand-written Accelerate loop: fixed-length padding, AdamW, linear decay, clipping."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader, TensorDataset

    set_seed(0)
    accelerator = Accelerator(mixed_precision=args.precision)
    _, encoded, labels = tokenized(Path(args.csv), pad_to_max=True)
    dataset = TensorDataset(torch.tensor(encoded["input_ids"]), torch.tensor(encoded["attention_mask"]), labels)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    model = load_minilm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    step_ends = []
    while len(step_ends) < args.steps:
        for input_ids, attention_mask, batch_labels in loader:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=batch_labels).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the engine and Trainer read the loss each step too
            step_ends.append(time.perf_counter())
            if len(step_ends) == args.steps:
                break
    return {"samples_per_second": throughput(step_ends, args.warmup, BATCH_SIZE)}


def run_trainer(args) -> dict:
    """transformers.Trainer with its defaults for this task (per-batch padding collator, no length grouping)."""
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    tokenizer, encoded, labels = tokenized(Path(args.csv), pad_to_max=False)
    dataset = datasets.Dataset.from_dict({**dict(encoded), "labels": labels.tolist()})
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=BATCH_SIZE, max_steps=args.steps,
            learning_rate=LEARNING_RATE, bf16=args.precision == "bf16", use_cpu=not cuda_available(), logging_steps=10**6,
            save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = Trainer(model=load_minilm(), args=training_args, train_dataset=dataset,
                          data_collator=DataCollatorWithPadding(tokenizer), callbacks=[StepClock()])
        trainer.train()
    return {"samples_per_second": throughput(step_ends, args.warmup, BATCH_SIZE)}


def run_engine(args) -> dict:
    """finetune's recipe, timed at the end of each optimizer step; evaluation and export are left out."""
    step_ends = time_engine_steps(engine_config(args, max_steps=args.steps, run_dir=args.run_dir))
    return {"samples_per_second": throughput(step_ends, args.warmup, BATCH_SIZE)}


def run_engine_accuracy(args) -> dict:
    """A full engine run (training, evaluation, export) for the precision case; returns time and test accuracy."""
    from finetune.config import validate_config
    from finetune.train import FineTuneRecipe

    raw = engine_config(args, max_steps=None, run_dir=args.run_dir)
    raw["training"].update({"num_train_epochs": 1, "eval_strategy": "epoch"})
    raw["data"].update({"validation_size": 300, "test_size": 1000})
    start = time.perf_counter()
    recipe = FineTuneRecipe(validate_config(raw))
    exit_code = recipe.run()
    if exit_code != 0:
        raise RuntimeError(f"engine run failed with exit code {exit_code}")
    return {"seconds": time.perf_counter() - start, "test_accuracy": recipe.test_metrics["accuracy"]}


def engine_config(args, max_steps: int | None, run_dir: str) -> dict:
    precision = {"bf16": "bf16", "no": "no", "auto": "auto"}[args.precision]
    return {
        "name": "bench",
        "task": "text-classification",
        "model": {"name_or_path": "asset:minilm"},
        "data": {"train": args.csv, "text_column": "text", "label_column": "category", "max_length": SEQ_LENGTH,
                 "validation_size": 32, "test_size": 0, "deduplicate": False},
        "training": {"per_device_train_batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "max_steps": max_steps,
                     "num_train_epochs": 100 if max_steps else 1, "mixed_precision": precision, "eval_strategy": "no",
                     "logging_steps": 10**6, "seed": 0, "group_by_length": True},
        "checkpoint": {"save_every_epoch": max_steps is None, "save_steps": None if max_steps is None else 10**6,
                       "resume": "never"},
        "output": {"run_dir": run_dir, "export": "final"},
    }


WORKERS = {"plain": run_plain, "trainer": run_trainer, "engine": run_engine, "engine_accuracy": run_engine_accuracy}


# ----------------------------------------------------------------------------------------------------------
# Driver


def worker_options(csv: Path, precision: str, args) -> dict:
    return {"csv": csv, "precision": precision, "steps": args.steps, "warmup": args.warmup}


def bf16_or_no() -> str:
    from finetune.precision import resolve_mixed_precision

    return resolve_mixed_precision("auto")


def run_cases(args) -> dict:
    report: dict = {"machine": machine_description(), "batch_size": BATCH_SIZE, "seq_length": SEQ_LENGTH,
                    "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "cases": {}}
    auto = bf16_or_no()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for case in args.cases:
            if case == "precision":
                report["cases"][case] = precision_case(scratch, args)
                continue
            csv = write_case_csv(case, scratch, rows=max(BATCH_SIZE * (args.steps + 2), 600))
            precisions = [auto, "no"] if case == "fixed" and auto != "no" else [auto]
            for precision in precisions:
                rows = measure_interleaved(__file__, ["plain", "trainer", "engine"],
                                           worker_options(csv, precision, args), args.repeats,
                                           scratch / f"{case}-{precision}")
                log_progress(f"{case} {precision}: {rows}")
                report["cases"][f"{case}/{precision}"] = rows
    return report


def precision_case(scratch: Path, args) -> dict:
    csv = write_case_csv("variable", scratch, rows=3300)
    results = {}
    for precision in ("no", bf16_or_no()):
        options = {**worker_options(csv, precision, args), "run_dir": scratch / f"precision-{precision}"}
        results[precision] = measure(__file__, "engine_accuracy", options)
        log_progress(f"precision {precision}: {results[precision]}")
    return results


def markdown(report: dict) -> str:
    lines = ratio_table({case: rows for case, rows in report["cases"].items() if case != "precision"})
    if "precision" in report["cases"]:
        lines += ["", "| precision | wall time (s) | test accuracy |", "|---|---|---|"]
        for precision, values in report["cases"]["precision"].items():
            lines.append(f"| {precision} | {values['seconds']:.0f} | {values['test_accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["fixed", "variable", "precision"],
                        choices=["fixed", "variable", "precision"])
    add_timing_arguments(parser, list(WORKERS), steps=16, warmup=4, repeats=3, output="bench/results_text.json")
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(WORKERS, args)
        return
    report = run_cases(args)
    write_report(report, args.output)
    print(markdown(report))


if __name__ == "__main__":
    main()
