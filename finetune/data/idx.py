"""Read IDX files (the MNIST / Fashion-MNIST format) into `datasets.Dataset`s with `Image` and `ClassLabel` features.

An IDX file is a big-endian header followed by raw values: two zero bytes, a type code (0x08 = unsigned byte),
the number of dimensions, one 32-bit size per dimension, then the data in C order. Files may be gzipped.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from .common import DataError

# Fashion-MNIST class names in label-index order (label 0 is T-shirt/top, label 9 Ankle boot).
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# File-name prefix of each split in the MNIST family: `train-*` for training, `t10k-*` for the 10,000 test images.
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
_UNSIGNED_BYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file of unsigned bytes (optionally gzipped) into an array of the shape its header gives."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (its first two bytes are not zero). Fix: point data.train at IDX files.")
    type_code, ndim = data[2], data[3]
    if type_code != _UNSIGNED_BYTE:
        raise DataError(f"{path} stores IDX type 0x{type_code:02x}; only unsigned bytes (0x08) are supported.")
    header_end = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    expected = int(np.prod(shape))
    if len(data) - header_end != expected:
        raise DataError(
            f"{path} is truncated or padded: its header promises {expected} values of shape {shape}, "
            f"but {len(data) - header_end} bytes follow. Fix: reinstall or re-download the file."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape)


def find_idx_files(folder: str | os.PathLike, prefix: str) -> tuple[Path, Path]:
    """Return the (images, labels) files of the split with file-name `prefix` in `folder`."""
    folder = Path(folder)
    found = {}
    for kind, tag in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
        candidates = [folder / f"{prefix}-{tag}{suffix}" for suffix in (".gz", "")]
        existing = [candidate for candidate in candidates if candidate.is_file()]
        if not existing:
            raise DataError(f"{candidates[0]} not found. Fix: point data.train at a folder with the IDX files.")
        found[kind] = existing[0]
    return found["images"], found["labels"]


def load_idx_split(images_path: str | os.PathLike, labels_path: str | os.PathLike, label_names: list[str]) -> datasets.Dataset:
    """Read one split into a Dataset with an `image` column (greyscale PNGs) and a `label` ClassLabel column."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{images_path} (shape {images.shape}) and {labels_path} (shape {labels.shape}) do not form one split: "
            "expected N images of HxW and N labels."
        )
    if labels.max(initial=0) >= len(label_names):
        raise DataError(f"{labels_path} has label {int(labels.max())}, but only {len(label_names)} class names are known.")
    # PNG keeps the pixels exact. At zlib level 1 a 28x28 image encodes to about 520 bytes (about 36 MB for
    # 70,000) and 60,000 encode in about 3 s on one core, close to level 6's size in less time.
    encoded = [{"bytes": _png_bytes(image), "path": None} for image in images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=label_names)})
    return datasets.Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def load_idx_folder(folder: str | os.PathLike, label_names: list[str] | None = None) -> datasets.DatasetDict:
    """Read a folder of MNIST-style IDX files into a DatasetDict with `train` (train-*) and `test` (t10k-*).

    `label_names` defaults to the Fashion-MNIST class names. A split whose files are absent is left out,
    but the folder must hold at least the training files.
    """
    names = list(label_names or FASHION_MNIST_LABELS)
    splits = {}
    for split, prefix in SPLIT_PREFIXES.items():
        try:
            images_path, labels_path = find_idx_files(folder, prefix)
        except DataError:
            if split == "train":
                raise
            continue
        splits[split] = load_idx_split(images_path, labels_path, names)
    return datasets.DatasetDict(splits)
