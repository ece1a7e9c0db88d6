"""Prediction with an exported model folder: `finetune predict MODEL_DIR INPUT...` prints JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, pipeline

from .log import get_logger, setup_logging

logger = get_logger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Weight files that transformers' from_pretrained reads from a folder, single or sharded.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def detect_task(model_dir: str | os.PathLike) -> str:
    """Return `image-classification` or `text-classification` from the folder's config and processor files."""
    folder = Path(model_dir)
    if (folder / "preprocessor_config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        return "image-classification"
    config = AutoConfig.from_pretrained(folder)
    architectures = " ".join(config.architectures or [])
    return "image-classification" if "ImageClassification" in architectures else "text-classification"


def check_model_folder(model_dir: Path) -> None:
    """Raise `FileNotFoundError` unless `model_dir` has a config.json and weights that from_pretrained reads."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json); give an export folder")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        # Without this check the pipeline reports one traceback per model class it tried, screens long.
        raise FileNotFoundError(
            f"{model_dir} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            "give a complete export folder, or run the training again to write it"
        )


class Predictor:
    """A loaded classifier: `predict(inputs, top_k)` for texts, or images (PIL images or file paths)."""

    def __init__(self, model_dir: str | os.PathLike, device: str | None = None):
        self.model_dir = Path(model_dir)
        check_model_folder(self.model_dir)
        self.task = detect_task(self.model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # trust_remote_code stays off: an exported folder needs no code of its own.
        self.pipeline = pipeline(self.task, model=str(self.model_dir), device=device)
        self.label_names = [self.pipeline.model.config.id2label[i] for i in sorted(self.pipeline.model.config.id2label)]

    def predict(self, inputs: list[Any], top_k: int = 5) -> list[list[dict]]:
        """Classify each input; return, per input, the `top_k` classes as `{"label", "score"}`, best first.

        Inputs of a model trained on text pairs are `{"text": ..., "text_pair": ...}` dicts.
        """
        top_k = max(1, min(top_k, len(self.label_names)))
        if self.task == "image-classification":
            inputs = [_as_image(item) for item in inputs]
            results = self.pipeline(list(inputs), top_k=top_k)
        else:
            # Texts longer than the model's limit are cut to it, as in training, instead of failing.
            results = self.pipeline(list(inputs), top_k=top_k, truncation=True)
        if inputs and isinstance(results[0], dict):  # one input can come back unnested
            results = [results]
        return [[{"label": r["label"], "score": float(r["score"])} for r in result] for result in results]


def _as_image(item: Any):
    # The same RGB conversion as training (transparency on white, 16-bit scaled, EXIF rotation applied).
    from .data.image import open_image, to_rgb

    if isinstance(item, (str, Path)):
        return open_image(item)
    return to_rgb(item) if hasattr(item, "convert") else item


def text_pair_column(model_dir: str | os.PathLike) -> str | None:
    """Return the `data.text_pair_column` the export was trained with, from its training_config.yaml, or None."""
    import yaml

    path = Path(model_dir) / "training_config.yaml"
    if not path.is_file():  # a folder not written by finetune carries no training config
        return None
    data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
    return data.get("text_pair_column")


def _parse_pairs(inputs: list[str], pair_column: str) -> list[dict]:
    # A pair model given one text would classify it without its second text and print a confident wrong prediction.
    pairs, problems = [], []
    for item in inputs:
        try:
            value = json.loads(item)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("text"), str) and isinstance(value.get("text_pair"), str):
            pairs.append({"text": value["text"], "text_pair": value["text_pair"]})
        else:
            problems.append(repr(item if len(item) <= 60 else item[:57] + "..."))
    if problems:
        shown = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(
            f"the model was trained on text pairs (data.text_pair_column: {pair_column}), but {shown} "
            "is not a pair. "
            'Fix: give each input as a JSON object, e.g. \'{"text": "first text", "text_pair": "second text"}\'.'
        )
    return pairs


def _read_inputs(args: argparse.Namespace, task: str) -> list[str]:
    inputs = list(args.inputs)
    if args.file:
        if not Path(args.file).is_file():
            raise FileNotFoundError(f"--file {args.file}: file not found. Fix: give a text file with one input per line.")
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(
                f"--file {args.file}: not UTF-8 text ({error.reason} at byte {error.start}). Fix: save it as UTF-8."
            ) from None
        inputs += [line for line in lines if line.strip()]
    if not inputs:
        raise ValueError("no inputs: give texts or image paths as arguments, or --file with one per line")
    if task == "image-classification":
        _check_images(inputs)
    return inputs


def _model_inputs(inputs: list[str], model_dir: str) -> list[Any]:
    """Return the inputs as the pipeline takes them: `{"text", "text_pair"}` dicts for a pair model."""
    pair_column = text_pair_column(model_dir)
    return inputs if pair_column is None else _parse_pairs(inputs, pair_column)


def _check_images(paths: list[str]) -> None:
    # Decoding every file first turns a folder or a non-image into one message instead of a Pillow traceback
    # halfway through the output.
    from .data.image import image_problem

    problems = []
    for path in paths:
        problem = "a folder, not an image file" if Path(path).is_dir() else image_problem(path)
        if problem is not None:
            problems.append(f"{path} ({problem})")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"cannot classify {len(problems)} input(s): {shown}. Fix: give paths of image files.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune predict",
        description="Classify texts or images with an exported model folder; prints one JSON line per input.",
    )
    parser.add_argument("model_dir", help="Exported model folder (a run's export/ folder).")
    parser.add_argument(
        "inputs", nargs="*",
        help='Texts; JSON objects {"text": ..., "text_pair": ...} for a text-pair model; '
        "image paths for an image model.",
    )
    parser.add_argument("--file", help="File with one text or image path per line.")
    parser.add_argument("--top-k", type=int, default=1, help="Number of classes to print per input (default 1).")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"argument --top-k: {args.top_k} is below 1; give the number of classes to print, 1 or more")
    setup_logging()
    try:
        # Inputs are checked before the model loads, so a typo in a path costs no loading time.
        check_model_folder(Path(args.model_dir))
        task = detect_task(args.model_dir)
        inputs = _read_inputs(args, task)
        model_inputs = inputs if task == "image-classification" else _model_inputs(inputs, args.model_dir)
        predictor = Predictor(args.model_dir)
    except (FileNotFoundError, ValueError, OSError) as error:
        logger.error("%s", error)
        return 2
    for item, result in zip(inputs, predictor.predict(model_inputs, top_k=args.top_k)):
        line = {"input": item, "label": result[0]["label"], "score": round(result[0]["score"], 6)}
        if args.top_k > 1:
            line["top_k"] = result
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
