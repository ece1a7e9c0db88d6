"""Data preparation: raw files to model-ready datasets, with pre-flight checks before the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import RunConfig


@dataclass
class PreparedData:
    """Datasets of one run, ready for a DataLoader.

    `train`, `validation` and `test` are map-style datasets whose items are dicts of tensors or lists that
    `collate_fn` turns into a batch dict with a `labels` tensor of shape [batch]. `lengths` (train only) are
    token counts for length-aware batching, or None. `raw_validation` keeps the untransformed validation rows
    (texts or images) so tools can show misclassified examples. `summary` counts what was read, dropped or
    skipped, for the log and the model card.
    """

    train: Any
    validation: Any
    test: Any | None
    label_names: list[str]
    collate_fn: Callable[[list[dict]], dict]
    lengths: list[int] | None = None
    raw_validation: Any | None = None
    summary: dict = field(default_factory=dict)
    # True when training inputs vary between epochs (random augmentation): feature caching is then unsafe.
    augmented: bool = False


def prepare_data(config: RunConfig, processor: Any) -> PreparedData:
    """Load, check, split and preprocess the data described by `config.data` for `config.task`."""
    if config.task == "text-classification":
        from .text import prepare_text_data

        return prepare_text_data(config, processor)
    from .image import prepare_image_data

    return prepare_image_data(config, processor)
