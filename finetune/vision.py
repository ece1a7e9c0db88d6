"""Vision backbones: the image processor (loaded first, for pre-flight data checks) and the model with a new head.

Both transformers-native models (`AutoModelForImageClassification`: ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt,
ResNet, EfficientNet, MobileNet, ...) and timm models through transformers' `TimmWrapperForImageClassification`
(`timm/NAME` Hub ids, or folders with a timm-wrapper `config.json`) load here. For a timm-wrapper model the
preprocessing lives in `config.json` (`pretrained_cfg`), not in `preprocessor_config.json`, so every change to
the processor (such as `data.image_size`) is also written into the model's config.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from .assets import resolve_path
from .config import ConfigError, ConfigIssue, RunConfig
from .log import get_logger

logger = get_logger(__name__)

# Backbones whose learned position embeddings fix the input size: another `data.image_size` fails in forward.
_FIXED_SIZE_MODEL_TYPES = {"vit", "deit", "beit", "vit_mae", "vit_msn", "data2vec-vision"}


def load_image_processor(config: RunConfig) -> Any:
    """Load the backbone's image processor, resized to `data.image_size` when set, without loading weights.

    The processor is what the export saves and `pipeline()` reloads, so evaluation that runs it gives the
    same tensors as inference from the export. Raises `ConfigError` when `data.image_size` is set for a
    backbone whose position embeddings fix the input size.
    """
    source = resolve_path(config.model.name_or_path)
    backbone_config = _load_backbone_config(config)
    if is_timm_config(backbone_config):
        return _timm_processor(backbone_config, config.data.image_size)
    processor = AutoImageProcessor.from_pretrained(
        source, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
    )
    if config.data.image_size is not None:
        _check_resizable(backbone_config, config.data.image_size)
        overrides = resized_processor_kwargs(processor, config.data.image_size)
        processor = AutoImageProcessor.from_pretrained(
            source, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code, **overrides
        )
        logger.info("Image processor resized to %d px: %s", config.data.image_size, overrides)
    return processor


def load_image_model(config: RunConfig, label_names: list[str]) -> tuple[torch.nn.Module, Any]:
    """Load the backbone with a classification head for `label_names`, and its image processor.

    The head is new (randomly initialised from the current torch seed) unless the checkpoint's head already
    has exactly these class names in this order, as when fine-tuning an export again.
    """
    source = resolve_path(config.model.name_or_path)
    processor = load_image_processor(config)
    backbone_config = _load_backbone_config(config)
    id2label = dict(enumerate(label_names))
    # ignore_mismatched_sizes: a head of another class count (ImageNet's 1000) is replaced by a new one.
    # Weights load from model.safetensors when present; transformers loads pickled .bin files with
    # torch.load(weights_only=True).
    model = AutoModelForImageClassification.from_pretrained(
        source,
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
        num_labels=len(label_names),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
        ignore_mismatched_sizes=True,
    )
    if _same_class_count_other_names(backbone_config, label_names):
        reset_classifier(model)
    if is_timm_config(model.config):
        _set_timm_labels_and_preprocessing(model, label_names, processor_pretrained_cfg(backbone_config, config.data.image_size))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    logger.info("Loaded %s from %s (%.1fM parameters, %d classes)", type(model).__name__, source, parameters / 1e6, len(label_names))
    return model, processor


def _load_backbone_config(config: RunConfig) -> Any:
    return AutoConfig.from_pretrained(
        resolve_path(config.model.name_or_path),
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
    )


def is_timm_config(model_config: Any) -> bool:
    """Return True for a transformers timm-wrapper config (`model_type` `timm_wrapper`)."""
    return getattr(model_config, "model_type", None) == "timm_wrapper"


# ---------------------------------------------------------------------------------------------------------------
# Processors


def resized_processor_kwargs(processor: Any, image_size: int) -> dict:
    """Return `from_pretrained` overrides that make a transformers image processor output `image_size` pixels.

    A processor with a centre crop keeps its crop ratio (resize edge = old edge * new crop / old crop), so a
    224 px crop from 256 px becomes a 112 px crop from 128 px. Raises `ConfigError` for size specs it cannot scale.
    """
    size = {key: value for key, value in dict(processor.size).items() if value is not None}
    crop = {key: value for key, value in dict(getattr(processor, "crop_size", None) or {}).items() if value is not None}
    if getattr(processor, "do_center_crop", False) and {"height", "width"} <= crop.keys():
        ratio = image_size / crop["height"]
        scaled = {key: max(1, round(value * ratio)) for key, value in size.items()}
        return {"size": scaled, "crop_size": {"height": image_size, "width": image_size}}
    if {"height", "width"} <= size.keys():
        return {"size": {"height": image_size, "width": image_size}}
    if "shortest_edge" in size:
        # ConvNeXt-style processors resize the short edge to size / crop_pct and centre-crop `size`.
        return {"size": {"shortest_edge": image_size}}
    # A ConfigError, so the run stops with exit code 2 and this message instead of a traceback.
    raise ConfigError([ConfigIssue(
        "data.image_size", image_size, f"cannot be applied to {type(processor).__name__} with size {size}.",
        "remove data.image_size to use the processor's own size.",
    )])


def _check_resizable(backbone_config: Any, image_size: int) -> None:
    model_type = getattr(backbone_config, "model_type", "")
    native = getattr(backbone_config, "image_size", None)
    if model_type in _FIXED_SIZE_MODEL_TYPES and native is not None and native != image_size:
        raise ConfigError([ConfigIssue(
            "data.image_size", image_size,
            f"differs from the {model_type} backbone's input size {native}, which its position embeddings fix.",
            f"remove data.image_size, or set it to {native}.",
        )])


def processor_pretrained_cfg(backbone_config: Any, image_size: int | None) -> dict:
    """Return a timm-wrapper config's `pretrained_cfg` with its input size set to `image_size` when given.

    The test-time size keys are dropped with a new size, because timm would otherwise evaluate at them.
    """
    pretrained_cfg = copy.deepcopy(dict(getattr(backbone_config, "pretrained_cfg", None) or {}))
    if image_size is not None:
        pretrained_cfg["input_size"] = [3, image_size, image_size]
        for key in ("test_input_size", "test_crop_pct", "min_input_size"):
            pretrained_cfg.pop(key, None)
    return pretrained_cfg


def _timm_processor(backbone_config: Any, image_size: int | None) -> Any:
    from transformers import TimmWrapperImageProcessor

    pretrained_cfg = processor_pretrained_cfg(backbone_config, image_size)
    if not pretrained_cfg:
        raise ValueError(
            f"the timm model {backbone_config.architecture!r} has no pretrained_cfg in its config.json, so its "
            "preprocessing is unknown. Fix: add timm's pretrained_cfg (input_size, interpolation, crop_pct, mean, std)."
        )
    processor = TimmWrapperImageProcessor(pretrained_cfg=pretrained_cfg, architecture=backbone_config.architecture)
    logger.info("timm preprocessing for %s: %s", backbone_config.architecture, processor.data_config)
    return processor


# ---------------------------------------------------------------------------------------------------------------
# Heads and labels


def _same_class_count_other_names(backbone_config: Any, label_names: list[str]) -> bool:
    # A same-sized head loads without a mismatch, so it must be reset explicitly when it means other classes.
    if is_timm_config(backbone_config):
        previous = getattr(backbone_config, "label_names", None) or list(backbone_config.id2label.values())
    else:
        previous = [backbone_config.id2label[index] for index in sorted(backbone_config.id2label)]
    return len(previous) == len(label_names) and list(previous) != list(label_names)


def reset_classifier(model: torch.nn.Module) -> None:
    """Re-initialise the linear layers of the model's classification head (timm `get_classifier()` or `classifier`)."""
    timm_model = getattr(model, "timm_model", None)
    head = timm_model.get_classifier() if timm_model is not None else getattr(model, "classifier", None)
    layers = [module for module in head.modules() if isinstance(module, torch.nn.Linear)] if head is not None else []
    if not layers:
        # NOTE: architectures whose head is not named `classifier` keep the checkpoint's head weights here.
        logger.warning("Could not find the classification head of %s to re-initialise it", type(model).__name__)
        return
    for layer in layers:
        layer.reset_parameters()
    logger.info("Re-initialised the classification head: the checkpoint's classes have other names")


def _set_timm_labels_and_preprocessing(model: torch.nn.Module, label_names: list[str], pretrained_cfg: dict) -> None:
    # TimmWrapperConfig.to_dict writes `label_names` only when the attribute is absent, and from_dict rebuilds
    # id2label from it on reload. A config loaded from a checkpoint keeps the checkpoint's `label_names`
    # (1000 ImageNet classes), so without this the export would reload with those names or LABEL_k.
    model.config.label_names = list(label_names)
    model.config.pretrained_cfg = pretrained_cfg
