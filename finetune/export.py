"""Export of a fine-tuned model: `save_pretrained` folder with processor, class names and a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from .assets import hub_base_model
from .config import RunConfig
from .log import get_logger

logger = get_logger(__name__)


def export_model(
    model: torch.nn.Module,
    processor: Any,
    config: RunConfig,
    output_dir: str | os.PathLike,
    metrics: dict[str, dict[str, float]],
    data_summary: dict,
    which: str,
) -> Path:
    """Write `model` and `processor` with `save_pretrained`, plus `README.md` and `eval_results.json`.

    `metrics` maps a split name to its metrics; `which` is "best" or "final": the weights being exported.
    The folder loads with `from_pretrained` and `pipeline()` and reports the run's own class names.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = _merged(model)
    model.save_pretrained(output_dir, safe_serialization=True)
    save_processor(processor, output_dir)
    (output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (output_dir / "training_config.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    (output_dir / "README.md").write_text(model_card(model, config, metrics, data_summary, which), encoding="utf-8")
    logger.info("Exported the %s model to %s", which, output_dir)
    return output_dir


def save_processor(processor: Any, output_dir: Path) -> None:
    """Save the tokenizer or image processor; an image processor always gets its `preprocessor_config.json`."""
    processor.save_pretrained(output_dir)
    if not (output_dir / "preprocessor_config.json").is_file() and hasattr(processor, "to_json_file"):
        # transformers (5.x) skips this file for timm-wrapper models and keeps the preprocessing in config.json.
        # Writing it too lets tools that look for the processor file find the normalisation used in training.
        processor.to_json_file(output_dir / "preprocessor_config.json")


def _merged(model: torch.nn.Module) -> torch.nn.Module:
    # A peft model is merged into plain weights so that `pipeline()` loads it without peft.
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def model_card(model: torch.nn.Module, config: RunConfig, metrics: dict, data_summary: dict, which: str) -> str:
    """Render a Hugging Face model card: YAML metadata, then base model, data, metrics and config."""
    labels = [model.config.id2label[index] for index in sorted(model.config.id2label)]
    metadata = {"library_name": "transformers", "pipeline_tag": config.task}
    # The Hub reads base_model as a model id, so a local folder is named only in the text below.
    base_model = hub_base_model(config.model.name_or_path)
    if base_model is not None:
        metadata["base_model"] = base_model
    metadata["tags"] = ["finetune", config.task]
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", ""]
    lines += [f"# {config.name or 'finetune run'}", ""]
    lines += [
        f"A `{type(model).__name__}` fine-tuned from `{config.model.name_or_path}` for {config.task} "
        f"with finetune. These are the {which} weights"
        + (f" by validation `{config.training.metric_for_best_model}`." if which == "best" else " of the run."),
        "",
        "## Classes",
        "",
        ", ".join(f"`{label}`" for label in labels),
        "",
        "## Data",
        "",
        f"- training data: `{config.data.train}`",
        f"- validation data: `{config.data.validation or 'carved from the training data'}`",
        f"- test data: `{config.data.test or 'carved from the training data'}`",
    ]
    for key, value in data_summary.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "## Metrics", "", "| split | " + " | ".join(_metric_columns(metrics)) + " |"]
    lines.append("|---" * (len(_metric_columns(metrics)) + 1) + "|")
    for split, values in metrics.items():
        cells = [f"{values[name]:.4f}" if name in values else "" for name in _metric_columns(metrics)]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        f'classifier = pipeline("{config.task}", model="path/to/this/folder")',
        *_pair_use_lines(config),
        "```",
        "",
        "## Training configuration",
        "",
        "```yaml",
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _metric_columns(metrics: dict) -> list[str]:
    columns: list[str] = []
    for values in metrics.values():
        columns += [name for name in values if name not in columns]
    return columns


def _pair_use_lines(config) -> list[str]:
    # A pair model called with one text classifies it without its second text, so the card shows the pair form.
    if config.task != "text-classification" or config.data.text_pair_column is None:
        return []
    return ['classifier({"text": "first text", "text_pair": "second text"})  # trained on text pairs']
