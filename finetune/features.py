"""Cached features: with the backbone frozen for the whole run, compute the head's inputs once.

A linear probe spends nearly all its time in the frozen backbone's forward pass, and that pass gives the same
output every epoch when the backbone runs in eval mode and the inputs are not augmented. Caching the inputs of
the head module once and training the head on them gives the same updates without the backbone.

What the training loop calls, single process only:

1. `use = should_cache_features(config.schedule, controller, data.augmented, num_processes)` after building
   the controller (raises `FeatureCacheError` when `cache_features: true` cannot be honoured);
2. `head = CachedHead.from_model(model, groups)`; then `cache_head_inputs(model, head.module, loader)`
   once for the training data and once for each evaluation split (loaders in any order, unaugmented);
3. each epoch: `for batch in feature_dataloader(features, labels, batch_size, seed + epoch)`:
   `loss, logits = head.loss_and_logits(batch)`, backward, optimizer and scheduler steps as usual. Call
   `head.train()` before training steps. For evaluation, `head_logits(head, features, batch_size)` returns
   the logits of a cached split in its loader's order.

The head's parameters are the model's own, so the optimizer, checkpoints and the exported model need no
change. One difference to the uncached run is known: dropout that the model applies inside its own
`forward` between the backbone and the head (functional dropout) is skipped. A top-level `nn.Dropout` child
of the model, as BERT, EfficientNet and MobileNetV2 have, is found and applied to the cached features.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import ConfigError, ConfigIssue, ScheduleConfig
from .groups import LayerGroup
from .log import get_logger
from .schedule import ScheduleController

logger = get_logger(__name__)


class FeatureCacheError(ConfigError):
    """Raised when features cannot be cached for this model or run, with the reason and the setting to change.

    A `ConfigError`, so the training run ends with the config-error exit code; the message is the text alone.
    """

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.issues = [ConfigIssue("schedule.cache_features", "", message)]
        self.source = None


def should_cache_features(
    schedule: ScheduleConfig, controller: ScheduleController, augmented: bool, num_processes: int = 1
) -> bool:
    """Decide whether to train the head on cached features, as `schedule.cache_features` sets it.

    auto caches when nothing below the head ever trains, frozen groups are deterministic (eval mode, no
    training BatchNorm), inputs are not augmented, the head is one module, and the run has one process.
    true requires the same and raises `FeatureCacheError` naming what fails; false never caches.
    """
    if schedule.cache_features == "false":
        return False
    reasons = _reasons_against_caching(controller, augmented, num_processes)
    if not reasons:
        return True
    if schedule.cache_features == "true":
        raise FeatureCacheError(
            "schedule.cache_features is true, but features cannot be cached: " + "; ".join(reasons)
            + ". Fix these or set schedule.cache_features to auto."
        )
    logger.info("Training without cached features: %s.", "; ".join(reasons))
    return False


def _reasons_against_caching(controller: ScheduleController, augmented: bool, num_processes: int) -> list[str]:
    reasons = []
    if not controller.backbone_frozen_throughout():
        reasons.append(
            "groups below the head train or run in train mode (use preset linear_probe, frozen_mode eval, "
            "train_bn false)"
        )
    if augmented:
        reasons.append("training inputs are randomly augmented, so features change every epoch")
    if num_processes > 1:
        reasons.append(f"the run has {num_processes} processes; cached training runs in one")
    if len(controller.groups[-1].modules) != 1:
        reasons.append(
            f"the head group '{controller.groups[-1].name}' is {len(controller.groups[-1].modules)} modules, "
            "not one module whose input can be cached"
        )
    return reasons


class CachedHead(nn.Module):
    """The model's head module, fed with cached inputs: logits = module(dropout(features))."""

    def __init__(self, module: nn.Module, dropout: nn.Module | None = None):
        super().__init__()
        self.module = module
        self.dropout = dropout if dropout is not None else nn.Identity()

    @classmethod
    def from_model(cls, model: nn.Module, groups: list[LayerGroup]) -> "CachedHead":
        """Build the head from the head group's single module and the model's top-level dropout, if any."""
        head = groups[-1]
        if len(head.modules) != 1:
            raise FeatureCacheError(
                f"the head group '{head.name}' has modules {head.module_names}; caching needs exactly one."
            )
        return cls(head.modules[0], _top_level_dropout(model, groups))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.module(self.dropout(features))
        return getattr(logits, "logits", logits)

    def loss_and_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean cross-entropy loss and the logits of a `feature_dataloader` batch."""
        features = batch["features"].to(_device_of(self.module))
        labels = batch["labels"].to(features.device)
        logits = self(features)
        return nn.functional.cross_entropy(logits.float(), labels), logits


def _top_level_dropout(model: nn.Module, groups: list[LayerGroup]) -> nn.Module | None:
    # BERT-style classifiers apply `self.dropout` (a direct child, in no group) just before the head module.
    grouped = {id(module) for group in groups for root in group.modules for module in root.modules()}
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    dropouts = [
        child for child in inner.children() if isinstance(child, nn.Dropout) and id(child) not in grouped
    ]
    return dropouts[0] if len(dropouts) == 1 else None


@torch.no_grad()
def cache_head_inputs(
    model: nn.Module, head_module: nn.Module, dataloader: Iterable[dict]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model once over `dataloader` in eval mode and return (head inputs [N, ...], labels [N]).

    A forward pre-hook on `head_module` records its first positional input of every batch; features are
    stored in float32 on the CPU, in the loader's order. The model's training mode is restored afterwards.
    Raises `FeatureCacheError` when the head's input shape differs between batches (sequence-shaped inputs
    padded per batch), because such inputs cannot be stacked.
    """
    captured: list[torch.Tensor] = []

    def record(module, args):
        captured.append(args[0].detach().float().cpu())

    was_training = model.training
    handle = head_module.register_forward_pre_hook(record)
    labels: list[torch.Tensor] = []
    device = _device_of(model)
    model.eval()
    try:
        for batch in dataloader:
            inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            labels.append(inputs.pop("labels").cpu())
            model(**inputs)
    finally:
        handle.remove()
        model.train(was_training)
    return _stack(captured, labels)


def _stack(captured: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(captured) != len(labels):
        raise FeatureCacheError(
            f"the head module ran {len(captured)} times for {len(labels)} batches; it must run once per batch."
        )
    shapes = sorted({tuple(tensor.shape[1:]) for tensor in captured})
    if len(shapes) > 1:
        raise FeatureCacheError(
            f"the head's input shape varies between batches ({shapes[:3]}), as with heads that read the whole "
            "padded sequence; set schedule.cache_features to false for this model."
        )
    return torch.cat(captured), torch.cat(labels)


def feature_dataloader(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int | None = None
) -> DataLoader:
    """Return batches {"features", "labels"} of cached features; shuffled with `seed`, in order without it."""
    dataset = TensorDataset(features, labels)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=seed is not None,
        generator=generator,
        collate_fn=collate_features,
    )


def collate_features(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    return {"features": torch.stack([row[0] for row in rows]), "labels": torch.stack([row[1] for row in rows])}


@torch.no_grad()
def head_logits(head: CachedHead, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Return the head's logits [N, num_labels] for cached features, in eval mode and in order, on the CPU."""
    was_training = head.training
    head.eval()
    try:
        device = _device_of(head.module)
        chunks = [head(features[start:start + batch_size].to(device)).float().cpu()
                  for start in range(0, len(features), batch_size)]
    finally:
        head.train(was_training)
    return torch.cat(chunks)


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
