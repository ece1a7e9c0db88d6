"""The `schedule` section: which layer groups train when, and at what learning rate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ConfigIssue, Section

Preset = Literal["full", "linear_probe", "freeze_then_unfreeze", "gradual", "milestones"]


class StageConfig(Section):
    """One stage of a `milestones` schedule; it starts where the previous one ends and the last one runs to the end."""

    until_epoch: int | None = Field(
        None, ge=1, description="The stage ends after this many epochs, counted from the start of the run."
    )
    until_step: int | None = Field(
        None, ge=1, description="The stage ends after this many optimizer steps, counted from the start of the run."
    )
    train: str | list[str] = Field(
        "all",
        description="Groups that train: 'head', 'all', 'top:K' (head plus the K groups below it), "
        "'slice:A:B' (group indices), or a list of group-name patterns.",
    )
    learning_rate: float | None = Field(
        None, gt=0.0,
        description="Peak rate of the group below the head in this stage (the head gets it times head_lr_multiplier, "
        "lower groups decay from it); null keeps training.learning_rate.",
    )


class ScheduleConfig(Section):
    preset: Preset = Field(
        "full",
        description="full: everything trains. linear_probe: only the head. freeze_then_unfreeze: head for "
        "freeze_epochs, then all groups (layer_decay below 1 makes their rates discriminative). gradual: one more "
        "group, top-down, every unfreeze_every_epochs/steps. milestones: `stages`.",
    )
    freeze_epochs: int = Field(1, ge=1, description="Head-only epochs before unfreezing, for freeze_then_unfreeze.")
    unfreeze_every_epochs: int | None = Field(
        1, ge=1, description="gradual: unfreeze one more group every this many epochs."
    )
    unfreeze_every_steps: int | None = Field(
        None, ge=1, description="gradual: unfreeze one more group every this many optimizer steps (overrides epochs)."
    )
    stages: list[StageConfig] | None = Field(None, description="The stages of a milestones schedule, in order.")
    layer_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="Each group's rate is the one above it times this; below 1 keeps bottom layers closer to pretrained."
    )
    head_lr_multiplier: float = Field(1.0, gt=0.0, description="The head's rate is learning_rate times this.")
    unfreeze_warmup_steps: int = Field(
        0, ge=0, description="A newly unfrozen group's rate ramps linearly from 0 over this many optimizer steps."
    )
    train_bn: bool = Field(
        False, description="Whether BatchNorm layers inside frozen groups update their running statistics and weights."
    )
    frozen_mode: Literal["eval", "train"] = Field(
        "eval", description="Mode of frozen groups: eval disables their dropout (faster, deterministic), train keeps it."
    )
    cache_features: Literal["auto", "true", "false"] = Field(
        "auto",
        description="Compute a frozen backbone's features once and train the head on them; auto does so when "
        "nothing below the head trains and inputs are not augmented.",
    )

    def problems(self) -> list[ConfigIssue]:
        issues = []
        if self.preset == "milestones" and not self.stages:
            issues.append(
                ConfigIssue("schedule.stages", self.stages, "is required by the milestones preset.", "list the stages.")
            )
        if self.preset != "milestones" and self.stages:
            issues.append(
                ConfigIssue(
                    "schedule.stages", f"{len(self.stages)} stage(s)", f"are ignored by preset '{self.preset}'.",
                    "set schedule.preset to 'milestones' or remove schedule.stages.",
                )
            )
        for index, stage in enumerate(self.stages or []):
            if (stage.until_epoch is None) == (stage.until_step is None) and index < len(self.stages) - 1:
                issues.append(
                    ConfigIssue(
                        f"schedule.stages.{index}", stage.model_dump(), "needs exactly one of until_epoch and until_step.",
                        "give every stage but the last an until_epoch or an until_step.",
                    )
                )
            if not _train_names_something(stage.train):
                # Nothing would require a gradient, so the stage's first backward pass would raise mid-run.
                issues.append(
                    ConfigIssue(
                        f"schedule.stages.{index}.train", stage.train, "names no layer group, so nothing would train.",
                        "use 'head', 'all', 'top:K', 'slice:A:B' or a list of group-name patterns.",
                    )
                )
        if self.preset == "gradual" and self.unfreeze_every_epochs is None and self.unfreeze_every_steps is None:
            issues.append(
                ConfigIssue(
                    "schedule.unfreeze_every_epochs", None, "gradual needs a pace.",
                    "set unfreeze_every_epochs or unfreeze_every_steps.",
                )
            )
        if self.cache_features == "true" and self.preset not in ("linear_probe",):
            issues.append(
                ConfigIssue(
                    "schedule.cache_features", "true", f"needs a frozen backbone, but preset '{self.preset}' trains it.",
                    "use preset linear_probe, or set cache_features to auto.",
                )
            )
        return issues


def _train_names_something(train: str | list[str]) -> bool:
    patterns = [train] if isinstance(train, str) else train
    return any(pattern.strip() for pattern in patterns)
