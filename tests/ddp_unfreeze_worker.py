"""Worker of the 2-process unfreeze test: gradual unfreezing under DDP against a single-process reference.

Run with `accelerate launch --multi_gpu --num_processes 2 tests/ddp_unfreeze_worker.py OUT.json [--no-rewrap]`.
Each rank trains on its half of every global batch of 8; rank 0 also trains a reference model on the whole
batch in one process. Equal halves make DDP's averaged gradient equal to the whole batch's gradient, so the
two runs must agree. Rank 0 writes the findings to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR

from finetune.config import ScheduleConfig, TrainingConfig
from finetune.groups import discover_layer_groups
from finetune.schedule import ScheduleController

STEPS = 8
GLOBAL_BATCH = 8
SCHEDULE = ScheduleConfig(preset="gradual", unfreeze_every_steps=2, layer_decay=0.8)
TRAINING = TrainingConfig(learning_rate=1e-2, weight_decay=0.01)


def build():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    controller = ScheduleController(model, discover_layer_groups(model), SCHEDULE, TRAINING, STEPS, STEPS)
    optimizer = torch.optim.AdamW(controller.optimizer_param_groups())
    scheduler = LambdaLR(optimizer, controller.lr_lambdas(lambda step: 1.0))
    return model, controller, optimizer, scheduler


def global_batch(step: int) -> dict:
    generator = torch.Generator().manual_seed(100 + step)
    return {
        "input_ids": torch.randint(1, 50, (GLOBAL_BATCH, 8), generator=generator),
        "attention_mask": torch.ones(GLOBAL_BATCH, 8, dtype=torch.long),
        "labels": torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
    }


def train_step(model, controller, optimizer, scheduler, batch, step, backward, after_change=None):
    record = controller.update(step, 0)
    if record is not None and after_change is not None:
        model = after_change(model)
    model.train()
    controller.set_modes(model)
    backward(model(**batch).loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return model, record


def main(out_path: str, rewrap: bool) -> None:
    accelerator = Accelerator(cpu=True)
    try:
        run(accelerator, out_path, rewrap)
    finally:
        # Both ranks wait here while rank 0 trains the reference. A rank that exits with the gloo group still
        # open can abort in the group's destructor ("terminate called without an active exception").
        accelerator.wait_for_everyone()
        accelerator.end_training()


def run(accelerator: Accelerator, out_path: str, rewrap: bool) -> None:
    rank, world = accelerator.process_index, accelerator.num_processes
    model, controller, optimizer, scheduler = build()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    model, optimizer = accelerator.prepare(model, optimizer)
    rewrapper = (lambda m: controller.after_change(accelerator, m)) if rewrap else None

    half = GLOBAL_BATCH // world
    records, checksums = [], []
    for step in range(STEPS):
        batch = {key: value[rank * half:(rank + 1) * half] for key, value in global_batch(step).items()}
        model, record = train_step(model, controller, optimizer, scheduler, batch, step, accelerator.backward, rewrapper)
        if record is not None:
            records.append(record["trainable_groups"])
        total = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters()]).sum()
        checksums.append(accelerator.gather(total.reshape(1)).tolist())
    if rank != 0:
        return

    reference = build()
    ref_model = reference[0]
    for step in range(STEPS):
        train_step(*reference, global_batch(step), step, lambda loss: loss.backward())

    trained = dict(accelerator.unwrap_model(model).named_parameters())
    result = {
        "world_size": world,
        "ddp": type(model).__name__,
        "records": records,
        "checksums": checksums,
        "max_diff_vs_reference": max(
            float((trained[name] - p).detach().abs().max()) for name, p in ref_model.named_parameters()
        ),
        "embeddings_changed": not torch.equal(
            trained["bert.embeddings.word_embeddings.weight"], start["bert.embeddings.word_embeddings.weight"]
        ),
        "layer0_changed": not torch.equal(
            trained["bert.encoder.layer.0.output.dense.weight"], start["bert.encoder.layer.0.output.dense.weight"]
        ),
    }
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], rewrap="--no-rewrap" not in sys.argv[2:])
