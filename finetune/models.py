"""Backbone loading: the processor first (cheap, for pre-flight checks), the weights after the data is checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from .assets import resolve_path
from .config import ConfigError, ConfigIssue, RunConfig
from .log import get_logger

logger = get_logger(__name__)


def load_processor(config: RunConfig) -> Any:
    """Load the tokenizer (text) or image processor (vision) of `config.model`, without the weights.

    A local folder that does not exist, or a model without a processor for the task, is a `ConfigError`.
    """
    check_model_source(config.model.name_or_path)
    try:
        if config.task == "image-classification":
            from .vision import load_image_processor

            return load_image_processor(config)
        return AutoTokenizer.from_pretrained(
            resolve_path(config.model.name_or_path),
            revision=config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
        )
    except OSError as error:
        kind = "image processor" if config.task == "image-classification" else "tokenizer"
        fix = "check that the model suits the task, or set task to match the model."
        if _hub_unreachable(error):
            fix = (
                "check the Hub id and the network (HF_HUB_OFFLINE must be unset), or give a local save_pretrained "
                "folder of the model."
            )
        raise ConfigError([ConfigIssue(
            "model.name_or_path", config.model.name_or_path, f"no {kind} could be loaded for {config.task}: {error}", fix,
        )]) from None


def _hub_unreachable(error: BaseException) -> bool:
    # transformers wraps huggingface_hub's LocalEntryNotFoundError (offline mode or no connection, and the files
    # not in the cache) in a plain OSError, so only the cause chain separates a network failure from a missing processor.
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LocalEntryNotFoundError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def check_model_source(name_or_path: str) -> None:
    """Raise `ConfigError` when `name_or_path` is clearly a local folder (a path, not a Hub id) that is missing.

    Hub ids have at most one slash and no leading `.`, `/` or `~`; anything else is treated as a folder.
    """
    source = resolve_path(name_or_path)
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).exists()
    if looks_local and not (Path(source).expanduser() / "config.json").is_file():
        hint = " Run `finetune convert-efficientnet` first." if "efficientnet" in source else ""
        raise ConfigError([ConfigIssue(
            "model.name_or_path", name_or_path, f"{source} is not a model folder (no config.json).",
            f"give a save_pretrained folder or a Hub id.{hint}",
        )])


def model_max_length(config: RunConfig, tokenizer: Any) -> int | None:
    """Return the longest input, in tokens, that the text backbone accepts, or None when it states none."""
    backbone = AutoConfig.from_pretrained(
        resolve_path(config.model.name_or_path),
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
    )
    limits = [getattr(backbone, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    # Tokenizers without a limit report a huge sentinel (int(1e30)); ignore it.
    limits = [limit for limit in limits if isinstance(limit, int) and limit < 1_000_000]
    return min(limits) if limits else None


def load_model(config: RunConfig, label_names: list[str]) -> torch.nn.Module:
    """Load the backbone with a new classification head sized for `label_names`, named by them."""
    if config.task == "image-classification":
        from .vision import load_image_model

        model, _ = load_image_model(config, label_names)
        return model
    return load_text_model(config, label_names)


def load_text_model(config: RunConfig, label_names: list[str]) -> torch.nn.Module:
    source = resolve_path(config.model.name_or_path)
    id2label = dict(enumerate(label_names))
    backbone_config = AutoConfig.from_pretrained(
        source,
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
        num_labels=len(label_names),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
    )
    # ignore_mismatched_sizes: a backbone exported with another head (other class count) gets a fresh head.
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        config=backbone_config,
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
        ignore_mismatched_sizes=True,
    )
    logger.info("Loaded %s from %s (%.1fM parameters)", type(model).__name__, source, _count(model) / 1e6)
    return model


def _count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
