"""Data steps shared by the text and image paths: reading splits, label encoding, de-duplication, carving.

Every data problem raises `DataError`, whose message names the offending value and the fix. The public
functions here are used by `finetune.data.text` and `finetune.data.image`; keep their signatures stable.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa
from datasets.exceptions import DatasetGenerationError

from ..assets import resolve_path
from ..log import get_logger

if TYPE_CHECKING:
    from ..config import RunConfig

logger = get_logger(__name__)

SPLITS = ("train", "validation", "test")
IMAGE_FORMATS = ("imagefolder", "idx")
# Column that carries the encoded class index after `encode_labels`; transformers models read `labels`.
LABELS = "labels"

# File suffix -> (datasets builder, builder keyword arguments). Compressed files are decompressed by datasets.
_SUFFIX_BUILDERS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_FORMAT_BUILDERS = {"csv": "csv", "json": "json", "parquet": "parquet"}


class DataError(ValueError):
    """A problem with the data itself (not the config's syntax); the message names the value and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load_raw_splits(config: RunConfig) -> datasets.DatasetDict:
    """Read `config.data.train`, `.validation` and `.test` into a DatasetDict with the splits that are given.

    Each path is read by `config.data.format`, or by `detect_format` when that is `auto`: CSV/TSV (also
    `.gz`/`.bz2`/`.xz`/`.zst`), JSON or JSON Lines, Parquet, a `save_to_disk` folder, or a Hub dataset name.
    Values may be `asset:NAME` (see `finetune.assets.resolve_path`). A multi-split source (a saved
    DatasetDict or a Hub dataset) gives the split named like the config key (`train`, `validation`,
    `test`); write `SOURCE:SPLIT` to pick another split. Image formats are read by
    `finetune.data.image.load_image_splits(config)`. Splits that are not given are absent from the result;
    `carve_splits` makes them.
    """
    formats = {split: _format_of(config, split) for split in SPLITS if getattr(config.data, split)}
    if any(fmt in IMAGE_FORMATS for fmt in formats.values()):
        from .image import load_image_splits

        return load_image_splits(config)
    loaded = {}
    for split, fmt in formats.items():
        loaded[split] = load_split(getattr(config.data, split), split, fmt, config.data.hub_config_name)
        logger.info("Read %d %s rows from %s (%s)", loaded[split].num_rows, split, getattr(config.data, split), fmt)
    return datasets.DatasetDict(loaded)


def _format_of(config: RunConfig, split: str) -> str:
    if config.data.format != "auto":
        return config.data.format
    source, _ = _split_source(resolve_path(getattr(config.data, split)))
    return detect_format(source)


def detect_format(path: str) -> str:
    """Return the data format of `path`: csv, json, parquet, disk, idx, imagefolder or hub.

    A folder is `disk` when it contains a `save_to_disk` dataset, `idx` when it contains IDX files
    (`*-ubyte`, optionally gzipped), and `imagefolder` otherwise. A path that does not exist is a Hub
    dataset name, unless it looks like a file (has a known suffix or a path separator at its start).
    """
    target = Path(path)
    if target.is_dir():
        if (target / "dataset_dict.json").is_file() or (target / "state.json").is_file():
            return "disk"
        if any(child.name.endswith(("-ubyte", "-ubyte.gz")) for child in target.iterdir()):
            return "idx"
        return "imagefolder"
    builder = _builder_for_suffix(target.name)
    if target.is_file():
        if builder is None:
            raise DataError(
                f"cannot tell the format of {path!r} from its suffix. Fix: set data.format to csv, json or parquet, "
                "or rename the file to .csv/.tsv/.json/.jsonl/.parquet."
            )
        return {"csv": "csv", "json": "json", "parquet": "parquet"}[builder[0]]
    if builder is not None or path.startswith(("/", "./", "../", "~")):
        raise DataError(f"data file {path!r} not found. Fix: check the path (relative paths start at the working directory).")
    return "hub"


def _builder_for_suffix(name: str) -> tuple[str, dict] | None:
    lowered = name.lower()
    for compression in _COMPRESSIONS:
        if lowered.endswith(compression):
            lowered = lowered[: -len(compression)]
            break
    return _SUFFIX_BUILDERS.get(os.path.splitext(lowered)[1])


def _split_source(value: str) -> tuple[str, str | None]:
    # `SOURCE:SPLIT` picks a split of a multi-split source; an existing path that contains ':' is taken whole.
    if Path(value).exists() or ":" not in value:
        return value, None
    source, _, split = value.rpartition(":")
    return source, split or None


def load_split(value: str, split: str, fmt: str, hub_config_name: str | None) -> datasets.Dataset:
    """Read one split from a config value (`asset:NAME`, a path, a Hub name, optionally `SOURCE:SPLIT`).

    `fmt` is csv, json, parquet, disk or hub (see `detect_format`); `split` is the config key being read,
    which names the split taken from a multi-split source when the value does not name one.
    """
    source, chosen_split = _split_source(resolve_path(value))
    if fmt in _FORMAT_BUILDERS:
        builder, kwargs = _builder_for_suffix(source) or (_FORMAT_BUILDERS[fmt], {})
        if builder != _FORMAT_BUILDERS[fmt]:
            builder, kwargs = _FORMAT_BUILDERS[fmt], {}
        return _load_file(builder, source, kwargs)
    if fmt == "disk":
        return _pick_split(datasets.load_from_disk(source), chosen_split or split, source)
    if fmt == "hub":
        return _load_hub_split(source, hub_config_name, chosen_split or split)
    raise DataError(f"data.format {fmt!r} cannot read {value!r}. Fix: use csv, json, parquet, disk or hub for text data.")


def _load_file(builder: str, source: str, kwargs: dict) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files={"train": source}, split="train", **kwargs)
    except (DatasetGenerationError, pa.ArrowException) as error:
        # datasets wraps the parser's error (pandas, pyarrow) in a generic message, so name the root cause.
        # The parquet builder reads the schema before generating, so its errors arrive unwrapped.
        cause = error.__cause__ or error
        raise DataError(
            f"could not read {source!r} as {builder}: {type(cause).__name__}: {cause}. Fix: repair the file "
            "(unbalanced quotes, wrong column count, invalid JSON lines), or set data.format if the suffix is wrong."
        ) from error
    except ValueError as error:
        # datasets (checked with 5.2) raises this ValueError when the file has a header but no rows.
        if "corresponds to no data" not in str(error):
            raise
        raise DataError(f"{source!r} has no data rows. Fix: add labelled rows to the file.") from error


def _load_hub_split(name: str, hub_config_name: str | None, split: str) -> datasets.Dataset:
    # NOTE: the download itself is never exercised by the tests, which run with HF_HUB_OFFLINE=1.
    try:
        return datasets.load_dataset(name, hub_config_name, split=split)
    except (ConnectionError, FileNotFoundError) as error:
        raise DataError(
            f"could not load Hub dataset {name!r} (split {split!r}): {error}. Fix: check the name and the network "
            "(HF_HUB_OFFLINE must be unset), or point the data path at a local file."
        ) from error


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise DataError(
            f"{source!r} has no split {split!r} (it has {', '.join(loaded)}). Fix: write {source}:SPLIT with one of those."
        )
    return loaded[split]


# ---------------------------------------------------------------------------------------------------------------
# Columns and labels


def column_values(dataset: datasets.Dataset, column: str) -> list:
    """Return one column as a Python list (datasets 5 returns a lazy `Column`, slow to iterate row by row)."""
    return dataset[column][:]


def check_columns(splits: datasets.DatasetDict, columns: list[str]) -> None:
    """Raise `DataError` when a split lacks one of `columns`, listing the columns it has."""
    for split, dataset in splits.items():
        missing = [column for column in columns if column not in dataset.column_names]
        if missing:
            raise DataError(
                f"column {', '.join(repr(c) for c in missing)} not found in the {split} data. "
                f"Available columns: {', '.join(dataset.column_names)}. Fix: set data.text_column / "
                "data.text_pair_column / data.label_column to one of them." + _delimiter_hint(dataset.column_names)
            )


def _delimiter_hint(column_names: list[str]) -> str:
    # A semicolon- or tab-separated file read as CSV gives one column whose name still contains the separators.
    fixes = {";": ("semicolons", "save it with commas"), "\t": ("tabs", "save it with commas, or name it .tsv")}
    if len(column_names) != 1:
        return ""
    for separator, (name, fix) in fixes.items():
        if separator in column_names[0]:
            return (f" The file has one column whose name contains {name}, so its fields are probably separated "
                    f"by {name}, not commas. Fix: {fix}.")
    return ""


def encode_labels(
    splits: datasets.DatasetDict, label_column: str, keep_labels: list[str] | None
) -> tuple[datasets.DatasetDict, list[str]]:
    """Encode labels as class indices in a `labels` ClassLabel column; return the splits and the class names.

    Labels may be strings, integers or a ClassLabel feature. The class order is deterministic: a ClassLabel
    keeps its names, integers go in numeric order (named by their decimal text) and strings are sorted.
    Rows whose label is not in `keep_labels` (compared as text) are dropped; the caller counts them from the
    row counts. Raises `DataError` for null labels, mixed integer and string labels, a `keep_labels` entry that
    no training row has, training data with fewer than two classes, and a label that appears only in
    validation or test (naming it and its row count).
    """
    keys = {split: _label_keys(dataset, label_column, split) for split, dataset in splits.items()}
    order = _class_order(splits["train"].features[label_column], keys)
    if keep_labels is not None:
        order = _apply_keep_labels(order, keep_labels)
    _check_two_classes(order, label_column)
    index = {key: position for position, key in enumerate(order)}
    encoded = {}
    for split, dataset in splits.items():
        kept_rows = list(range(dataset.num_rows))
        if keep_labels is not None:
            kept_rows = [row for row in kept_rows if str(keys[split][row]) in keep_labels]
        _check_unseen(split, [keys[split][row] for row in kept_rows], index)
        ids = [index[keys[split][row]] for row in kept_rows]
        subset = dataset.select(kept_rows) if len(kept_rows) < dataset.num_rows else dataset
        if LABELS in subset.column_names:
            subset = subset.remove_columns(LABELS)
        names = [str(key) for key in order]
        encoded[split] = subset.add_column(LABELS, ids, feature=datasets.ClassLabel(names=names))
    return datasets.DatasetDict(encoded), [str(key) for key in order]


def _label_keys(dataset: datasets.Dataset, column: str, split: str) -> list[Any]:
    feature = dataset.features[column]
    values = column_values(dataset, column)
    nulls = sum(value is None for value in values)
    if nulls:
        raise DataError(
            f"{nulls} {split} row(s) have no value in label column {column!r}. Fix: fill in or remove those rows."
        )
    if isinstance(feature, datasets.ClassLabel):
        return [feature.names[value] for value in values]
    if all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in values):
        return [int(value) for value in values]
    if all(isinstance(value, str) for value in values):
        return list(values)
    kinds = sorted({type(value).__name__ for value in values})
    raise DataError(
        f"label column {column!r} in the {split} data contains {', '.join(kinds)} values. "
        "Fix: use class names (strings) or integer class ids."
    )


def _class_order(train_feature: Any, keys: dict[str, list[Any]]) -> list[Any]:
    kinds = {type(key) for values in keys.values() for key in values}
    if len(kinds) > 1:
        raise DataError("labels mix integers and strings across splits. Fix: write every split's labels the same way.")
    if isinstance(train_feature, datasets.ClassLabel):
        present = set(keys["train"])
        return [name for name in train_feature.names if name in present]
    return sorted(set(keys["train"]))


def _apply_keep_labels(order: list[Any], keep_labels: list[str]) -> list[Any]:
    known = {str(key) for key in order}
    unknown = [label for label in keep_labels if label not in known]
    if unknown:
        raise DataError(
            f"data.keep_labels lists {', '.join(repr(label) for label in unknown)}, which no training row has. "
            f"Training labels: {', '.join(sorted(known))}. Fix: correct data.keep_labels."
        )
    return [key for key in order if str(key) in keep_labels]


def _check_two_classes(order: list[Any], label_column: str) -> None:
    # A classifier with one class always predicts it, so training would only report a perfect, empty score.
    if len(order) < 2:
        found = ", ".join(repr(str(key)) for key in order) or "none"
        raise DataError(
            f"the training data has {len(order)} class(es) ({found}) in label column {label_column!r}, and "
            "classification needs at least two. Fix: add examples of other classes (for an image folder, one "
            "sub-folder per class), or set data.label_column to the column that holds the classes."
        )


def _check_unseen(split: str, keys: list[Any], index: dict[Any, int]) -> None:
    unseen = Counter(key for key in keys if key not in index)
    if unseen:
        listed = ", ".join(f"{key!r} ({count} rows)" for key, count in sorted(unseen.items(), key=str))
        raise DataError(
            f"label(s) {listed} appear in the {split} data but not in the training data, so the model cannot "
            "learn them. Fix: add training rows with these labels, or drop them with data.keep_labels."
        )


def class_counts(dataset: datasets.Dataset, label_names: list[str]) -> dict[str, int]:
    """Return rows per class name of an encoded dataset, in class order (classes without rows count 0)."""
    counts = Counter(column_values(dataset, LABELS))
    return {name: counts.get(position, 0) for position, name in enumerate(label_names)}


# ---------------------------------------------------------------------------------------------------------------
# De-duplication, carving and sampling


def deduplicate(dataset: datasets.Dataset, columns: list[str]) -> tuple[datasets.Dataset, int]:
    """Drop rows whose values in `columns` repeat an earlier row's; return the dataset and the removed count.

    The first occurrence is kept, so the result keeps the file order. Run it before `carve_splits` so that
    one text cannot end up in both train and test.
    """
    seen: set[tuple] = set()
    keep = []
    rows = zip(*(column_values(dataset, column) for column in columns))
    for position, key in enumerate(rows):
        if key not in seen:
            seen.add(key)
            keep.append(position)
    removed = dataset.num_rows - len(keep)
    return (dataset.select(keep) if removed else dataset), removed


def split_count(size: float, total: int) -> int:
    """Return the rows a split of `size` takes from `total`: a share when below 1 (at least 1 row), else a count."""
    if size <= 0:
        return 0
    if size < 1:
        return max(1, int(round(size * total)))
    return int(size)


def carve_splits(
    dataset: datasets.Dataset,
    validation_size: float,
    test_size: float,
    stratify: bool,
    seed: int,
    label_column: str = LABELS,
) -> datasets.DatasetDict:
    """Split `dataset` into train, validation and test; a size of 0 leaves that split out of the result.

    Sizes are shares of `dataset` when below 1 and row counts otherwise. Test rows are drawn first, then
    validation rows from the rest, both with a numpy generator seeded by `seed`. With `stratify`, each class
    (values of `label_column`) gets its proportional share, rounded by largest remainder, and at least one row
    in every carved split. Each split keeps the input order. Raises `DataError` when the sizes leave no
    training rows, or when a class has too few rows to appear in train and in every carved split.
    """
    total = dataset.num_rows
    counts = {"test": split_count(test_size, total), "validation": split_count(validation_size, total)}
    if sum(counts.values()) >= total:
        raise DataError(
            f"carving {counts['validation']} validation and {counts['test']} test rows from {total} rows leaves "
            "none to train on. Fix: lower data.validation_size / data.test_size, or give validation/test files."
        )
    carved = [split for split, count in counts.items() if count]
    labels = np.asarray(column_values(dataset, label_column)) if stratify else np.zeros(total, dtype=np.int64)
    if stratify:
        _check_class_sizes(dataset, labels, len(carved), label_column)
    rng = np.random.default_rng(seed)
    remaining = np.arange(total)
    parts = {}
    for split in carved:
        chosen = _stratified_draw(labels[remaining], counts[split], rng, at_least_one=stratify)
        parts[split] = np.sort(remaining[chosen])
        remaining = np.setdiff1d(remaining, parts[split], assume_unique=True)
    result = {"train": dataset.select(remaining)}
    result.update({split: dataset.select(parts[split]) for split in ("validation", "test") if split in parts})
    return datasets.DatasetDict(result)


def _check_class_sizes(dataset: datasets.Dataset, labels: np.ndarray, carved: int, label_column: str) -> None:
    feature = dataset.features.get(label_column)
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    values, sizes = np.unique(labels, return_counts=True)
    for value, size in zip(values, sizes):
        if size < carved + 1:
            name = names[value] if names else value
            raise DataError(
                f"class {name!r} has {size} row(s), too few for a stratified split into train and {carved} carved "
                f"split(s) (needs {carved + 1}). Fix: add rows of this class, drop it with data.keep_labels, or set "
                "data.stratify: false."
            )


def _stratified_draw(labels: np.ndarray, count: int, rng: np.random.Generator, at_least_one: bool) -> np.ndarray:
    """Return positions of `count` rows drawn per class in proportion to the class sizes of `labels`."""
    classes, sizes = np.unique(labels, return_counts=True)
    quotas = _allocate(count, sizes, at_least_one)
    chosen = []
    for value, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == value)
        chosen.append(rng.permutation(members)[:quota])
    return np.concatenate(chosen) if chosen else np.array([], dtype=np.int64)


def _allocate(count: int, sizes: np.ndarray, at_least_one: bool) -> list[int]:
    # Largest-remainder rounding keeps the total exact; ties go to the earlier class, so the result is stable.
    exact = count * sizes / sizes.sum()
    quotas = np.floor(exact).astype(int)
    for position in np.argsort(-(exact - quotas), kind="stable")[: count - quotas.sum()]:
        quotas[position] += 1
    # Each class keeps one row for train; with `at_least_one` every class also gets one carved row.
    ceiling = sizes - 1
    floor = np.minimum(1, ceiling) if at_least_one else np.zeros_like(sizes)
    quotas = np.clip(quotas, floor, ceiling)
    while quotas.sum() > count and (quotas > floor).any():
        quotas[np.argmax(np.where(quotas > floor, quotas, -1))] -= 1
    while quotas.sum() < count and (quotas < ceiling).any():
        quotas[np.argmax(np.where(quotas < ceiling, ceiling - quotas, -1))] += 1
    return quotas.tolist()


def limit_rows(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """Return a seeded random sample of `n` rows in input order, or `dataset` itself when `n` is None or not smaller."""
    if n is None or n >= dataset.num_rows:
        return dataset
    chosen = np.sort(np.random.default_rng(seed).permutation(dataset.num_rows)[:n])
    return dataset.select(chosen)


def carve_missing_splits(splits: datasets.DatasetDict, config: RunConfig) -> tuple[datasets.DatasetDict, list[str]]:
    """Carve validation and test splits that the data does not provide out of train; return the carved names."""
    data = config.data
    validation_size = data.validation_size if "validation" not in splits else 0
    test_size = data.test_size if "test" not in splits else 0
    if not validation_size and not test_size:
        return splits, []
    carved = carve_splits(splits["train"], validation_size, test_size, data.stratify, data.split_seed, LABELS)
    result = dict(splits)
    result.update(carved)
    names = [split for split in ("validation", "test") if split in carved]
    logger.info("Carved %s from the training data (seed %d)", " and ".join(names), data.split_seed)
    return datasets.DatasetDict(result), names


def limit_splits(splits: datasets.DatasetDict, config: RunConfig) -> datasets.DatasetDict:
    """Apply data.max_train_samples to train and data.max_eval_samples to the other splits (seeded samples)."""
    data = config.data
    limited = {}
    for split, dataset in splits.items():
        cap = data.max_train_samples if split == "train" else data.max_eval_samples
        limited[split] = limit_rows(dataset, cap, data.split_seed)
    return datasets.DatasetDict(limited)
