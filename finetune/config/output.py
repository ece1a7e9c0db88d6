"""The `checkpoint`, `output` and `tracking` sections: what a run writes and where."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ConfigIssue, Section


class CheckpointConfig(Section):
    save_steps: int | None = Field(None, ge=1, description="Write a checkpoint every this many optimizer steps; null only at epoch ends.")
    save_every_epoch: bool = Field(True, description="Write a checkpoint at the end of every epoch.")
    save_total_limit: int = Field(2, ge=1, description="Keep this many newest checkpoints, plus the best one.")
    resume: str = Field(
        "auto",
        description="auto: continue from the newest complete checkpoint in the run folder; never; or the path of "
        "a checkpoint folder, or of a run folder whose newest checkpoint is used.",
    )

    def problems(self) -> list[ConfigIssue]:
        if self.save_steps is None and not self.save_every_epoch:
            return [
                ConfigIssue(
                    "checkpoint.save_every_epoch", False, "with save_steps null no checkpoint is ever written.",
                    "set save_steps or save_every_epoch: true.",
                )
            ]
        return []


class OutputConfig(Section):
    run_dir: str | None = Field(
        None, description="Run folder (config, metrics.jsonl, checkpoints, export); null uses runs/<run name>."
    )
    export: Literal["best", "final"] = Field(
        "best", description="Export the best model by metric_for_best_model, or the final weights."
    )


class TrackingConfig(Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]] = Field(
        default_factory=list, description="Accelerate trackers that also receive the metrics (installed separately)."
    )
    project_name: str = Field("finetune", description="Project or experiment name given to the trackers.")
