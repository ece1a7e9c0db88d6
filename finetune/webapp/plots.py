"""Matplotlib figures of the app: training curves, the stages of a schedule and a confusion matrix.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so the app's threads share no global
figure state and nothing has to be closed.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display on servers; must run before anything imports pyplot

from matplotlib.figure import Figure  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Training curves


def curves_figure(runs: dict[str, list[dict]], metric: str = "accuracy") -> Figure:
    """Plot loss, the validation metric and the learning rate against optimizer steps, one colour per run.

    `runs` maps a run label to its `metrics.jsonl` events. Stage changes are dashed vertical lines, so the
    effect of unfreezing a group shows on every curve.
    """
    figure = Figure(figsize=(11, 3.4), layout="constrained")
    loss_axes, metric_axes, rate_axes = figure.subplots(1, 3)
    colours = matplotlib.colormaps["tab10"].colors
    filled: set = set()
    for index, (label, events) in enumerate(runs.items()):
        colour = colours[index % len(colours)]
        prefix = f"{label} " if len(runs) > 1 else ""
        filled |= _plot_run(events, metric, colour, prefix, (loss_axes, metric_axes, rate_axes))
    loss_axes.set_title("loss")
    metric_axes.set_title(f"validation {metric}")
    rate_axes.set_title("learning rate (top group)")
    for axes in (loss_axes, metric_axes, rate_axes):
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    # Each empty panel names the data it is waiting for. Train events come every training.logging_steps steps
    # and validation events at each evaluation, so a young run can fill one panel before the others.
    waiting = {loss_axes: "no loss logged yet", metric_axes: "no validation yet", rate_axes: "no learning rate logged yet"}
    for axes, note in waiting.items():
        if axes not in filled:
            axes.text(0.5, 0.5, note, ha="center", va="center", transform=axes.transAxes, color="0.4")
    return figure


def _plot_run(events: list[dict], metric: str, colour, prefix: str, axes: tuple) -> set:
    """Draw one run's curves and stage lines, and return the axes that received a curve."""
    loss_axes, metric_axes, rate_axes = axes
    filled = set()
    train = [event for event in events if event.get("event") == "train" and _finite(event.get("loss"))]
    evals = [event for event in events if event.get("event") == "eval" and event.get("split") == "validation"]
    if train:
        loss_axes.plot([e["step"] for e in train], [e["loss"] for e in train], color=colour, alpha=0.6,
                       label=f"{prefix}train")
        filled.add(loss_axes)
    rates = [e for e in train if _finite(e.get("learning_rate"))]
    if rates:
        rate_axes.plot([e["step"] for e in rates], [e["learning_rate"] for e in rates], color=colour, label=prefix.strip() or None)
        filled.add(rate_axes)
    val_loss = [e for e in evals if _finite(e.get("loss"))]
    if val_loss:
        loss_axes.plot([e["step"] for e in val_loss], [e["loss"] for e in val_loss], "o-", color=colour,
                       label=f"{prefix}validation")
        filled.add(loss_axes)
    val_metric = [e for e in evals if _finite(e.get(metric))]
    if val_metric:
        metric_axes.plot([e["step"] for e in val_metric], [e[metric] for e in val_metric], "o-", color=colour,
                         label=prefix.strip() or None)
        filled.add(metric_axes)
    for event in events:
        if event.get("event") == "stage" and event.get("step", 0) > 0:
            for subplot in axes:
                subplot.axvline(event["step"], color=colour, linestyle="--", linewidth=0.8, alpha=0.7)
            loss_axes.annotate(str(event.get("name", event.get("stage"))), (event["step"], 1.0),
                               xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top", ha="right")
    return filled


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# Schedule stages


@dataclass(frozen=True)
class StagePlan:
    """One stage of a schedule as drawn: start and end (in `unit`) and the groups that train."""

    start: float
    end: float
    trainable: tuple[str, ...]
    learning_rate: float


def plan_stages(schedule: dict, training: dict, groups: list[str]) -> tuple[list[StagePlan], str]:
    """Turn a schedule section into stages over `groups` (ordered bottom to top, head last).

    Returns the stages and their unit ("epoch" or "step"). Only the config is read, so the picture is
    available before any model loads. Schedules counted in epochs go through the engine's own
    `finetune.schedule.build_stages`; those counted in steps are drawn from the preset rules here, because
    the number of steps per epoch is unknown until the data is loaded.
    Raises ValueError (pydantic's ValidationError or a ScheduleError) for values the engine rejects.
    """
    stages = schedule.get("stages") or []
    uses_steps = bool(schedule.get("unfreeze_every_steps")) or any(
        isinstance(stage, dict) and stage.get("until_step") for stage in stages
    )
    if uses_steps:
        return _step_stages(schedule, training, groups), "step"
    return _engine_epoch_stages(schedule, training, groups), "epoch"


def _engine_epoch_stages(schedule: dict, training: dict, groups: list[str]) -> list[StagePlan]:
    from ..config import ScheduleConfig, TrainingConfig
    from ..schedule import build_stages

    schedule_config = ScheduleConfig.model_validate(schedule)
    training_config = TrainingConfig.model_validate(training)
    epochs = float(training_config.num_train_epochs)
    # With one "step" per epoch the engine's step boundaries are epoch boundaries.
    built = build_stages(schedule_config, training_config, groups, steps_per_epoch=1)
    plans = []
    for stage in built:
        if stage.start_step >= epochs:
            break  # stages that would start after the last epoch never run
        end = epochs if stage.end_step is None else min(float(stage.end_step), epochs)
        trainable = tuple(groups[index] for index in sorted(stage.trainable))
        plans.append(StagePlan(float(stage.start_step), end, trainable, stage.learning_rate))
    return plans


def _step_stages(schedule: dict, training: dict, groups: list[str]) -> list[StagePlan]:
    rate = float(training.get("learning_rate", 5e-5))
    if schedule.get("preset") == "gradual":
        return _gradual_stages(float(schedule["unfreeze_every_steps"]), rate, groups)
    return _milestone_step_stages(schedule.get("stages") or [], rate, groups)


def _gradual_stages(pace: float, rate: float, groups: list[str]) -> list[StagePlan]:
    # One more group every `pace` steps; the last stage (everything trains) is drawn one pace long.
    return [
        StagePlan(pace * (count - 1), pace * count, tuple(groups[-count:]), rate) for count in range(1, len(groups) + 1)
    ]


def _milestone_step_stages(stages: list[dict], rate: float, groups: list[str]) -> list[StagePlan]:
    plans, start = [], 0.0
    for stage in stages:
        until = stage.get("until_step")
        # A stage without an end (the last one) is drawn half as long again as the schedule so far.
        end = float(until) if until is not None else max(start * 1.5, start + 1)
        trainable = _select_groups(stage.get("train", "all"), groups)
        plans.append(StagePlan(start, end, trainable, float(stage.get("learning_rate") or rate)))
        start = end
    return plans


def _select_groups(spec, groups: list[str]) -> tuple[str, ...]:
    body = groups[:-1]
    if isinstance(spec, list):
        return tuple(name for name in groups if any(fnmatch.fnmatch(name, pattern) for pattern in spec))
    if spec == "all":
        return tuple(groups)
    if spec == "head":
        return tuple(groups[-1:])
    if isinstance(spec, str) and spec.startswith("top:"):
        count = int(spec.split(":")[1])
        return tuple(body[len(body) - count:] if count else []) + tuple(groups[-1:])
    if isinstance(spec, str) and spec.startswith("slice:"):
        _, start, stop = spec.split(":")
        return tuple(groups[int(start):int(stop)])
    return tuple(name for name in groups if fnmatch.fnmatch(name, str(spec)))


def group_rates(groups: list[str], peak: float, layer_decay: float, head_multiplier: float) -> dict[str, float]:
    """Map each group to its learning rate: the head gets `peak * head_multiplier`, the top body group `peak`,
    and each group below it the rate above times `layer_decay`."""
    rates = {groups[-1]: peak * head_multiplier}
    for depth, name in enumerate(reversed(groups[:-1])):
        rates[name] = peak * layer_decay ** depth
    return rates


def schedule_figure(schedule: dict, training: dict, groups: list[str], note: str = "") -> Figure:
    """Draw which groups train in which stage, each bar labelled with the group's learning rate."""
    stages, unit = plan_stages(schedule, training, groups)
    figure = Figure(figsize=(9, 0.35 * len(groups) + 1.6), layout="constrained")
    axes = figure.subplots()
    colours = matplotlib.colormaps["viridis"]
    layer_decay = float(schedule.get("layer_decay", 1.0))
    head_multiplier = float(schedule.get("head_lr_multiplier", 1.0))
    all_rates = [r for s in stages for r in group_rates(groups, s.learning_rate, layer_decay, head_multiplier).values()]
    low, high = math.log10(min(all_rates)), math.log10(max(all_rates))
    for stage in stages:
        rates = group_rates(groups, stage.learning_rate, layer_decay, head_multiplier)
        for row, name in enumerate(groups):
            if name not in stage.trainable:
                continue
            shade = 0.5 if high == low else (math.log10(rates[name]) - low) / (high - low)
            axes.barh(row, stage.end - stage.start, left=stage.start, color=colours(0.15 + 0.7 * shade), edgecolor="white")
            if len(groups) <= 16:
                axes.text((stage.start + stage.end) / 2, row, f"{rates[name]:.1e}", ha="center", va="center", fontsize=7, color="white")
        axes.axvline(stage.start, color="black", linewidth=0.6, linestyle=":")
    axes.set_yticks(range(len(groups)), groups, fontsize=8)
    axes.set_xlabel(f"{unit}s")
    axes.set_xlim(0, max(stage.end for stage in stages))
    title = f"schedule '{schedule.get('preset', 'full')}': trainable groups and their learning rates"
    axes.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    return figure


# ---------------------------------------------------------------------------------------------------------------
# Confusion matrix


def confusion_figure(labels: list[str], predictions: list[str], label_names: list[str]) -> Figure:
    """Draw the confusion matrix of validation predictions: rows are true labels, columns predicted ones."""
    from sklearn.metrics import confusion_matrix

    names = list(label_names) or sorted(set(labels) | set(predictions))
    matrix = confusion_matrix(labels, predictions, labels=names)
    size = min(max(5.0, 2 + 0.5 * len(names)), 14)
    figure = Figure(figsize=(size, size), layout="constrained")
    axes = figure.subplots()
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    if len(names) <= 20:
        for (row, column), count in _cells(matrix):
            axes.text(column, row, str(count), ha="center", va="center", fontsize=8,
                      color="white" if count > threshold else "black")
    accuracy = matrix.trace() / max(matrix.sum(), 1)
    axes.set_title(f"validation confusion matrix\n{matrix.sum()} examples, accuracy {accuracy:.3f}", fontsize=9)
    return figure


def _cells(matrix):
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            yield (row, column), int(matrix[row, column])
