"""Transfer-learning schedules: which layer groups train at each step, and at what learning rate.

The controller keeps every parameter in the optimizer from step 0, one parameter group per layer group
(split into weight-decay and no-decay parts), and freezes a group by two means at once:

- `requires_grad=False` on its parameters, so backward computes no gradient for them (and stops below the
  lowest trainable group) and AdamW skips them: no update, no weight decay, bit-identical weights;
- a learning-rate factor of 0 in its `LambdaLR` lambda, so the rate logged for a frozen group is 0.

Everything is a pure function of the optimizer step, so a resumed run needs no extra state: the lambdas give
the same rates, and `update(step, epoch)` re-applies the stage of that step. Stages that end at an epoch are
converted to steps as `epoch * num_update_steps_per_epoch`.

What the training loop calls, in order:

1. `controller = ScheduleController(model, groups, config.schedule, config.training, steps_per_epoch, total)`
   on the unwrapped model, before `accelerator.prepare`;
2. `optimizer = AdamW(controller.optimizer_param_groups(), betas=..., eps=...)` and
   `LambdaLR(optimizer, controller.lr_lambdas(base_lambda))`;
3. before each optimizer step's first micro-batch: `record = controller.update(step, epoch)`. When it is
   not None, `model = controller.after_change(accelerator, model)` returns a new DDP wrapper under DDP, and
   the loop logs the record and writes it as a `stage` event;
4. right after every `model.train()`: `controller.set_modes(model)`.
"""

from __future__ import annotations

import fnmatch
import gc
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .config import ConfigError, ConfigIssue, ScheduleConfig, StageConfig, TrainingConfig
from .groups import LayerGroup
from .log import get_logger

logger = get_logger(__name__)

_TOP = re.compile(r"^top:(\d+)$")
_SLICE = re.compile(r"^slice:(-?\d*):(-?\d*)$")


class ScheduleError(ConfigError):
    """Raised when a schedule does not fit the model's layer groups (bad stage names, unordered stages).

    A `ConfigError`, so the training run ends with the config-error exit code; the message is the text alone.
    """

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.issues = [ConfigIssue("schedule", "", message)]
        self.source = None


@dataclass(frozen=True)
class Stage:
    """One stage: its steps [start_step, end_step), the indices of the groups that train, and its rate."""

    index: int
    name: str
    start_step: int
    end_step: int | None
    trainable: frozenset[int]
    learning_rate: float


class ScheduleController:
    """Freezes, unfreezes and sets per-group learning rates over a run; see the module docstring for the loop.

    `model` is the unwrapped model whose parameters `groups` (from `discover_layer_groups`) list, bottom
    group first and head last. Parameters that do not require a gradient when the controller is built (the
    frozen base weights of a LoRA model) stay frozen in every stage.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[LayerGroup],
        schedule: ScheduleConfig,
        training: TrainingConfig,
        num_update_steps_per_epoch: int,
        total_steps: int,
    ):
        if num_update_steps_per_epoch < 1:
            raise ScheduleError(f"num_update_steps_per_epoch must be at least 1, got {num_update_steps_per_epoch}.")
        if len(groups) < 2:
            raise ScheduleError(f"a schedule needs at least two layer groups (backbone and head), got {len(groups)}.")
        self.model = model
        self.groups = groups
        self.schedule = schedule
        self.training = training
        self.steps_per_epoch = num_update_steps_per_epoch
        self.total_steps = total_steps
        self.stages = build_stages(schedule, training, [group.name for group in groups], num_update_steps_per_epoch)
        self._pinned_frozen = {id(p) for group in groups for _, p in group.parameters if not p.requires_grad}
        self._batchnorms = [_batchnorm_modules(group) for group in groups]
        self._batchnorm_parameters = {id(p) for modules in self._batchnorms for m in modules for p in m.parameters()}
        self._param_group_layers: list[tuple[int, str]] = []  # (layer group index, "decay" | "no_decay" | "bn")
        self._base: Callable[[int], float] | None = None
        self._current_stage: int | None = None
        self._warn_unreached_stages()

    # -- optimizer and rates ------------------------------------------------------------------------------------

    def peak_learning_rate(self, group_index: int, stage: Stage | None = None) -> float:
        """Return a group's peak rate: the head gets rate × head_lr_multiplier, the group below it the rate,
        and each lower group the one above it × layer_decay. The rate is the stage's, else training's."""
        rate = stage.learning_rate if stage is not None else self.training.learning_rate
        head = len(self.groups) - 1
        if group_index == head:
            return rate * self.schedule.head_lr_multiplier
        return rate * self.schedule.layer_decay ** (head - 1 - group_index)

    def optimizer_param_groups(self) -> list[dict]:
        """Build AdamW parameter groups holding every parameter, from step 0.

        One dict per layer group and kind: "decay" (weights), "no_decay" (biases, norm weights and other
        1-D parameters: weight_decay 0) and, with `train_bn: true`, "bn" (BatchNorm parameters, which then
        train inside frozen groups too). Each dict has `params`, `weight_decay`, `lr` (the group's peak rate
        with training.learning_rate), `group_name`, `layer_group` (index) and `param_kind`. Call it once.
        """
        no_decay = _no_decay_parameter_ids(self.model)
        param_groups, self._param_group_layers = [], []
        for index, group in enumerate(self.groups):
            kinds: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "bn": []}
            for _, parameter in group.parameters:
                if self.schedule.train_bn and id(parameter) in self._batchnorm_parameters:
                    kinds["bn"].append(parameter)
                elif id(parameter) in no_decay:
                    kinds["no_decay"].append(parameter)
                else:
                    kinds["decay"].append(parameter)
            for kind, parameters in kinds.items():
                if not parameters:
                    continue
                param_groups.append({
                    "params": parameters,
                    "weight_decay": self.training.weight_decay if kind == "decay" else 0.0,
                    "lr": self.peak_learning_rate(index),
                    "group_name": group.name,
                    "layer_group": index,
                    "param_kind": kind,
                })
                self._param_group_layers.append((index, kind))
        return param_groups

    def lr_lambdas(self, base: Callable[[int], float]) -> list[Callable[[int], float]]:
        """Return one `LambdaLR` lambda per optimizer parameter group, in `optimizer_param_groups()` order.

        lambda(step) = base(step) × stage rate / training.learning_rate × unfreeze warm-up × (0 while frozen).
        `base` is the run's schedule (warm-up, then linear, cosine or constant) as a multiplier of the peak.
        """
        if not self._param_group_layers:
            raise ScheduleError("call optimizer_param_groups() before lr_lambdas(): the lambdas follow its order.")
        self._base = base
        return [self._make_lambda(index, kind, base) for index, kind in self._param_group_layers]

    def _make_lambda(self, index: int, kind: str, base: Callable[[int], float]) -> Callable[[int], float]:
        def factor(step: int) -> float:
            return base(step) * self.group_factor(index, step, batchnorm=(kind == "bn"))

        return factor

    def group_factor(self, group_index: int, step: int, batchnorm: bool = False) -> float:
        """Return the multiplier of a group's peak rate at `step`, leaving out the base schedule."""
        stage = self.stage_at(step)
        scale = stage.learning_rate / self.training.learning_rate
        if group_index not in stage.trainable:
            # With train_bn, BatchNorm parameters of frozen groups train at the group's rate, without warm-up.
            return scale if batchnorm else 0.0
        return scale * self._unfreeze_warmup(group_index, stage, step)

    def _unfreeze_warmup(self, group_index: int, stage: Stage, step: int) -> float:
        warmup = self.schedule.unfreeze_warmup_steps
        unfrozen_at = self._unfrozen_since(group_index, stage)
        if warmup == 0 or unfrozen_at == 0:
            return 1.0
        # The first step after unfreezing uses 1/warmup of the rate, step `warmup` the full rate.
        return min(1.0, (step - unfrozen_at + 1) / warmup)

    def _unfrozen_since(self, group_index: int, stage: Stage) -> int:
        # Start step of the unbroken run of stages, ending at `stage`, in which the group trains.
        start = stage.start_step
        for earlier in reversed(self.stages[: stage.index]):
            if group_index not in earlier.trainable:
                break
            start = earlier.start_step
        return start

    def stage_at(self, step: int) -> Stage:
        """Return the stage in force at optimizer step `step` (steps done so far)."""
        current = self.stages[0]
        for stage in self.stages:
            if stage.start_step <= step:
                current = stage
        return current

    def learning_rates(self, step: int) -> dict[str, float]:
        """Return each layer group's rate at `step` (base schedule included once `lr_lambdas` was called)."""
        base = self._base(step) if self._base is not None else 1.0
        return {
            group.name: self.peak_learning_rate(index) * base * self.group_factor(index, step)
            for index, group in enumerate(self.groups)
        }

    # -- stages ----------------------------------------------------------------------------------------------------

    def update(self, step: int, epoch: int) -> dict | None:
        """Apply the stage of optimizer step `step`; return a stage record when the stage changed, else None.

        Call it before each optimizer step's first micro-batch (`step` = optimizer steps done, `epoch` =
        0-based epoch, kept for the caller's records: stage boundaries are steps). The first call always
        returns a record, which the caller logs, because this method logs nothing. It sets `requires_grad`,
        clears the gradients of newly frozen parameters and, when the model is in training mode, applies
        `set_modes`. The record has `stage`, `name`, `trainable_groups`, `trainable_parameters`,
        `frozen_batchnorm_parameters` (trainable BatchNorm parameters of frozen groups, with `train_bn: true`) and
        `learning_rates` ({group: rate at this step}). On resume, the first call reports the resumed stage.
        """
        stage = self.stage_at(step)
        if stage.index == self._current_stage:
            return None
        self._current_stage = stage.index
        self._apply_requires_grad(stage)
        if self.model.training:
            self.set_modes(self.model)
        return {
            "stage": stage.index,
            "name": stage.name,
            "trainable_groups": [self.groups[index].name for index in sorted(stage.trainable)],
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "frozen_batchnorm_parameters": self._frozen_batchnorm_count(stage),
            "learning_rates": self.learning_rates(step),
        }

    def _frozen_batchnorm_count(self, stage: Stage) -> int:
        # With train_bn, BatchNorm parameters of frozen groups train too. They are counted in
        # trainable_parameters, so this count keeps that total from looking like the listed groups' size.
        return sum(
            parameter.numel()
            for index, group in enumerate(self.groups) if index not in stage.trainable
            for _, parameter in group.parameters if parameter.requires_grad
        )

    def after_change(self, accelerator, model: nn.Module) -> nn.Module:
        """Return the model to train with after `update()` returned a record: under DDP a new wrapper.

        See `rewrap_after_unfreeze`; the caller replaces its model reference with the returned one.
        """
        return rewrap_after_unfreeze(accelerator, model)

    def _apply_requires_grad(self, stage: Stage) -> None:
        for index, group in enumerate(self.groups):
            for _, parameter in group.parameters:
                if id(parameter) in self._pinned_frozen:
                    continue
                trains = index in stage.trainable or (
                    self.schedule.train_bn and id(parameter) in self._batchnorm_parameters
                )
                parameter.requires_grad_(trains)
                if not trains:
                    # A zero gradient left by zero_grad(set_to_none=False) would still move AdamW's moments.
                    parameter.grad = None

    def set_modes(self, model: nn.Module | None = None) -> None:
        """Put frozen groups in eval mode (unless `frozen_mode: train`) and their BatchNorm as `train_bn` sets.

        Call it right after every `model.train()`. Trainable groups follow the model's own mode. With
        `train_bn: false`, BatchNorm inside frozen groups is always in eval mode, so its running statistics
        never change. `model` may be the DDP wrapper or the unwrapped model; only its mode is read.
        """
        training = (model if model is not None else self.model).training
        stage = self.stage_at(0) if self._current_stage is None else self.stages[self._current_stage]
        for index, group in enumerate(self.groups):
            frozen = index not in stage.trainable
            for module in group.modules:
                module.train(training and not (frozen and self.schedule.frozen_mode == "eval"))
            if frozen:
                for batchnorm in self._batchnorms[index]:
                    batchnorm.train(training and self.schedule.train_bn)

    def backbone_frozen_throughout(self) -> bool:
        """Return True when only the head ever trains and every frozen group is deterministic.

        That holds when every stage reached before `total_steps` trains the head alone, frozen groups run
        in eval mode, and no BatchNorm below the head trains (`train_bn: false` or no BatchNorm there).
        """
        head = len(self.groups) - 1
        reached = [stage for stage in self.stages if stage.start_step < max(self.total_steps, 1)]
        if any(stage.trainable != frozenset({head}) for stage in reached):
            return False
        if self.schedule.frozen_mode != "eval":
            return False
        return not (self.schedule.train_bn and any(self._batchnorms[:head]))

    def _warn_unreached_stages(self) -> None:
        unreached = [stage for stage in self.stages[1:] if stage.start_step >= self.total_steps]
        if unreached:
            first = unreached[0]
            logger.warning(
                "%d of %d schedule stages never run: the run has %d optimizer steps and stage %d (%s) starts at "
                "step %d. Start stages earlier (schedule.freeze_epochs, unfreeze_every_*, stages) or train longer.",
                len(unreached), len(self.stages), self.total_steps, first.index, first.name, first.start_step,
            )


# ---------------------------------------------------------------------------------------------------------------
# Stages from the config


def build_stages(
    schedule: ScheduleConfig, training: TrainingConfig, group_names: list[str], steps_per_epoch: int
) -> list[Stage]:
    """Turn a preset (or a milestones list) into ordered stages with step boundaries."""
    count = len(group_names)
    head = count - 1
    rate = training.learning_rate
    everything = frozenset(range(count))
    if schedule.preset == "full":
        return [Stage(0, "all", 0, None, everything, rate)]
    if schedule.preset == "linear_probe":
        return [Stage(0, "head", 0, None, frozenset({head}), rate)]
    if schedule.preset == "freeze_then_unfreeze":
        switch = schedule.freeze_epochs * steps_per_epoch
        return [Stage(0, "head", 0, switch, frozenset({head}), rate), Stage(1, "all", switch, None, everything, rate)]
    if schedule.preset == "gradual":
        every = schedule.unfreeze_every_steps or schedule.unfreeze_every_epochs * steps_per_epoch
        return [
            Stage(k, "head" if k == 0 else f"top:{k}", k * every, None if k == head else (k + 1) * every,
                  frozenset(range(head - k, count)), rate)
            for k in range(count)
        ]
    return _milestone_stages(schedule.stages or [], training, group_names, steps_per_epoch)


def _milestone_stages(
    configs: list[StageConfig], training: TrainingConfig, group_names: list[str], steps_per_epoch: int
) -> list[Stage]:
    stages, start = [], 0
    for index, config in enumerate(configs):
        end = _stage_end(config, steps_per_epoch)
        if end is not None and end <= start:
            raise ScheduleError(
                f"schedule.stages.{index} ends at step {end}, not after its start at step {start}; "
                "order the stages by their end and give each a later end than the one before."
            )
        trainable = resolve_train_spec(config.train, group_names, f"schedule.stages.{index}.train")
        name = config.train if isinstance(config.train, str) else ",".join(config.train)
        stages.append(Stage(index, name, start, end, trainable, config.learning_rate or training.learning_rate))
        if end is None:
            break
        start = end
    return stages


def _stage_end(config: StageConfig, steps_per_epoch: int) -> int | None:
    if config.until_step is not None:
        return config.until_step
    if config.until_epoch is not None:
        return config.until_epoch * steps_per_epoch
    return None


def resolve_train_spec(spec: str | list[str], group_names: list[str], key: str = "train") -> frozenset[int]:
    """Return the indices of the groups a stage's `train` value names.

    Each item is 'head', 'all', 'top:K' (the head and the K groups below it), 'slice:A:B' (Python slice of
    group indices, bottom = 0) or an fnmatch pattern on group names; a list takes the union.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    count, chosen = len(group_names), set()
    for item in items:
        picked = _resolve_item(item.strip(), group_names, key)
        if not picked:
            raise ScheduleError(
                f"{key} = {item!r} names no layer group; groups are {group_names}. "
                "Use 'head', 'all', 'top:K', 'slice:A:B' or a pattern matching a group name."
            )
        chosen |= picked
    if any(index >= count for index in chosen):
        raise ScheduleError(f"{key} = {spec!r} goes beyond the {count} layer groups.")
    return frozenset(chosen)


def _resolve_item(item: str, group_names: list[str], key: str) -> set[int]:
    count = len(group_names)
    if item == "head":
        return {count - 1}
    if item == "all":
        return set(range(count))
    top = _TOP.match(item)
    if top:
        below = int(top.group(1))
        if below > count - 1:
            raise ScheduleError(
                f"{key} = {item!r} asks for {below} groups below the head, but there are {count - 1} "
                f"({', '.join(group_names[:-1])}). Fix: use top:{count - 1} or 'all' to train every group."
            )
        return set(range(count - 1 - below, count))
    sliced = _SLICE.match(item)
    if sliced:
        start, stop = (int(text) if text else None for text in sliced.groups())
        return set(range(count)[slice(start, stop)])
    return {index for index, name in enumerate(group_names) if fnmatch.fnmatchcase(name, item)}


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _batchnorm_modules(group: LayerGroup) -> list[nn.Module]:
    return [
        module
        for root in group.modules
        for module in root.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]


def _no_decay_parameter_ids(model: nn.Module) -> set[int]:
    # Biases, 1-D parameters (norm scales, layer-scale gammas) and all parameters of normalisation layers
    # (nn.LayerNorm, BatchNorm, GroupNorm and model-specific *Norm classes) get no weight decay.
    ids = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, parameter in module.named_parameters(recurse=False):
            if is_norm or name.endswith("bias") or parameter.ndim <= 1:
                ids.add(id(parameter))
    return ids


def rewrap_after_unfreeze(accelerator, model: nn.Module) -> nn.Module:
    """Re-create the DDP wrapper so that it registers the parameters that now require a gradient.

    DDP's reducer registers only parameters with `requires_grad=True` when the wrapper is built; a group
    unfrozen later would get no all-reduce (ranks drift apart) and a group frozen later triggers the
    "parameters that were not used in producing loss" error. Call this after every `update()` that returns a
    record and use the returned model from then on. A model that is not DDP-wrapped is returned unchanged.
    `accelerator._models` keeps the unwrapped model under DDP, so saving and loading state are unaffected.
    The new wrapper broadcasts rank 0's parameters and buffers, which are identical on every rank anyway.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return model
    inner = model.module
    if not any(parameter.requires_grad for parameter in inner.parameters()):
        raise ScheduleError("after this stage change no parameter trains, so there is nothing to synchronise.")
    handler = getattr(accelerator, "ddp_handler", None)
    kwargs = handler.to_kwargs() if handler is not None else {}
    wrapped = DistributedDataParallel(inner, device_ids=model.device_ids, output_device=model.output_device, **kwargs)
    if handler is not None:
        handler.register_comm_hook(wrapped)
    wrapped._is_accelerate_prepared = True
    # Drop the old reducer now: its autograd hooks stay on the parameters until it is freed.
    del model.reducer
    gc.collect()
    return wrapped
