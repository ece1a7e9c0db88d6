"""Image classification data: reading, pre-flight image checks, splitting and per-item preprocessing.

Order matters. `prepare_image_data` reads every source, encodes labels, carves and samples the splits. Then it
decodes every remaining image once (the pre-flight scan) before any weights load. A truncated or non-image file
is therefore reported up front and does not stop a run mid-epoch. Images stay undecoded in the datasets
(`Image(decode=False)`: file path or bytes); DataLoader workers decode, convert to RGB and transform them.

Evaluation runs the backbone's own image processor on each image, which is what
`pipeline("image-classification", model=export_folder)` does, so both give the same tensor. Training applies
`torchvision.transforms.v2` augmentation and then the same rescaling and normalisation, measured from the
processor itself (see `measure_processor`), so no size, mean or std is hard-coded here.
"""

from __future__ import annotations

import io
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2

from ..assets import resolve_path
from ..config import AugmentationConfig, RunConfig
from ..log import get_logger
from . import PreparedData
from .common import (
    LABELS,
    DataError,
    carve_missing_splits,
    class_counts,
    detect_format,
    encode_labels,
    limit_splits,
)
from .idx import load_idx_folder

logger = get_logger(__name__)

SPLITS = ("train", "validation", "test")
IMAGE = "image"
# Sub-folder names of an image folder that mark its splits (compared in lower case).
SPLIT_FOLDER_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"), "test": ("test", "testing")}
# Exceptions Pillow raises for files it cannot decode: OSError covers truncated data and UnidentifiedImageError,
# SyntaxError and struct.error come from malformed headers in some format plugins, EOFError from short files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
# Rows decoded per batch by the pre-flight scan; keeps memory bounded for datasets with embedded bytes.
_SCAN_CHUNK = 2048
# Bad images named one by one in the log and in the error message; the summary lists all of them.
_LOGGED_BAD_IMAGES = 20


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 3-channel RGB.

    Transparency (RGBA, LA, PA, and P or L with a transparent colour) is composited on white, so transparent
    pixels do not turn black. 16- and 32-bit greyscale (I;16*, I) is scaled from 0..65535 to 0..255, and
    float greyscale (F) is read as 0..1 when its maximum is at most 1, else as 0..255. CMYK, YCbCr, LAB, HSV
    and 1-bit images go through Pillow's own conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _high_depth_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 1.0
    else:
        # NOTE: mode I may hold 8-bit values in a 32-bit container; values above 65535 are clipped.
        scale = 255.0 / 65535.0
    grey = np.clip(np.nan_to_num(pixels * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def open_image(source: dict | str) -> Image.Image:
    """Decode an undecoded `Image` value (`{"bytes", "path"}`, or a path) fully into an RGB image.

    EXIF orientation is applied, as `transformers.image_utils.load_image` does. Raises one of `DECODE_ERRORS`
    (or `FileNotFoundError`) for a file that cannot be decoded.
    """
    if isinstance(source, str):
        source = {"path": source, "bytes": None}
    data = source.get("bytes")
    with Image.open(io.BytesIO(data) if data else source["path"]) as image:
        # load() decodes every pixel, so truncated files fail here rather than in a DataLoader worker.
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def describe_source(source: dict | str | None) -> str:
    """Return a short name for an image value: its path, or its byte count when it has no path."""
    if isinstance(source, str):
        return source
    if not source:
        return "<no image>"
    return source.get("path") or f"<{len(source.get('bytes') or b'')} bytes>"


def image_problem(source: dict | str | None) -> str | None:
    """Return why an image value cannot be used (missing, not an image, truncated, ...), or None when it decodes."""
    if source is None or (isinstance(source, dict) and not source.get("bytes") and not source.get("path")):
        return "no image in this row"
    try:
        open_image(source)
    except FileNotFoundError:
        return "file not found"
    except Image.UnidentifiedImageError:
        return "not an image file Pillow can read"
    except DECODE_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Reading sources


def load_image_splits(config: RunConfig) -> datasets.DatasetDict:
    """Read the image data of `config.data` into a DatasetDict of the splits that it gives.

    Each split has an `image` column of undecoded images (`Image(decode=False)`) and the label column
    `data.label_column`. Sources:

    - an image folder, one sub-folder per class, optionally inside `train/`, `validation/` and `test/`;
    - an IDX folder, where `train-*` files become train and `t10k-*` files test;
    - CSV/JSON/JSONL files with image paths relative to the file;
    - Parquet or `save_to_disk` data with an `Image` feature, or a Hub dataset name.

    Splits found inside the `data.train` source fill the ones that the config leaves unset.
    """
    splits: dict[str, datasets.Dataset] = {}
    for split in SPLITS:
        value = getattr(config.data, split)
        if value is None:
            continue
        found = _read_source(value, split, config)
        if split == "train":
            splits.update(found)
        else:
            splits[split] = found.get(split, found.get("train"))
    for split, dataset in splits.items():
        logger.info("Read %d %s images from %s", dataset.num_rows, split, getattr(config.data, split) or config.data.train)
    return datasets.DatasetDict(splits)


def _read_source(value: str, split: str, config: RunConfig) -> dict[str, datasets.Dataset]:
    # Returns {split: Dataset}; folder and IDX sources may return several splits of their own.
    path = resolve_path(value)
    fmt = config.data.format if config.data.format != "auto" else detect_format(path)
    label_column = config.data.label_column
    if fmt == "imagefolder":
        return read_image_folder(path, label_column)
    if fmt == "idx":
        found = load_idx_folder(path)
        if label_column != "label":
            found = datasets.DatasetDict({name: data.rename_column("label", label_column) for name, data in found.items()})
        return {name: data.cast_column(IMAGE, datasets.Image(decode=False)) for name, data in found.items()}
    from .common import load_split  # the shared reader of CSV, JSON, Parquet, save_to_disk and Hub data

    table = load_split(value, split, fmt, config.data.hub_config_name)
    base = Path(path).parent if fmt in ("csv", "json", "parquet") else Path(path)
    return {split: _image_column(table, config.data.image_column, base, value)}


def read_image_paths(value: str, split: str, config: RunConfig) -> list[str]:
    """Return the file paths that a data source's images are read from; embedded images have none."""
    paths = []
    for table in _read_source(value, split, config).values():
        for image in table[IMAGE]:
            if isinstance(image, dict) and image.get("path") and not image.get("bytes"):
                paths.append(image["path"])
    return paths


def read_image_folder(folder: str | os.PathLike, label_column: str = "label") -> dict[str, datasets.Dataset]:
    """Read an image folder: `CLASS/FILE` rows, or `SPLIT/CLASS/FILE` when split sub-folders exist.

    Files are picked by the image extensions that Pillow registers. Other files are counted and logged, never decoded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} not found. Fix: check data.train / data.validation / data.test.")
    children = {child.name.lower(): child for child in folder.iterdir() if child.is_dir()}
    split_dirs = {}
    for split, names in SPLIT_FOLDER_NAMES.items():
        matches = [children[name] for name in names if name in children]
        if matches:
            split_dirs[split] = matches[0]
    if "train" not in split_dirs:
        return {"train": _class_folder_rows(folder, label_column)}
    return {split: _class_folder_rows(path, label_column) for split, path in split_dirs.items()}


def _class_folder_rows(folder: Path, label_column: str) -> datasets.Dataset:
    Image.init()
    extensions = set(Image.registered_extensions())
    paths, labels, skipped = [], [], 0
    for class_dir in sorted(child for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")):
        for file in sorted(path for path in class_dir.rglob("*") if path.is_file() and not path.name.startswith(".")):
            if file.suffix.lower() in extensions:
                paths.append(str(file))
                labels.append(class_dir.name)
            else:
                skipped += 1
    if skipped:
        logger.info("Ignored %d files without an image extension in %s", skipped, folder)
    if not paths:
        raise DataError(
            f"no images found in {folder}. Fix: put images in one sub-folder per class (e.g. {folder}/cat/1.jpg)."
        )
    features = datasets.Features({IMAGE: datasets.Image(decode=False), label_column: datasets.Value("string")})
    return datasets.Dataset.from_dict({IMAGE: [{"path": path, "bytes": None} for path in paths], label_column: labels}, features=features)


def _image_column(table: datasets.Dataset, column: str, base: Path, source: str) -> datasets.Dataset:
    # Normalise the image column to `image` with Image(decode=False); string paths are taken relative to `base`.
    if column not in table.column_names:
        raise DataError(
            f"image column {column!r} not found in {source}. Available columns: {', '.join(table.column_names)}. "
            "Fix: set data.image_column to one of them."
        )
    feature = table.features[column]
    if isinstance(feature, datasets.Image):
        table = table.cast_column(column, datasets.Image(decode=False))
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        paths = [None if value is None else str(base / value) for value in table[column]]
        table = table.remove_columns(column).add_column(column, [{"path": p, "bytes": None} if p else None for p in paths], feature=datasets.Image(decode=False))
    else:
        raise DataError(
            f"image column {column!r} in {source} contains {feature}, neither images nor file paths. "
            "Fix: point data.image_column at a column of image paths or an Image feature."
        )
    return table.rename_column(column, IMAGE) if column != IMAGE else table


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight scan


def scan_images(dataset: datasets.Dataset, workers: int = 4) -> list[tuple[int, str, str]]:
    """Decode every image of `dataset` and return (row, path, reason) for each one that fails.

    Threads suffice because Pillow releases the GIL while decoding.
    """
    bad = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, dataset.num_rows, _SCAN_CHUNK):
            sources = dataset[start : start + _SCAN_CHUNK][IMAGE]
            for offset, (source, problem) in enumerate(zip(sources, pool.map(image_problem, sources))):
                if problem is not None:
                    bad.append((start + offset, describe_source(source), problem))
    return bad


def drop_bad_images(splits: datasets.DatasetDict, policy: str, workers: int) -> tuple[datasets.DatasetDict, list[dict]]:
    """Scan every split; drop the bad images (policy `skip`) or raise `DataError` listing them (policy `error`)."""
    cleaned, reports = {}, []
    for split, dataset in splits.items():
        bad = scan_images(dataset, workers)
        reports += [{"split": split, "row": row, "path": path, "reason": reason} for row, path, reason in bad]
        bad_rows = {row for row, _, _ in bad}
        cleaned[split] = dataset.select([row for row in range(dataset.num_rows) if row not in bad_rows]) if bad else dataset
        if bad:
            for _, path, reason in bad[:_LOGGED_BAD_IMAGES]:
                logger.warning("Bad %s image %s: %s", split, path, reason)
            if len(bad) > _LOGGED_BAD_IMAGES:
                logger.warning("... and %d more bad %s images (all are listed in the data summary)", len(bad) - _LOGGED_BAD_IMAGES, split)
        if policy == "skip":
            logger.info("Using %d of %d %s images (%d unreadable skipped)", cleaned[split].num_rows, dataset.num_rows, split, len(bad))
    if reports and policy == "error":
        listed = "; ".join(f"{item['split']} {item['path']}: {item['reason']}" for item in reports[:_LOGGED_BAD_IMAGES])
        more = f"; and {len(reports) - _LOGGED_BAD_IMAGES} more" if len(reports) > _LOGGED_BAD_IMAGES else ""
        raise DataError(
            f"{len(reports)} image(s) cannot be decoded: {listed}{more}. "
            "Fix: repair or remove them, or set data.bad_image_policy: skip."
        )
    for split, dataset in cleaned.items():
        if dataset.num_rows == 0:
            raise DataError(f"no readable images are left in the {split} data. Fix: check the image files.")
    return datasets.DatasetDict(cleaned), reports


# ---------------------------------------------------------------------------------------------------------------
# Transforms


@dataclass(frozen=True)
class ProcessorGeometry:
    """Output size of a processor and the per-channel affine map from [0, 1] pixels to its output values.

    The processor computes `(pixel / 255 - mean) / std` in effect (after any rescale offset), per channel.
    """

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: InterpolationMode


def run_processor(processor: Any, image: Image.Image) -> torch.Tensor:
    """Return the processor's `pixel_values` for one image: float32 [3, H, W]."""
    return processor(images=image, return_tensors="pt")["pixel_values"][0].to(torch.float32)


def measure_processor(processor: Any) -> ProcessorGeometry:
    """Measure the output size and normalisation of `processor` by running it on a few synthetic images.

    Running the processor covers every way processors express rescaling and normalisation (mean/std,
    rescale offsets, timm's data config) without reading their attributes. Black and white images give the
    affine map per channel; landscape and portrait images show whether the output size is fixed. Raises
    `ValueError` when it is not, because training batches must have one size.
    """
    landscape = run_processor(processor, Image.new("RGB", (96, 64), (0, 0, 0)))
    portrait = run_processor(processor, Image.new("RGB", (64, 96), (255, 255, 255)))
    if landscape.shape != portrait.shape:
        raise ValueError(
            f"{type(processor).__name__} gives inputs of different sizes ({tuple(landscape.shape)} for a 96x64 "
            f"image, {tuple(portrait.shape)} for 64x96), so images cannot be batched. "
            "Fix: use a processor with a centre crop or a fixed height and width."
        )
    black = landscape.mean(dim=(1, 2))
    white = portrait.mean(dim=(1, 2))
    span = white - black
    if bool((span.abs() < 1e-6).any()):
        raise ValueError(f"{type(processor).__name__} maps black and white to the same value; cannot measure it.")
    std = 1.0 / span
    mean = -black * std
    return ProcessorGeometry(
        height=int(landscape.shape[1]),
        width=int(landscape.shape[2]),
        mean=tuple(float(value) for value in mean),
        std=tuple(float(value) for value in std),
        interpolation=processor_interpolation(processor),
    )


_PIL_TO_TORCHVISION = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}


def processor_interpolation(processor: Any) -> InterpolationMode:
    """Return the resampling filter the processor resizes with (timm data config or `resample`), as torchvision's."""
    data_config = getattr(processor, "data_config", None)
    if isinstance(data_config, dict) and isinstance(data_config.get("interpolation"), str):
        name = data_config["interpolation"]
        try:
            return InterpolationMode(name)
        except ValueError:
            logger.warning("timm interpolation %r has no torchvision equivalent; training crops use bicubic", name)
            return InterpolationMode.BICUBIC
    resample = getattr(processor, "resample", None)
    if isinstance(resample, InterpolationMode):
        return resample
    if resample is not None and int(resample) in _PIL_TO_TORCHVISION:
        return _PIL_TO_TORCHVISION[int(resample)]
    logger.warning("%s states no resampling filter; training crops use bilinear", type(processor).__name__)
    return InterpolationMode.BILINEAR


class EvalTransform:
    """Deterministic preprocessing: the backbone's processor itself, as `pipeline()` runs it."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return run_processor(self.processor, image)


class TrainTransform:
    """Random augmentation (torchvision.transforms.v2) followed by the processor's own normalisation.

    With `random_resized_crop`, crops are resized straight to the processor's output size and normalised with
    the measured mean and std. Without it, flips and the policy run on the full image and the processor does
    the rest, so the geometry is exactly the evaluation one.
    """

    def __init__(self, processor: Any, augmentation: AugmentationConfig, geometry: ProcessorGeometry):
        self.processor = processor
        self.random_resized_crop = augmentation.random_resized_crop
        steps: list[Any] = []
        if augmentation.random_resized_crop:
            steps.append(
                v2.RandomResizedCrop(
                    (geometry.height, geometry.width),
                    scale=(augmentation.crop_scale_min, 1.0),
                    interpolation=geometry.interpolation,
                    antialias=True,
                )
            )
        if augmentation.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        if augmentation.policy == "trivial":
            steps.append(v2.TrivialAugmentWide(interpolation=geometry.interpolation))
        elif augmentation.policy == "randaugment":
            steps.append(v2.RandAugment(interpolation=geometry.interpolation))
        self.augment = v2.Compose(steps) if steps else v2.Identity()
        self.to_tensor = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(geometry.mean), list(geometry.std))]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        augmented = self.augment(image)
        if self.random_resized_crop:
            return self.to_tensor(augmented)
        return run_processor(self.processor, augmented)


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """Return the torch seed of one example's augmentation, a pure function of (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Map-style dataset of `{"pixel_values": [3, H, W] float32, "labels": int}` items, decoded on access.

    It holds only the Arrow-backed rows and the transform, so DataLoader workers get it cheaply. With `seed`
    set (training), each item's random augmentation is seeded by `augmentation_seed(seed, epoch, index)`,
    so a resumed run gets the same augmented images; call `set_epoch` before each epoch's iterator.
    """

    def __init__(self, rows: datasets.Dataset, transform: Callable[[Image.Image], torch.Tensor], seed: int | None = None):
        self.rows = rows
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, index: int) -> dict:
        row = self.rows[int(index)]
        image = self._decode(index, row[IMAGE])
        if self.seed is None:
            pixel_values = self.transform(image)
        else:
            # fork_rng restores the worker's global RNG afterwards; v2 transforms draw from the global generator.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(augmentation_seed(self.seed, self.epoch, int(index)))
                pixel_values = self.transform(image)
        return {"pixel_values": pixel_values, LABELS: int(row[LABELS])}

    def _decode(self, index: int, source: dict) -> Image.Image:
        try:
            return open_image(source)
        except DECODE_ERRORS as error:
            # The pre-flight scan decoded this file, so it changed since. A grey image keeps the epoch going.
            logger.warning("Image %s of row %d failed to decode mid-run (%s); using a grey image", describe_source(source), index, error)
            return Image.new("RGB", (64, 64), (128, 128, 128))


def collate_images(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Stack items into `pixel_values` [B, 3, H, W] float32 and `labels` [B] int64."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        LABELS: torch.tensor([item[LABELS] for item in batch], dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------------------------
# Preparation


def prepare_image_data(config: RunConfig, processor: Any) -> PreparedData:
    """Read, check, split and wrap the image data of `config`; see `PreparedData` for the result.

    Call it after loading the processor and before loading model weights: unreadable sources, bad labels and
    (with `data.bad_image_policy: error`) bad images raise `DataError` here. The summary holds `rows_read`,
    `dropped` (`label_not_kept`, `bad_image`, per split), `bad_images` (split, row, path, reason), `carved`,
    `rows`, `class_counts` and `preprocessing` (output size, mean, std, interpolation).
    """
    data = config.data
    geometry = measure_processor(processor)
    splits = load_image_splits(config)
    summary: dict[str, Any] = {"rows_read": _row_counts(splits), "dropped": {}}
    splits, label_names = encode_labels(splits, data.label_column, data.keep_labels)
    summary["dropped"]["label_not_kept"] = {split: summary["rows_read"][split] - splits[split].num_rows for split in splits}
    splits, summary["carved"] = carve_missing_splits(splits, config)
    splits = limit_splits(splits, config)
    checked, summary["bad_images"] = drop_bad_images(splits, data.bad_image_policy, _scan_workers(config))
    summary["dropped"]["bad_image"] = {split: splits[split].num_rows - checked[split].num_rows for split in splits}
    summary["rows"] = _row_counts(checked)
    summary["class_counts"] = {split: class_counts(dataset, label_names) for split, dataset in checked.items()}
    summary["preprocessing"] = _describe_geometry(geometry, data.augmentation)
    logger.info("Image data ready: %s rows, classes %s, inputs %dx%d", summary["rows"], ", ".join(label_names), geometry.height, geometry.width)

    rows = {split: dataset.select_columns([IMAGE, LABELS]) for split, dataset in checked.items()}
    evaluation = EvalTransform(processor)
    return PreparedData(
        train=ImageClassificationDataset(rows["train"], TrainTransform(processor, data.augmentation, geometry), seed=config.training.seed),
        validation=ImageClassificationDataset(rows["validation"], evaluation) if "validation" in rows else None,
        test=ImageClassificationDataset(rows["test"], evaluation) if "test" in rows else None,
        label_names=label_names,
        collate_fn=collate_images,
        raw_validation=rows["validation"].cast_column(IMAGE, datasets.Image()) if "validation" in rows else None,
        summary=summary,
        augmented=_is_augmented(data.augmentation),
    )


def _is_augmented(augmentation: AugmentationConfig) -> bool:
    return augmentation.random_resized_crop or augmentation.horizontal_flip or augmentation.policy != "none"


def _scan_workers(config: RunConfig) -> int:
    return max(2, config.training.dataloader_num_workers, min(8, os.cpu_count() or 1))


def _describe_geometry(geometry: ProcessorGeometry, augmentation: AugmentationConfig) -> dict:
    return {
        "height": geometry.height,
        "width": geometry.width,
        "mean": [round(value, 6) for value in geometry.mean],
        "std": [round(value, 6) for value in geometry.std],
        "interpolation": geometry.interpolation.value,
        "augmentation": augmentation.model_dump(),
    }


def _row_counts(splits: datasets.DatasetDict) -> dict[str, int]:
    return {split: dataset.num_rows for split, dataset in splits.items()}
