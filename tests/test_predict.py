"""Export round trip: a tiny run's export folder through `pipeline()`, its files, and `finetune predict`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import pipeline  # noqa: E402

from finetune.assets import hub_base_model  # noqa: E402
from finetune.predict import Predictor  # noqa: E402
from finetune.predict import main as predict_main  # noqa: E402
from tiny import LABELS, events_of, run_recipe, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a superb and moving film", "dull plot and a tedious ending"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Train the tiny BERT for one epoch (8 steps) and return its config, events and export folder."""
    tmp_path = tmp_path_factory.mktemp("predict")
    previous_cache = os.environ.get("FINETUNE_CACHE")
    threads = torch.get_num_threads()
    os.environ["FINETUNE_CACHE"] = str(tmp_path / "cache")
    torch.set_num_threads(1)  # two threads on a busy 2-core machine make tiny steps many times slower
    try:
        config = tiny_config(tmp_path)
        code, events = run_recipe(config)
    finally:
        torch.set_num_threads(threads)
        if previous_cache is None:
            os.environ.pop("FINETUNE_CACHE", None)
        else:
            os.environ["FINETUNE_CACHE"] = previous_cache
    assert code == 0
    return {"config": config, "events": events, "export": tmp_path / "run" / "export", "tmp": tmp_path}


def run_predict(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", "predict", *args], capture_output=True, text=True, timeout=300,
        env=env, cwd=REPO,
    )


# ---------------------------------------------------------------------------------------------------------------
# The export folder


def test_export_config_label_maps(trained):
    config = json.loads((trained["export"] / "config.json").read_text())
    assert config["id2label"] == {"0": LABELS[0], "1": LABELS[1]}
    assert config["label2id"] == {LABELS[0]: 0, LABELS[1]: 1}


def test_export_labels_match_run(trained):
    start = events_of(trained["events"], "run_start")[0]
    assert start["label_names"] == list(LABELS)


def test_export_eval_results_splits(trained):
    results = json.loads((trained["export"] / "eval_results.json").read_text())
    assert sorted(results) == ["test", "validation"]
    assert results["test"]["accuracy"] == pytest.approx(events_of(trained["events"], "eval", split="test")[0]["accuracy"])


def test_export_model_card(trained):
    card = (trained["export"] / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    results = json.loads((trained["export"] / "eval_results.json").read_text())
    assert "base_model" not in metadata  # a local folder is not a Hub id
    assert trained["config"]["model"]["name_or_path"] in card
    assert metadata["pipeline_tag"] == "text-classification"
    assert f"`{LABELS[0]}`, `{LABELS[1]}`" in card
    assert "## Metrics" in card
    assert f"| validation | {results['validation']['loss']:.4f} | {results['validation']['accuracy']:.4f} |" in card
    assert trained["config"]["data"]["train"] in card


@pytest.mark.parametrize(
    ("name_or_path", "expected"),
    [
        ("asset:minilm", "sentence-transformers/all-MiniLM-L6-v2"),
        ("google/vit-base-patch16-224", "google/vit-base-patch16-224"),
        ("timm/resnet18.a1_in1k", "timm/resnet18.a1_in1k"),
        ("./runs/assets/efficientnet_lite0", None),
        ("asset:efficientnet_lite0", None),
    ],
)
def test_card_base_model_is_hub_id(name_or_path, expected):
    assert hub_base_model(name_or_path) == expected


# ---------------------------------------------------------------------------------------------------------------
# pipeline() and Predictor


def test_pipeline_returns_class_names(trained):
    classifier = pipeline("text-classification", model=str(trained["export"]), device="cpu")
    results = classifier(TEXTS)
    assert len(results) == 2
    assert {result["label"] for result in results} <= set(LABELS)


def test_pipeline_scores_every_class(trained):
    classifier = pipeline("text-classification", model=str(trained["export"]), device="cpu")
    scores = classifier(TEXTS[0], top_k=None)
    assert sorted(score["label"] for score in scores) == sorted(LABELS)
    assert sum(score["score"] for score in scores) == pytest.approx(1.0, abs=1e-5)


def test_predictor_top_k(trained):
    predictor = Predictor(trained["export"], device="cpu")
    results = predictor.predict(TEXTS, top_k=5)  # capped at the number of classes
    assert predictor.task == "text-classification"
    assert predictor.label_names == list(LABELS)
    assert [len(result) for result in results] == [2, 2]
    assert results[0][0]["score"] >= results[0][1]["score"]


def test_predictor_single_input_nested(trained):
    results = Predictor(trained["export"], device="cpu").predict([TEXTS[0]], top_k=1)
    assert len(results) == 1
    assert results[0][0]["label"] in LABELS


# ---------------------------------------------------------------------------------------------------------------
# finetune predict


def test_predict_cli_texts_and_file(trained, tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("clumsy and lifeless\n\n   \ncharming cast and a clever script\n", encoding="utf-8")

    completed = run_predict(str(trained["export"]), *TEXTS, "--file", str(inputs))
    lines = [json.loads(line) for line in completed.stdout.splitlines()]

    assert completed.returncode == 0, completed.stderr[-2000:]
    # Arguments first, then the file's non-blank lines, in order.
    assert [line["input"] for line in lines] == TEXTS + ["clumsy and lifeless", "charming cast and a clever script"]
    assert all(line["label"] in LABELS for line in lines)
    assert all(0.5 <= line["score"] <= 1.0 for line in lines)  # the top class of two scores at least 1/2


def test_predict_cli_missing_folder(tmp_path):
    missing = tmp_path / "no_such_export"
    completed = run_predict(str(missing), "some text")
    assert completed.returncode == 2
    assert f"{missing} is not a model folder (no config.json)" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


def test_predict_no_inputs(trained, finetune_records):
    code = predict_main([str(trained["export"])])
    messages = [record.getMessage() for record in finetune_records if record.levelno == logging.ERROR]
    assert code == 2
    assert any("no inputs: give texts or image paths as arguments, or --file" in message for message in messages)


def test_predict_top_k_lists_classes(trained, capfd):
    code = predict_main([str(trained["export"]), TEXTS[0], "--top-k", "2"])
    line = json.loads(capfd.readouterr().out)
    assert code == 0
    assert sorted(entry["label"] for entry in line["top_k"]) == sorted(LABELS)
    assert line["label"] == line["top_k"][0]["label"]


def test_predict_top_k_below_one(trained):
    completed = run_predict(str(trained["export"]), TEXTS[0], "--top-k", "0")
    assert completed.returncode == 2
    assert "argument --top-k: 0 is below 1" in completed.stderr
    assert completed.stdout == ""


def test_predict_missing_input_file(trained, tmp_path):
    missing = tmp_path / "inputs.txt"
    completed = run_predict(str(trained["export"]), "--file", str(missing))
    assert completed.returncode == 2
    assert f"--file {missing}: file not found" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_predict_rejects_non_images(tmp_path):
    from test_vision import save_resnet

    model_dir = tmp_path / "resnet"
    save_resnet(model_dir, num_labels=2)
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello", encoding="utf-8")
    folder = tmp_path / "photos"
    folder.mkdir()

    completed = run_predict(str(model_dir), str(not_image), str(folder))

    assert completed.returncode == 2
    assert f"{not_image} (not an image file Pillow can read)" in completed.stderr
    assert f"{folder} (a folder, not an image file)" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


def test_unreachable_hub_model_names_network(tmp_path):
    from finetune.config import ConfigError, validate_config
    from finetune.models import load_processor

    config = validate_config({
        "task": "text-classification", "model": {"name_or_path": "someone/not-cached-model"},
        "data": {"train": str(tmp_path / "train.csv")},
    })
    with pytest.raises(ConfigError) as raised:
        load_processor(config)
    # conftest.py sets HF_HUB_OFFLINE=1, so the Hub is unreachable here, as on a host without network.
    assert "HF_HUB_OFFLINE must be unset" in raised.value.issues[0].fix


def test_predict_export_without_weights(trained, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.json").write_text((trained["export"] / "config.json").read_text())
    completed = run_predict(str(folder), TEXTS[0])
    assert completed.returncode == 2
    assert f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin)" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_predict_non_utf8_file(trained, tmp_path):
    inputs = tmp_path / "latin1.txt"
    inputs.write_bytes("caf\xe9\n".encode("latin-1"))
    completed = run_predict(str(trained["export"]), "--file", str(inputs))
    assert completed.returncode == 2
    assert f"--file {inputs}: not UTF-8 text (invalid continuation byte at byte 3)" in completed.stderr
    assert "Traceback" not in completed.stderr


# ---------------------------------------------------------------------------------------------------------------
# Text-pair models


@pytest.fixture(scope="module")
def trained_pairs(tmp_path_factory) -> Path:
    """Train the tiny BERT for 2 steps on review pairs (text, pair) and return its export folder."""
    import pandas as pd

    tmp_path = tmp_path_factory.mktemp("pairs")
    config = tiny_config(tmp_path, data={"text_pair_column": "pair"}, training__max_steps=2)
    reviews = pd.read_csv(config["data"]["train"])
    reviews["pair"] = "seen in a small cinema"
    reviews.to_csv(config["data"]["train"], index=False)
    code, _ = run_recipe(config)
    assert code == 0
    return tmp_path / "run" / "export"


def test_predict_pair_model_scores_pair(trained_pairs, capfd):
    pair = {"text": TEXTS[0], "text_pair": "seen in a small cinema"}
    code = predict_main([str(trained_pairs), json.dumps(pair), "--top-k", "2"])
    line = json.loads(capfd.readouterr().out)
    expected = pipeline("text-classification", model=str(trained_pairs))(pair, top_k=2)
    assert code == 0
    assert line["top_k"] == [{"label": entry["label"], "score": entry["score"]} for entry in expected]


def test_predict_pair_model_rejects_text(trained_pairs, capfd, finetune_records):
    code = predict_main([str(trained_pairs), TEXTS[0]])
    messages = [record.getMessage() for record in finetune_records if record.levelno == logging.ERROR]
    assert code == 2
    assert capfd.readouterr().out == ""
    assert len(messages) == 1
    expected = "trained on text pairs (data.text_pair_column: pair), but 'a superb and moving film' is not a pair"
    assert expected in messages[0]


def test_pair_model_card_shows_pair(trained_pairs):
    card = (trained_pairs / "README.md").read_text(encoding="utf-8")
    assert 'classifier({"text": "first text", "text_pair": "second text"})' in card


def test_try_tab_scores_pair(trained_pairs):
    from finetune.predict import Predictor
    from finetune.webapp.try_tab import classify

    predictor = Predictor(trained_pairs)
    scores = classify(predictor, None, TEXTS[0], 2, text_pair="seen in a small cinema")
    pair = {"text": TEXTS[0], "text_pair": "seen in a small cinema"}
    expected = pipeline("text-classification", model=str(trained_pairs))(pair, top_k=2)
    assert scores == pytest.approx({item["label"]: item["score"] for item in expected})


def test_try_tab_pair_model_needs_second_text(trained_pairs):
    from finetune.predict import Predictor
    from finetune.webapp.try_tab import classify

    with pytest.raises(ValueError, match="trained on text pairs .*type the second text too"):
        classify(Predictor(trained_pairs), None, TEXTS[0], 2)


def test_try_tab_single_model_rejects_second_text(trained):
    from finetune.predict import Predictor
    from finetune.webapp.try_tab import classify

    with pytest.raises(ValueError, match="trained on single texts"):
        classify(Predictor(trained["export"]), None, TEXTS[0], 2, text_pair="another text")
