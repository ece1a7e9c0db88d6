"""Text classification data: pre-flight checks, cleaning, splitting and cached tokenisation.

Order matters: every check that can fail on the data runs in `preflight_text`, before tokenisation and before
the caller loads model weights. Tokenised splits are cached as Arrow files keyed on the data's content, the
tokenizer and `max_length`, so a second run with the same inputs skips tokenisation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from transformers import AutoConfig, DataCollatorWithPadding, PreTrainedTokenizerBase

from ..assets import resolve_path
from ..config import RunConfig
from ..log import get_logger
from . import PreparedData
from .common import (
    LABELS,
    DataError,
    carve_missing_splits,
    check_columns,
    class_counts,
    column_values,
    deduplicate,
    encode_labels,
    limit_splits,
    load_raw_splits,
)

logger = get_logger(__name__)

# Bump when the layout of cached tokenised files changes, so old cache files are not reused.
_CACHE_VERSION = "1"
# transformers sets `model_max_length` to about 1e30 when a tokenizer does not know its model's limit.
_UNKNOWN_LIMIT = 1_000_000


def prepare_text_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read, check, clean, split and tokenise the text data of `config`; see `PreparedData` for the result.

    Call it after loading the tokenizer and before loading model weights: every data problem raises
    `DataError` here first. Items of the returned splits are dicts with `input_ids`, `attention_mask`
    (and `token_type_ids` where the tokenizer makes them) as lists of ints, plus the class index `labels`;
    `collate_fn` pads them per batch to the longest item. In multi-process runs call it on the main process
    first (`accelerator.main_process_first()`) so the other processes read its cache files.
    """
    max_length = resolve_max_length(config, tokenizer, _load_model_config(config))
    splits, label_names, summary = preflight_text(config, tokenizer, max_length=max_length)
    text_columns = _text_columns(config)
    cache_dir = tokenized_cache_dir()
    tokenizer_id = tokenizer_identity(tokenizer)
    tokenized, cache_state = {}, {}
    for split, dataset in splits.items():
        tokenized[split], cache_state[split] = tokenize_split(
            dataset, tokenizer, text_columns, max_length, cache_dir, tokenizer_id
        )
    lengths = token_lengths(tokenized["train"])
    summary["tokenization_cache"] = cache_state
    summary["max_length"] = max_length
    summary["train_rows_at_max_length"] = sum(length == max_length for length in lengths) if max_length else 0
    logger.info("Tokenised data (cache %s in %s)", ", ".join(f"{s}: {c}" for s, c in cache_state.items()), cache_dir)
    return PreparedData(
        train=tokenized["train"],
        validation=tokenized.get("validation"),
        test=tokenized.get("test"),
        label_names=label_names,
        collate_fn=DataCollatorWithPadding(tokenizer),
        lengths=lengths,
        raw_validation=raw_text_view(splits["validation"], config) if "validation" in splits else None,
        summary=summary,
    )


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight checks and cleaning


def preflight_text(
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    splits: datasets.DatasetDict | None = None,
    max_length: int | None = None,
    model_config: Any = None,
) -> tuple[datasets.DatasetDict, list[str], dict]:
    """Run every data check and return the cleaned, label-encoded splits, the class names and a summary.

    Checks, each raising `DataError` that names the value and the fix: `data.max_length` above the model's
    limit (when `tokenizer` or `model_config` is given and `max_length` is not), missing text, pair or label
    columns, empty or null texts (under `data.empty_text_policy: error`), null labels, a label present only in
    validation or test, and a class too small for a stratified split. Cleaning, in order: drop labels outside
    `data.keep_labels`, drop empty texts (policy `drop`), de-duplicate each split and remove training rows
    whose text is also in a validation or test file, carve the missing splits, then sample
    `max_train_samples` / `max_eval_samples`. `splits` defaults to `load_raw_splits(config)`.

    The summary holds `rows_read`, `dropped` (`label_not_kept`, `empty_text`, per split), `duplicates_removed`
    (per split), `train_rows_also_in_eval`, `carved` (split names), `rows` and `class_counts` (per split).
    """
    data = config.data
    if max_length is None and (tokenizer is not None or model_config is not None):
        resolve_max_length(config, tokenizer, model_config)
    splits = load_raw_splits(config) if splits is None else splits
    text_columns = _text_columns(config)
    check_columns(splits, text_columns + [data.label_column])
    summary: dict[str, Any] = {"rows_read": _row_counts(splits), "dropped": {}}

    # Labels first: rows outside keep_labels are irrelevant, so their empty texts must not stop the run.
    splits, label_names = encode_labels(splits, data.label_column, data.keep_labels)
    read = summary["rows_read"]
    summary["dropped"]["label_not_kept"] = {split: read[split] - splits[split].num_rows for split in splits}
    splits, summary["dropped"]["empty_text"] = handle_empty_texts(splits, text_columns, data.empty_text_policy)

    summary["duplicates_removed"] = {split: 0 for split in splits}
    summary["train_rows_also_in_eval"] = 0
    if data.deduplicate:
        splits, summary["duplicates_removed"], summary["train_rows_also_in_eval"] = _deduplicate_splits(splits, text_columns)
    splits, summary["carved"] = carve_missing_splits(splits, config)
    splits = limit_splits(splits, config)
    summary["rows"] = _row_counts(splits)
    summary["class_counts"] = {split: class_counts(dataset, label_names) for split, dataset in splits.items()}
    _log_removed_rows(summary)
    logger.info("Data ready: %s rows, classes %s", summary["rows"], ", ".join(label_names))
    return splits, label_names, summary


def _log_removed_rows(summary: dict[str, Any]) -> None:
    # Without this line the only trace of dropped rows is the model card, and "Data ready" looks short.
    reasons = {
        "with a label outside data.keep_labels": summary["dropped"]["label_not_kept"],
        "with an empty text (data.empty_text_policy: drop)": summary["dropped"]["empty_text"],
        "repeating an earlier text (data.deduplicate)": summary["duplicates_removed"],
    }
    for reason, counts in reasons.items():
        removed = {split: count for split, count in counts.items() if count}
        if removed:
            per_split = ", ".join(f"{split} {count}" for split, count in removed.items())
            logger.info("Removed %d row(s) %s: %s", sum(removed.values()), reason, per_split)


def _text_columns(config: RunConfig) -> list[str]:
    columns = [config.data.text_column]
    if config.data.text_pair_column:
        columns.append(config.data.text_pair_column)
    return columns


def _row_counts(splits: datasets.DatasetDict) -> dict[str, int]:
    return {split: dataset.num_rows for split, dataset in splits.items()}


def handle_empty_texts(
    splits: datasets.DatasetDict, text_columns: list[str], policy: str
) -> tuple[datasets.DatasetDict, dict[str, int]]:
    """Find rows whose text (or text pair) is null or only whitespace; drop them or raise `DataError`.

    Returns the splits and the dropped row count per split. With `policy` "error" any such row raises,
    naming the count, the column and the first row indices.
    """
    dropped = {}
    cleaned = {}
    for split, dataset in splits.items():
        empty = _empty_rows(dataset, text_columns)
        if empty and policy == "error":
            shown = ", ".join(str(row) for row in empty[:5]) + (", ..." if len(empty) > 5 else "")
            raise DataError(
                f"{len(empty)} {split} row(s) have an empty or null text in {' / '.join(text_columns)} "
                f"(row indices {shown}). Fix: fill them in, or set data.empty_text_policy: drop."
            )
        empty_set = set(empty)
        keep = [row for row in range(dataset.num_rows) if row not in empty_set]
        cleaned[split] = dataset.select(keep) if empty else dataset
        dropped[split] = len(empty)
    return datasets.DatasetDict(cleaned), dropped


def _empty_rows(dataset: datasets.Dataset, columns: list[str]) -> list[int]:
    empty = set()
    for column in columns:
        for row, value in enumerate(column_values(dataset, column)):
            if value is None or (isinstance(value, str) and not value.strip()):
                empty.add(row)
            elif not isinstance(value, str):
                raise DataError(
                    f"text column {column!r} contains the non-text value {value!r} ({type(value).__name__}) in row "
                    f"{row}. Fix: point data.text_column / data.text_pair_column at a column of strings."
                )
    return sorted(empty)


def _deduplicate_splits(
    splits: datasets.DatasetDict, text_columns: list[str]
) -> tuple[datasets.DatasetDict, dict[str, int], int]:
    removed = {}
    cleaned = {}
    for split, dataset in splits.items():
        cleaned[split], removed[split] = deduplicate(dataset, text_columns)
    # Validation or test files may repeat training texts; dropping them from train keeps evaluation honest.
    held_out = {key for split in ("validation", "test") if split in cleaned for key in _row_keys(cleaned[split], text_columns)}
    overlap = 0
    if held_out:
        keys = _row_keys(cleaned["train"], text_columns)
        keep = [row for row, key in enumerate(keys) if key not in held_out]
        overlap = len(keys) - len(keep)
        if overlap:
            cleaned["train"] = cleaned["train"].select(keep)
            logger.info("Removed %d training rows whose text is also in the validation or test data", overlap)
    return datasets.DatasetDict(cleaned), removed, overlap


def _row_keys(dataset: datasets.Dataset, columns: list[str]) -> list[tuple]:
    return list(zip(*(column_values(dataset, column) for column in columns)))


# ---------------------------------------------------------------------------------------------------------------
# Length limits


def _load_model_config(config: RunConfig) -> Any:
    return AutoConfig.from_pretrained(
        resolve_path(config.model.name_or_path),
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
    )


def model_length_limit(tokenizer: PreTrainedTokenizerBase | None, model_config: Any = None) -> int | None:
    """Return the most tokens the model accepts: the smaller of `tokenizer.model_max_length` and
    `max_position_embeddings`, ignoring either when unknown; None when neither is known."""
    limits = []
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _UNKNOWN_LIMIT:
        limits.append(tokenizer_limit)
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else None


def resolve_max_length(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase | None, model_config: Any = None
) -> int | None:
    """Return the truncation length: `data.max_length`, or the model's limit when that is null.

    Raises `DataError` when `data.max_length` is above the model's limit, because longer inputs would
    index past the position embeddings.
    """
    limit = model_length_limit(tokenizer, model_config)
    requested = config.data.max_length
    if requested is not None and limit is not None and requested > limit:
        raise DataError(
            f"data.max_length {requested} is above the model's limit of {limit} tokens "
            "(tokenizer.model_max_length / max_position_embeddings). "
            f"Fix: set data.max_length to {limit} or less."
        )
    return requested if requested is not None else limit


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


def tokenized_cache_dir() -> Path:
    """Return the folder of cached tokenised splits: `$FINETUNE_CACHE/tokenized`, else `~/.cache/finetune/tokenized`."""
    root = os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune"
    return Path(root) / "tokenized"


class _Tokenize:
    """Batched `datasets.map` function; a class rather than a closure so worker processes can pickle it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_columns: list[str], max_length: int | None):
        self.tokenizer = tokenizer
        self.text_columns = text_columns
        self.max_length = max_length

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[column] for column in self.text_columns]
        # No padding here: DataCollatorWithPadding pads each batch to its own longest item.
        return self.tokenizer(*texts, truncation=self.max_length is not None, max_length=self.max_length)


def tokenize_split(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_columns: list[str],
    max_length: int | None,
    cache_dir: Path,
    tokenizer_id: str | None = None,
) -> tuple[datasets.Dataset, str]:
    """Tokenise one encoded split, keeping only the model inputs and `labels`; return it and "hit" or "miss".

    The result is written to `cache_dir/tokens-KEY.arrow`, where KEY hashes the texts, the labels, the
    tokenizer and `max_length`. An existing file with that key is loaded instead of tokenising again.
    `tokenizer_id` is `tokenizer_identity(tokenizer)`, computed once by callers that tokenise several splits.
    """
    key = tokenization_key(dataset, tokenizer_id or tokenizer_identity(tokenizer), text_columns, max_length)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"tokens-{key}.arrow"
    state = "hit" if cache_file.is_file() else "miss"
    tokenized = dataset.map(
        _Tokenize(tokenizer, text_columns, max_length),
        batched=True,
        remove_columns=[column for column in dataset.column_names if column != LABELS],
        cache_file_name=str(cache_file),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc="Tokenising",
    )
    return tokenized, state


def tokenization_key(dataset: datasets.Dataset, tokenizer_id: str, text_columns: list[str], max_length: int | None) -> str:
    """Return a 64-hex-digit key of the split's texts and labels, the tokenizer's identity and `max_length`."""
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, text_columns, max_length, tokenizer_id]).encode())
    for batch in dataset.select_columns(text_columns + [LABELS]).iter(batch_size=10_000):
        digest.update(json.dumps([batch[column] for column in text_columns + [LABELS]]).encode())
    return digest.hexdigest()


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """Return the tokenizer's class name and a hash of its vocabulary and settings."""
    # A fast tokenizer's JSON contains its vocabulary, normaliser and post-processor, so any change gives a new
    # key. Its `truncation` and `padding` entries are left out because each call sets them.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return f"{type(tokenizer).__name__}:{hashlib.sha256(text.encode()).hexdigest()}"


def token_lengths(dataset: datasets.Dataset) -> list[int]:
    """Return the token count of every row of a tokenised split, for length-aware batching."""
    if dataset._indices is None:
        return pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
    return [len(ids) for ids in column_values(dataset, "input_ids")]


def raw_text_view(dataset: datasets.Dataset, config: RunConfig) -> datasets.Dataset:
    """Return the split's untokenised rows: the text column(s) under their config names, and `labels`.

    `labels` is the class index into `label_names`, as in the image path. Rows are in the same order as
    the tokenised split, so row i of both is the same example.
    """
    return dataset.select_columns(_text_columns(config) + [LABELS])
