"""The `training` section: optimisation, precision, evaluation and stopping. Names follow transformers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ConfigIssue, Section


class TrainingConfig(Section):
    num_train_epochs: int = Field(3, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps, before the last epoch if need be."
    )
    per_device_train_batch_size: int = Field(
        16, ge=1, description="Examples per forward pass on each process; more uses more memory."
    )
    per_device_eval_batch_size: int = Field(64, ge=1, description="Examples per evaluation forward pass on each process.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches summed into one optimizer step; the effective batch grows by this factor."
    )
    learning_rate: float = Field(5e-5, gt=0.0, description="Peak learning rate of the top backbone group; the head gets it times schedule.head_lr_multiplier.")
    weight_decay: float = Field(
        0.01, ge=0.0, description="AdamW decoupled weight decay; never applied to biases or norm weights."
    )
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW first-moment decay.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW second-moment decay.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW denominator epsilon.")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warm-up: linear or cosine to 0, or constant."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up from 0; set this or warmup_ratio, not both.")
    warmup_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="Warm-up as a share of all optimizer steps, used when warmup_steps is 0."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the global gradient norm (on unscaled gradients) to this; null disables."
    )
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        "auto",
        description="Autocast precision: auto picks bf16 where the CPU or GPU supports it, fp16 on older GPUs, "
        "else fp32. bf16 requested where unsupported is an error.",
    )
    seed: int = Field(42, description="Seed for weights of new heads, dropout and data order.")
    logging_steps: int = Field(10, ge=1, description="Write a train event to metrics.jsonl every this many optimizer steps.")
    eval_strategy: Literal["epoch", "steps", "no"] = Field(
        "epoch", description="When to evaluate on validation data: each epoch end, every eval_steps, or never."
    )
    eval_steps: int | None = Field(None, ge=1, description="Optimizer steps between evaluations with eval_strategy steps.")
    metric_for_best_model: str = Field(
        "accuracy", description="Validation metric that picks the best model and drives early stopping (e.g. loss, f1_macro)."
    )
    greater_is_better: bool | None = Field(
        None, description="Direction of metric_for_best_model; null infers it (names containing 'loss' are minimised)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement; null never stops early."
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0.0, description="Smallest change of the metric that counts as an improvement."
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="On a NaN or infinite loss: stop the run (keeping the last checkpoint) or skip that step."
    )
    group_by_length: bool = Field(
        True, description="Batch texts of similar length together to cut padding; order stays seeded and random."
    )
    dataloader_num_workers: int = Field(
        0, ge=0, description="Worker processes that decode and augment data; 0 works in the training process."
    )

    def problems(self) -> list[ConfigIssue]:
        issues = []
        if self.eval_strategy == "steps" and self.eval_steps is None:
            issues.append(
                ConfigIssue("training.eval_steps", None, "is required with eval_strategy 'steps'.", "set eval_steps.")
            )
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            issues.append(
                ConfigIssue(
                    "training.warmup_ratio", self.warmup_ratio, f"contradicts warmup_steps {self.warmup_steps}.",
                    "set only one of warmup_steps and warmup_ratio.",
                )
            )
        if self.early_stopping_patience is not None and self.eval_strategy == "no":
            issues.append(
                ConfigIssue(
                    "training.early_stopping_patience", self.early_stopping_patience,
                    "needs evaluations, but eval_strategy is 'no'.", "set eval_strategy to 'epoch' or 'steps'.",
                )
            )
        return issues
