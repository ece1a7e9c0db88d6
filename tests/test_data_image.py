"""Image data: colour modes, bad files, the local source formats, the real Fashion-MNIST IDX files, the datasets."""

from __future__ import annotations

import io
import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ViTImageProcessor

from finetune.config import validate_config
from finetune.data.common import DataError
from finetune.data.idx import FASHION_MNIST_LABELS, load_idx_split, read_idx
from finetune.data.image import (
    ImageClassificationDataset,
    TrainTransform,
    collate_images,
    image_problem,
    load_image_splits,
    measure_processor,
    open_image,
    prepare_image_data,
    run_processor,
    to_rgb,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
COLOURS = {"cat": (200, 40, 40), "dog": (40, 40, 200)}


def small_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])


def image_config(train: str, **data) -> object:
    return validate_config(
        {
            "task": "image-classification",
            "model": {"name_or_path": "unused"},
            "data": {"train": train, "validation_size": 2, "test_size": 2, **data},
        }
    )


def write_class_images(folder, per_class: int = 4, size=(20, 16)) -> None:
    for label, colour in COLOURS.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.new("RGB", size, colour).save(folder / label / f"{index}.png")


def truncated_jpeg(path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------------------------
# Colour modes


def test_to_rgb_greyscale():
    image = to_rgb(Image.new("L", (2, 2), 77))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (77, 77, 77)


def test_to_rgb_rgba_on_white():
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    # alpha_composite: 0 * 128/255 + 255 * 127/255 = 127.
    assert rgb.getpixel((1, 0)) == (127, 127, 127)


def test_to_rgb_greyscale_alpha():
    image = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_palette_transparency(tmp_path):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "palette.png")
    rgb = open_image(str(tmp_path / "palette.png"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (200, 100, 50)


def test_to_rgb_cmyk(tmp_path):
    image = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 255, 255, 0))
    image.save(tmp_path / "cmyk.tiff")
    rgb = open_image(str(tmp_path / "cmyk.tiff"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (255, 0, 0)


def test_to_rgb_sixteen_bit(tmp_path):
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as reopened:
        assert reopened.mode.startswith("I")
    rgb = open_image(str(tmp_path / "deep.png"))
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_open_image_bytes():
    buffer = io.BytesIO()
    Image.new("L", (3, 3), 9).save(buffer, format="PNG")
    image = open_image({"bytes": buffer.getvalue(), "path": None})
    assert image.getpixel((1, 1)) == (9, 9, 9)


# ---------------------------------------------------------------------------------------------------------------
# Bad files


def test_problem_truncated_jpeg(tmp_path):
    truncated_jpeg(tmp_path / "cut.jpg")
    assert "truncated" in image_problem(str(tmp_path / "cut.jpg"))


def test_problem_text_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image", encoding="utf-8")
    assert image_problem(str(tmp_path / "notes.jpg")) == "not an image file Pillow can read"


def test_problem_missing_file(tmp_path):
    assert image_problem(str(tmp_path / "absent.png")) == "file not found"


def test_problem_good_image(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    assert image_problem(str(tmp_path / "ok.png")) is None


def test_prepare_skips_bad_images(tmp_path):
    write_class_images(tmp_path)
    truncated_jpeg(tmp_path / "cat" / "cut.jpg")
    (tmp_path / "dog" / "notes.jpg").write_text("text", encoding="utf-8")
    prepared = prepare_image_data(image_config(str(tmp_path)), small_processor())
    bad = {os.path.basename(item["path"]): item["reason"] for item in prepared.summary["bad_images"]}
    assert set(bad) == {"cut.jpg", "notes.jpg"}
    assert sum(prepared.summary["rows"].values()) == 8
    assert sum(prepared.summary["dropped"]["bad_image"].values()) == 2


def test_prepare_error_policy_names_paths(tmp_path):
    write_class_images(tmp_path)
    (tmp_path / "dog" / "notes.jpg").write_text("text", encoding="utf-8")
    config = image_config(str(tmp_path), bad_image_policy="error", validation_size=0.25, test_size=0.25)
    with pytest.raises(DataError) as error:
        prepare_image_data(config, small_processor())
    assert "notes.jpg" in str(error.value)
    assert "bad_image_policy: skip" in str(error.value)


def test_one_class_folder_rejected(tmp_path):
    (tmp_path / "cat").mkdir()
    for index in range(8):
        Image.new("RGB", (20, 16), "red").save(tmp_path / "cat" / f"{index}.png")
    with pytest.raises(DataError, match="training data has 1 class\\(es\\) \\('cat'\\)"):
        prepare_image_data(image_config(str(tmp_path), stratify=False), small_processor())


# ---------------------------------------------------------------------------------------------------------------
# Sources


def test_folder_with_splits(tmp_path):
    write_class_images(tmp_path / "train")
    write_class_images(tmp_path / "validation", per_class=2)
    write_class_images(tmp_path / "test", per_class=1)
    (tmp_path / "train" / "README.txt").write_text("ignored", encoding="utf-8")
    splits = load_image_splits(image_config(str(tmp_path)))
    assert {split: data.num_rows for split, data in splits.items()} == {"train": 8, "validation": 4, "test": 2}
    assert sorted(set(splits["train"]["label"])) == ["cat", "dog"]


def test_prepare_folder_with_splits(tmp_path):
    write_class_images(tmp_path / "train")
    write_class_images(tmp_path / "val", per_class=2)
    prepared = prepare_image_data(image_config(str(tmp_path)), small_processor())
    assert prepared.label_names == ["cat", "dog"]
    assert prepared.summary["rows"] == {"train": 6, "validation": 4, "test": 2}
    assert prepared.summary["carved"] == ["test"]


def test_csv_relative_paths(tmp_path):
    write_class_images(tmp_path / "data" / "img")
    lines = ["file,kind"] + [f"img/{label}/{index}.png,{label}" for label in COLOURS for index in range(4)]
    (tmp_path / "data" / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = image_config(str(tmp_path / "data" / "labels.csv"), image_column="file", label_column="kind")
    prepared = prepare_image_data(config, small_processor())
    assert prepared.label_names == ["cat", "dog"]
    assert prepared.summary["rows"] == {"train": 4, "validation": 2, "test": 2}
    item = prepared.validation[0]
    expected = run_processor(small_processor(), Image.new("RGB", (20, 16), COLOURS[prepared.label_names[item["labels"]]]))
    assert torch.equal(item["pixel_values"], expected)


def test_jsonl_relative_paths(tmp_path):
    write_class_images(tmp_path / "img")
    rows = [{"image": f"img/{label}/{index}.png", "label": label} for label in COLOURS for index in range(4)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    splits = load_image_splits(image_config(str(tmp_path / "rows.jsonl")))
    assert splits["train"][0]["image"]["path"] == str(tmp_path / "img" / "cat" / "0.png")


def test_parquet_image_feature(tmp_path):
    images = [Image.new("RGB", (8, 8), COLOURS[label]) for label in COLOURS for _ in range(4)]
    labels = [label for label in COLOURS for _ in range(4)]
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"picture": images, "label": labels}, features=features).to_parquet(str(tmp_path / "d.parquet"))
    prepared = prepare_image_data(image_config(str(tmp_path / "d.parquet"), image_column="picture"), small_processor())
    assert prepared.summary["rows"] == {"train": 4, "validation": 2, "test": 2}
    assert prepared.train[0]["pixel_values"].shape == (3, 32, 32)


def test_save_to_disk_image_feature(tmp_path):
    images = [Image.new("L", (8, 8), 10 * index) for index in range(8)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 4}, features=features)
    data.save_to_disk(str(tmp_path / "saved"))
    splits = load_image_splits(image_config(str(tmp_path / "saved")))
    assert splits["train"].num_rows == 8
    assert isinstance(splits["train"].features["image"], datasets.Image)


def test_missing_image_column(tmp_path):
    (tmp_path / "rows.csv").write_text("path,label\na.png,x\n", encoding="utf-8")
    with pytest.raises(DataError, match="image column 'image' not found"):
        load_image_splits(image_config(str(tmp_path / "rows.csv")))


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST IDX files (Debian package dataset-fashion-mnist)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="Debian package dataset-fashion-mnist is not installed")
def test_idx_train_counts():
    assert read_idx(f"{FASHION_MNIST}/train-images-idx3-ubyte.gz").shape == (60000, 28, 28)
    assert read_idx(f"{FASHION_MNIST}/train-labels-idx1-ubyte.gz").shape == (60000,)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="Debian package dataset-fashion-mnist is not installed")
def test_idx_test_split():
    split = load_idx_split(
        f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz", f"{FASHION_MNIST}/t10k-labels-idx1-ubyte.gz", FASHION_MNIST_LABELS
    )
    assert split.num_rows == 10000
    assert split.features["label"].names[0] == "T-shirt/top"
    assert split.features["label"].names[9] == "Ankle boot"
    assert np.bincount(split["label"]).tolist() == [1000] * 10
    first = split[0]
    assert first["image"].mode == "L"
    assert first["image"].size == (28, 28)
    # The first t10k image is an ankle boot (label 9).
    assert first["label"] == 9


def test_idx_rejects_bad_header(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x08\x03")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "train-images-idx3-ubyte")


# ---------------------------------------------------------------------------------------------------------------
# Transforms and datasets


def test_measure_processor_vit():
    geometry = measure_processor(small_processor())
    assert (geometry.height, geometry.width) == (32, 32)
    assert geometry.mean == pytest.approx((0.5, 0.4, 0.3), abs=1e-5)
    assert geometry.std == pytest.approx((0.2, 0.25, 0.3), abs=1e-5)
    assert geometry.interpolation.value == "bilinear"


def test_processor_round_trip(tmp_path):
    processor = small_processor()
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    image = to_rgb(Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30), dtype=np.uint8)))
    assert torch.equal(run_processor(processor, image), run_processor(reloaded, image))


def rows_dataset(count: int = 6) -> datasets.Dataset:
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(count)]
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict({"image": images, "labels": [0, 1] * (count // 2)}, features=features)
    return data.cast_column("image", datasets.Image(decode=False))


def train_dataset(seed: int = 5) -> ImageClassificationDataset:
    config = image_config("unused", augmentation={"policy": "trivial"})
    processor = small_processor()
    transform = TrainTransform(processor, config.data.augmentation, measure_processor(processor))
    return ImageClassificationDataset(rows_dataset(), transform, seed=seed)


def test_augmentation_repeats_per_epoch():
    dataset = train_dataset()
    dataset.set_epoch(3)
    first = dataset[2]["pixel_values"]
    dataset[1]
    assert torch.equal(dataset[2]["pixel_values"], first)


def test_augmentation_changes_with_epoch():
    dataset = train_dataset()
    dataset.set_epoch(0)
    first = dataset[2]["pixel_values"]
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2]["pixel_values"], first)


def test_augmentation_same_in_workers():
    dataset = train_dataset()
    dataset.set_epoch(4)
    in_process = [batch["pixel_values"] for batch in torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_images)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_images, num_workers=2)
    in_workers = [batch["pixel_values"] for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers))


def test_collate_shapes():
    dataset = train_dataset()
    batch = collate_images([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["labels"].tolist() == [0, 1]
    assert batch["labels"].dtype == torch.long


def test_no_crop_train_matches_eval():
    config = image_config("unused", augmentation={"random_resized_crop": False, "horizontal_flip": False})
    processor = small_processor()
    transform = TrainTransform(processor, config.data.augmentation, measure_processor(processor))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 20, 3), dtype=np.uint8))
    assert torch.equal(transform(image), run_processor(processor, image))


def test_prepared_flags_and_raw_validation(tmp_path):
    write_class_images(tmp_path)
    prepared = prepare_image_data(image_config(str(tmp_path)), small_processor())
    assert prepared.augmented is True
    assert prepared.raw_validation.num_rows == len(prepared.validation)
    assert isinstance(prepared.raw_validation[0]["image"], Image.Image)
