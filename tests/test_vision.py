"""Vision backbones: tiny random ViT, ConvNeXt, ResNet and timm-wrapper models loaded with new heads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from finetune.config import validate_config
from finetune.export import save_processor
from finetune.data.image import measure_processor, prepare_image_data, run_processor
from finetune.vision import load_image_model, load_image_processor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LABELS = ["cat", "dog", "fox"]


def save_vit(folder, num_labels: int = 1000) -> None:
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8,
        num_labels=num_labels,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def save_convnext(folder, num_labels: int = 1000) -> None:
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=num_labels)
    ConvNextForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)


def save_resnet(folder, num_labels: int = 1000, id2label: dict | None = None) -> None:
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=num_labels)
    if id2label is not None:
        config.id2label = id2label
        config.label2id = {name: index for index, name in id2label.items()}
    ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)


def save_timm(folder) -> None:
    # A checkpoint written like a timm Hub model: 1000 classes named in `label_names`, preprocessing in pretrained_cfg.
    pretrained_cfg = {
        "input_size": [3, 48, 48], "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "classifier": "classifier",
    }
    names = [f"imagenet class {index}" for index in range(1000)]
    config = TimmWrapperConfig(
        architecture="test_efficientnet", num_labels=1000, id2label=dict(enumerate(names)), pretrained_cfg=pretrained_cfg
    )
    TimmWrapperForImageClassification(config).save_pretrained(folder)


def run_config(model_dir, train: str = "unused", **data) -> object:
    return validate_config(
        {
            "task": "image-classification",
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": train, "validation_size": 3, "test_size": 3, **data},
        }
    )


def random_image(seed: int = 0, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("save", [save_vit, save_convnext, save_resnet], ids=["vit", "convnext", "resnet"])
def test_new_head_for_labels(tmp_path, save):
    save(tmp_path / "backbone")
    model, processor = load_image_model(run_config(tmp_path / "backbone"), LABELS)
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    assert model.config.label2id == {"cat": 0, "dog": 1, "fox": 2}
    pixel_values = torch.stack([run_processor(processor, random_image(seed)) for seed in range(2)])
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    assert logits.shape == (2, 3)


def test_vit_rejects_other_image_size(tmp_path):
    save_vit(tmp_path / "vit")
    with pytest.raises(ValueError, match="position embeddings"):
        load_image_processor(run_config(tmp_path / "vit", image_size=64))


def test_vit_image_size_run_exits_2(tmp_path):
    from tiny import run_recipe

    save_vit(tmp_path / "vit")
    config = {
        "task": "image-classification",
        "model": {"name_or_path": str(tmp_path / "vit")},
        "data": {"train": str(tmp_path / "unused"), "image_size": 64},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    code, events = run_recipe(config)
    assert code == 2
    assert events[-1]["status"] == "failed"
    assert "data.image_size = 64: differs from the vit backbone's input size 32" in events[-1]["error"]


def test_convnext_image_size(tmp_path):
    save_convnext(tmp_path / "convnext")
    processor = load_image_processor(run_config(tmp_path / "convnext", image_size=48))
    geometry = measure_processor(processor)
    assert (geometry.height, geometry.width) == (48, 48)


def test_same_count_other_names_resets_head(tmp_path):
    save_resnet(tmp_path / "old", num_labels=3, id2label={0: "x", 1: "y", 2: "z"})
    saved = ResNetForImageClassification.from_pretrained(tmp_path / "old").classifier[1].weight.detach().clone()
    torch.manual_seed(0)
    model, _ = load_image_model(run_config(tmp_path / "old"), LABELS)
    assert not torch.equal(model.classifier[1].weight, saved)


def test_same_names_keep_head(tmp_path):
    save_resnet(tmp_path / "old", num_labels=3, id2label=dict(enumerate(LABELS)))
    saved = ResNetForImageClassification.from_pretrained(tmp_path / "old").classifier[1].weight.detach().clone()
    model, _ = load_image_model(run_config(tmp_path / "old"), LABELS)
    assert torch.equal(model.classifier[1].weight, saved)


def test_timm_export_keeps_own_labels(tmp_path):
    save_timm(tmp_path / "timm")
    model, processor = load_image_model(run_config(tmp_path / "timm"), LABELS)
    model.save_pretrained(tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text(encoding="utf-8"))
    assert written["label_names"] == LABELS
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "export")
    assert reloaded.config.id2label == {0: "cat", 1: "dog", 2: "fox"}


def test_timm_image_size_in_export(tmp_path):
    save_timm(tmp_path / "timm")
    model, processor = load_image_model(run_config(tmp_path / "timm", image_size=64), LABELS)
    assert measure_processor(processor).height == 64
    model.save_pretrained(tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text(encoding="utf-8"))
    assert written["pretrained_cfg"]["input_size"] == [3, 64, 64]


def write_class_images(folder, per_class: int = 6) -> None:
    for index, label in enumerate(LABELS):
        (folder / label).mkdir(parents=True)
        for item in range(per_class):
            random_image(seed=10 * index + item, size=(36, 28)).convert("L").save(folder / label / f"{item}.png")


@pytest.mark.parametrize("save", [save_vit, save_timm], ids=["vit", "timm"])
def test_pipeline_matches_evaluation(tmp_path, save):
    save(tmp_path / "backbone")
    write_class_images(tmp_path / "images")
    config = run_config(tmp_path / "backbone", train=str(tmp_path / "images"))
    processor = load_image_processor(config)
    prepared = prepare_image_data(config, processor)
    model, _ = load_image_model(config, prepared.label_names)
    model.eval()
    model.save_pretrained(tmp_path / "export")
    save_processor(processor, tmp_path / "export")

    assert (tmp_path / "export" / "preprocessor_config.json").is_file()
    classifier = pipeline("image-classification", model=str(tmp_path / "export"))
    image = prepared.raw_validation[0]["image"]
    expected_pixels = prepared.validation[0]["pixel_values"]
    assert torch.equal(classifier.preprocess(image)["pixel_values"][0], expected_pixels)
    with torch.no_grad():
        probabilities = model(pixel_values=expected_pixels[None]).logits.softmax(-1)[0]
    scores = {item["label"]: item["score"] for item in classifier(image, top_k=len(LABELS))}
    assert set(scores) == set(LABELS)
    for index, name in enumerate(prepared.label_names):
        assert scores[name] == pytest.approx(float(probabilities[index]), abs=1e-6)


def test_misclassified_images_saved(tmp_path):
    from finetune.webapp.try_tab import _load_image
    from tiny import run_recipe

    save_vit(tmp_path / "backbone")
    write_class_images(tmp_path / "images")
    run_dir = tmp_path / "run"
    config = {
        "task": "image-classification",
        "model": {"name_or_path": str(tmp_path / "backbone")},
        "data": {"train": str(tmp_path / "images"), "validation_size": 6, "test_size": 0},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-9,
                     "mixed_precision": "no", "seed": 0},
        "output": {"run_dir": str(run_dir)},
    }
    code, _ = run_recipe(config)
    lines = (run_dir / "export" / "validation_predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    wrong = [record for record in records if record["label"] != record["prediction"]]
    right = [record for record in records if record["label"] == record["prediction"]]
    assert code == 0
    assert len(records) == 6
    assert wrong  # an untrained random head gets some of three classes wrong
    # The app's gallery reads each misclassified image from the run folder.
    for record in wrong:
        assert _load_image(run_dir, record["image"]).size == (36, 28)
    assert all("image" not in record for record in right)
