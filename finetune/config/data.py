"""The `data` section: where examples come from, how they are split and checked."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from .base import ConfigIssue, Section

DataFormat = Literal["auto", "csv", "json", "parquet", "disk", "imagefolder", "idx", "hub"]


def _integer_label_as_text(value: Any) -> Any:
    # Integer class ids (`keep_labels: [0, 2]`) are compared with the data's labels as text.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


LabelName = Annotated[str, BeforeValidator(_integer_label_as_text)]


class AugmentationConfig(Section):
    """Training-time image augmentation (torchvision.transforms.v2); evaluation never augments."""

    random_resized_crop: bool = Field(True, description="Random crop and resize; off uses the deterministic eval resize.")
    crop_scale_min: float = Field(
        0.08, gt=0.0, le=1.0, description="Smallest crop area as a fraction of the image; higher is gentler."
    )
    horizontal_flip: bool = Field(True, description="Flip half the images left-right; wrong for text-like images.")
    policy: Literal["none", "trivial", "randaugment"] = Field(
        "none", description="Extra automatic augmentation: TrivialAugmentWide or RandAugment; costs CPU per image."
    )


class DataConfig(Section):
    train: str = Field(
        description="Training data: a CSV/JSON/JSONL/Parquet file, an image folder, a `save_to_disk` folder, "
        "an IDX folder, or a Hub dataset name."
    )
    validation: str | None = Field(
        None, description="Validation data in the same form; null carves `validation_size` out of train."
    )
    test: str | None = Field(None, description="Test data in the same form; null carves `test_size` out of train.")
    format: DataFormat = Field("auto", description="How to read the data; auto guesses from the path.")
    hub_config_name: str | None = Field(None, description="Configuration name of a Hub dataset, if it has several.")
    text_column: str = Field("text", description="Column with the input text.")
    text_pair_column: str | None = Field(None, description="Second text column for pair tasks (NLI, paraphrase).")
    image_column: str = Field("image", description="Column with images or image paths (relative to the file).")
    label_column: str = Field("label", description="Column with the labels, as strings or integers.")
    keep_labels: list[LabelName] | None = Field(
        None,
        description="Keep only rows with these labels, as names or integer ids (others are dropped and counted); "
        "null keeps all.",
    )
    validation_size: int | float = Field(
        0.1, ge=0.0, description="Share (below 1) or row count (1 or more) carved from train when no validation data."
    )
    test_size: int | float = Field(
        0.1, ge=0.0, description="Share (below 1) or row count (1 or more) carved from train when no test data."
    )
    stratify: bool = Field(True, description="Keep class proportions when carving splits.")
    split_seed: int = Field(42, description="Seed of the carved splits; change it to get other splits.")
    deduplicate: bool = Field(
        True, description="Drop repeated inputs before splitting so one text cannot be in train and test."
    )
    empty_text_policy: Literal["error", "drop"] = Field(
        "error", description="What to do with empty or null texts: stop with their count, or drop them."
    )
    max_length: int | None = Field(
        128, ge=8, description="Truncate texts to this many tokens; longer costs time quadratically in attention."
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="Use at most this many training rows (a seeded sample), for quick runs."
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Use at most this many validation and test rows each (a seeded sample)."
    )
    image_size: int | None = Field(
        None, ge=16, description="Input size in pixels; null takes the backbone processor's size."
    )
    bad_image_policy: Literal["skip", "error"] = Field(
        "skip", description="Unreadable images found by the pre-flight scan: skip them (counted) or stop."
    )
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)

    def problems(self) -> list[ConfigIssue]:
        issues = []
        for key in ("validation_size", "test_size"):
            value = getattr(self, key)
            if value >= 1 and value != int(value):
                issues.append(
                    ConfigIssue(f"data.{key}", value, "a count must be a whole number.", "give a share below 1 or a count.")
                )
        if self.validation is None and self.validation_size == 0:
            issues.append(
                ConfigIssue(
                    "data.validation_size", 0, "no validation data is given and none is carved.",
                    "set data.validation to a file or data.validation_size above 0.",
                )
            )
        carved = [self.validation_size if self.validation is None else 0, self.test_size if self.test is None else 0]
        if all(0 < share < 1 for share in carved if share) and sum(s for s in carved if s < 1) >= 1:
            issues.append(
                ConfigIssue(
                    "data.validation_size", self.validation_size,
                    f"with test_size {self.test_size} nothing is left to train on.", "make the two shares sum below 1.",
                )
            )
        if self.text_pair_column is not None and self.text_pair_column == self.text_column:
            issues.append(
                ConfigIssue(
                    "data.text_pair_column", self.text_pair_column, "is the same column as data.text_column.",
                    "name the second text column, or set it to null.",
                )
            )
        if self.keep_labels is not None and len(set(self.keep_labels)) < 2:
            issues.append(
                ConfigIssue("data.keep_labels", self.keep_labels, "needs at least two labels.", "list two or more labels.")
            )
        return issues
