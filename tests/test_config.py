"""Config schema: every kind of error, overrides, the round trip through save/load, and the shipped configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.config import ConfigError, RunConfig, describe_options, load_config, save_config, validate_config
from finetune.config.docs import render_markdown

ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = ROOT / "configs"


def minimal(**sections) -> dict:
    raw = {"task": "text-classification", "model": {"name_or_path": "some/model"}, "data": {"train": "train.csv"}}
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **values}
        else:
            raw[name] = values
    return raw


def issues_of(raw: dict) -> dict[str, object]:
    """Validate `raw`, expecting a ConfigError; return its issues as {key: issue}."""
    with pytest.raises(ConfigError) as error:
        validate_config(raw)
    return {issue.key: issue for issue in error.value.issues}


def write_config(tmp_path: Path, raw: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Valid configs and defaults


def test_minimal_config_defaults():
    config = validate_config(minimal())
    assert config.training.learning_rate == 5e-5
    assert config.data.validation_size == 0.1
    assert config.schedule.preset == "full"


def test_run_dir_from_name(tmp_path):
    config = load_config(write_config(tmp_path, minimal(), name="demo.yaml"))
    assert config.name == "demo"
    assert config.run_dir == Path("runs") / "demo"


# ---------------------------------------------------------------------------------------------------------------
# Unknown keys


def test_unknown_key_closest_name():
    issue = issues_of(minimal(training={"learning_rte": 1e-5}))["training.learning_rte"]
    assert issue.message == "unknown key."
    assert issue.fix == "did you mean 'learning_rate'?"
    assert issue.value == 1e-5


def test_unknown_section_closest_name():
    issue = issues_of(minimal(trainng={"learning_rate": 1e-5}))["trainng"]
    assert issue.fix == "did you mean 'training'?"


def test_unknown_key_lists_valid_keys():
    issue = issues_of(minimal(output={"zzz": 1}))["output.zzz"]
    assert issue.fix == "valid keys here: export, run_dir."


# ---------------------------------------------------------------------------------------------------------------
# Types, ranges, required keys


def test_wrong_type_named():
    issue = issues_of(minimal(training={"num_train_epochs": "three"}))["training.num_train_epochs"]
    assert issue.value == "three"
    assert "valid integer" in issue.message
    assert "Passes over the training data" in issue.message


def test_section_as_value_named():
    issue = issues_of(minimal(training=5))["training"]
    assert issue.value == 5
    assert "must be a section" in issue.message
    assert "under `training:`" in issue.fix


def test_wrong_choice_named():
    issue = issues_of(minimal(training={"mixed_precision": "fp8"}))["training.mixed_precision"]
    assert issue.value == "fp8"
    assert "'no', 'fp16', 'bf16' or 'auto'" in issue.message


def test_out_of_range_named():
    issue = issues_of(minimal(training={"per_device_train_batch_size": 0}))["training.per_device_train_batch_size"]
    assert issue.value == 0
    assert "greater than or equal to 1" in issue.message


def test_open_range_bound():
    issue = issues_of(minimal(training={"adam_beta2": 1.0}))["training.adam_beta2"]
    assert "less than 1" in issue.message


def test_missing_required_key():
    raw = minimal()
    del raw["task"]
    issue = issues_of(raw)["task"]
    assert issue.message == "is required."
    assert "add `task:`" in issue.fix


def test_missing_nested_required_key():
    issue = issues_of(minimal(data={"train": None}))["data.train"]
    assert issue.value is None


def test_list_item_type_names_option():
    issue = issues_of(minimal(data={"keep_labels": [1.5, "b"]}))["data.keep_labels.0"]
    assert issue.value == 1.5
    assert "Keep only rows with these labels" in issue.message


def test_keep_labels_integers_as_text():
    config = validate_config(minimal(data={"keep_labels": [0, 2]}))
    assert config.data.keep_labels == ["0", "2"]


def test_quoted_number_stays_text():
    config = validate_config(minimal(data={"hub_config_name": "2", "keep_labels": ["1", "2"]}))
    assert config.data.hub_config_name == "2"
    assert config.data.keep_labels == ["1", "2"]


def test_yaml_exponent_read_as_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "task: text-classification\nmodel: {name_or_path: m}\ndata: {train: t.csv}\ntraining: {learning_rate: 3e-5}\n"
    )
    assert load_config(path).training.learning_rate == 3e-5


# ---------------------------------------------------------------------------------------------------------------
# Contradictions


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"training": {"warmup_steps": 10, "warmup_ratio": 0.1}}, "training.warmup_ratio"),
        ({"training": {"eval_strategy": "steps"}}, "training.eval_steps"),
        ({"training": {"eval_strategy": "no", "early_stopping_patience": 2}}, "training.early_stopping_patience"),
        ({"data": {"validation_size": 0.6, "test_size": 0.5}}, "data.validation_size"),
        ({"data": {"validation_size": 0}}, "data.validation_size"),
        ({"data": {"test_size": 2.5}}, "data.test_size"),
        ({"data": {"text_pair_column": "text"}}, "data.text_pair_column"),
        ({"data": {"keep_labels": ["only"]}}, "data.keep_labels"),
        ({"data": {"format": "imagefolder"}}, "data.format"),
        ({"schedule": {"preset": "milestones"}}, "schedule.stages"),
        ({"schedule": {"preset": "full", "stages": [{"until_epoch": 2}]}}, "schedule.stages"),
        ({"schedule": {"preset": "milestones", "stages": [{"until_step": 2, "train": "head"}, {"train": []}]}},
         "schedule.stages.1.train"),
        ({"schedule": {"preset": "milestones", "stages": [{"until_step": 2, "train": " "}, {"train": "all"}]}},
         "schedule.stages.0.train"),
        ({"schedule": {"cache_features": "true"}}, "schedule.cache_features"),
        ({"checkpoint": {"save_every_epoch": False}}, "checkpoint.save_every_epoch"),
        ({"model": {"name_or_path": " "}}, "model.name_or_path"),
        ({"model": {"name_or_path": "m", "lora": {}}, "schedule": {"preset": "gradual"}}, "schedule.preset"),
    ],
)
def test_contradiction_reported(sections, key):
    issues = issues_of(minimal(**sections))
    assert key in issues
    assert issues[key].fix


def test_contradiction_message_names_both():
    issue = issues_of(minimal(training={"warmup_steps": 10, "warmup_ratio": 0.1}))["training.warmup_ratio"]
    assert issue.value == 0.1
    assert "warmup_steps 10" in issue.message


# ---------------------------------------------------------------------------------------------------------------
# Every problem at once


def test_all_problems_reported_at_once(tmp_path):
    raw = minimal(
        training={"learning_rte": 1e-5, "num_train_epochs": 0, "mixed_precision": "fp8"},
        data={"stratify": "sometimes"},
        trainng={},
    )
    path = write_config(tmp_path, raw)
    with pytest.raises(ConfigError) as error:
        load_config(path, ["training.seed"])
    keys = [issue.key for issue in error.value.issues]
    assert sorted(keys) == sorted(
        ["override", "training.learning_rte", "training.num_train_epochs", "training.mixed_precision",
         "data.stratify", "trainng"]
    )
    assert str(error.value).startswith(f"6 problem(s) in {path}:")


def test_error_lines_name_key_value_fix():
    with pytest.raises(ConfigError) as error:
        validate_config(minimal(training={"learning_rate": -1}))
    line = str(error.value).splitlines()[1]
    assert line.startswith("  - training.learning_rate = -1: ")
    assert "Input should be greater than 0" in line
    assert "Peak learning rate" in line


# ---------------------------------------------------------------------------------------------------------------
# Overrides


def test_override_learning_rate(tmp_path):
    config = load_config(write_config(tmp_path, minimal()), ["training.learning_rate=3e-5"])
    assert config.training.learning_rate == 3e-5


def test_override_creates_section(tmp_path):
    config = load_config(write_config(tmp_path, minimal()), ["schedule.preset=linear_probe", "data.keep_labels=[a, b]"])
    assert config.schedule.preset == "linear_probe"
    assert config.data.keep_labels == ["a", "b"]


def test_override_null_and_bool(tmp_path):
    raw = minimal(training={"max_grad_norm": 2.0})
    config = load_config(write_config(tmp_path, raw), ["training.max_grad_norm=null", "data.stratify=false"])
    assert config.training.max_grad_norm is None
    assert config.data.stratify is False


@pytest.mark.parametrize("override", ["training.learning_rate", "=3e-5", "  =1"])
def test_override_bad_syntax(tmp_path, override):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, minimal()), [override])
    issue = error.value.issues[0]
    assert issue.key == "override"
    assert issue.value == override
    assert "KEY=VALUE" in issue.message


def test_override_unknown_key(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, minimal()), ["training.learning_rat=1e-4"])
    assert error.value.issues[0].fix == "did you mean 'learning_rate'?"


def test_override_into_value(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, minimal()), ["task.name=x"])
    assert "'task' is a value, not a section" in error.value.issues[0].message


def test_override_into_list_names_value(tmp_path):
    stages = [{"until_step": 3, "train": "head"}, {"train": "all"}]
    config = minimal(schedule={"preset": "milestones", "stages": stages})
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, config), ["schedule.stages.0.until_step=2"])
    issue = error.value.issues[0]
    assert issue.key == "schedule.stages.0.until_step"
    assert issue.value == 2
    assert issue.fix == "override the whole value, e.g. schedule.stages='[{train: head, until_step: 3}, {train: all}]'."


def test_override_invalid_value(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, minimal()), ["training.learning_rate=fast"])
    assert error.value.issues[0].key == "training.learning_rate"


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_folder_as_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)


def test_non_utf8_config(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("task: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text \\(invalid continuation byte at byte 9\\)"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_top_level_not_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(path)


def test_save_load_round_trip(tmp_path):
    raw = minimal(
        training={"learning_rate": 3e-5, "warmup_ratio": 0.06},
        data={"keep_labels": ["fresh", "rotten"], "max_length": 64},
        schedule={"preset": "milestones", "stages": [{"until_epoch": 2, "train": "head"}, {"train": "all"}]},
    )
    config = load_config(write_config(tmp_path, raw), ["training.seed=7"])
    save_config(config, tmp_path / "resolved.yaml")
    reloaded = load_config(tmp_path / "resolved.yaml")
    assert reloaded == config
    assert reloaded.training.seed == 7


def test_resolved_config_has_defaults(tmp_path):
    save_config(validate_config(minimal()), tmp_path / "resolved.yaml")
    written = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert written["training"]["gradient_accumulation_steps"] == 1
    assert written["data"]["split_seed"] == 42


# ---------------------------------------------------------------------------------------------------------------
# Option descriptions and shipped configs


def test_every_option_described():
    undescribed = [doc.key for doc in describe_options() if not doc.description.strip()]
    assert undescribed == []


def test_option_keys_unique():
    keys = [doc.key for doc in describe_options()]
    assert len(keys) == len(set(keys))


def test_options_include_bounds():
    docs = {doc.key: doc for doc in describe_options()}
    assert docs["training.learning_rate"].minimum == 0.0
    assert docs["training.mixed_precision"].choices == ("no", "fp16", "bf16", "auto")
    assert docs["task"].required is True


def shipped_configs() -> list[Path]:
    return sorted(path for path in CONFIGS_DIR.rglob("*.yaml") if "accelerate" not in path.relative_to(CONFIGS_DIR).parts)


def test_shipped_configs_exist():
    assert shipped_configs()


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda path: str(path.relative_to(CONFIGS_DIR)))
def test_shipped_config_valid(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda path: str(path.relative_to(CONFIGS_DIR)))
def test_shipped_config_starts_with_command(path):
    first_lines = path.read_text(encoding="utf-8").splitlines()[:8]
    assert any(line.startswith("#") and "finetune train" in line for line in first_lines)


# ---------------------------------------------------------------------------------------------------------------
# Generated reference


def test_config_docs_up_to_date():
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), "docs/config.md is stale. Fix: run `python -m finetune.config.docs`."


def test_config_docs_lists_every_option():
    text = render_markdown()
    missing = [doc.key for doc in describe_options() if f"| `{doc.key}` |" not in text]
    assert missing == []


def test_config_docs_check_flags_stale_file(tmp_path):
    stale = tmp_path / "config.md"
    stale.write_text("# old\n", encoding="utf-8")
    command = [sys.executable, "-m", "finetune.config.docs", "--check", "--output", str(stale)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "is out of date" in result.stderr


def test_config_docs_writes_file(tmp_path):
    output = tmp_path / "docs" / "config.md"
    command = [sys.executable, "-m", "finetune.config.docs", "--output", str(output)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert output.read_text(encoding="utf-8") == render_markdown()


def test_yaml_booleans_read_as_choices():
    # A bare `no` or `true` in YAML is a boolean; for these choice fields the word was meant.
    config = validate_config(minimal(training={"mixed_precision": False, "eval_strategy": False},
                                     schedule={"preset": "linear_probe", "cache_features": True}))
    assert config.training.mixed_precision == "no"
    assert config.training.eval_strategy == "no"
    assert config.schedule.cache_features == "true"


def test_type_error_keeps_other_sections_checks():
    # The data section is valid alone, so its contradiction is reported with the training type error.
    keys = issues_of(minimal(training={"num_train_epochs": "three"}, data={"train": "a.csv", "validation_size": 0}))
    assert "training.num_train_epochs" in keys
    assert "data.validation_size" in keys
