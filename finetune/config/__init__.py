"""Run configuration: one YAML file, validated whole before anything heavy happens.

Each option is described once, by its pydantic `Field(description=...)`; the CLI help, the web form and
docs/config.md all read those descriptions through `describe_options()`.
"""

from __future__ import annotations

import difflib
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError

from .base import MISSING, ConfigError, ConfigIssue, Section
from .data import AugmentationConfig, DataConfig
from .model import LayerGroupPattern, LoraConfig, ModelConfig
from .output import CheckpointConfig, OutputConfig, TrackingConfig
from .schedule import ScheduleConfig, StageConfig
from .training import TrainingConfig

Task = Literal["text-classification", "image-classification"]

__all__ = [
    "AugmentationConfig", "CheckpointConfig", "ConfigError", "ConfigIssue", "DataConfig", "LayerGroupPattern",
    "LoraConfig", "ModelConfig", "OptionDoc", "OutputConfig", "RunConfig", "ScheduleConfig", "StageConfig",
    "TrackingConfig", "TrainingConfig", "apply_overrides", "describe_options", "load_config", "save_config",
    "validate_config",
]


class RunConfig(Section):
    name: str | None = Field(None, description="Run name; defaults to the config file's name without extension.")
    task: Task = Field(description="text-classification or image-classification.")
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.run_dir or Path("runs") / (self.name or "run"))

    def problems(self) -> list[ConfigIssue]:
        issues = []
        if self.task == "text-classification" and self.data.format in ("imagefolder", "idx"):
            issues.append(
                ConfigIssue(
                    "data.format", self.data.format, "is an image format but task is text-classification.",
                    "set task: image-classification, or a text data format.",
                )
            )
        if self.model.lora is not None and self.schedule.preset not in ("full",):
            issues.append(
                ConfigIssue(
                    "schedule.preset", self.schedule.preset, "cannot be combined with model.lora, which freezes the backbone.",
                    "use preset full with LoRA, or remove model.lora.",
                )
            )
        return issues


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in RunConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
}


# ---------------------------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply dotted `KEY=VALUE` overrides and validate the result.

    Raises `ConfigError` listing every problem (file, YAML, overrides and schema) in one message.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError([ConfigIssue("config", str(path), "is a folder, not a YAML file.", "give the config file's path.")])
    if not path.is_file():
        raise ConfigError([ConfigIssue("config", str(path), "file not found.", "check the path.")])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError([ConfigIssue(
            "config", str(path), f"is not UTF-8 text ({error.reason} at byte {error.start}).", "save it as UTF-8."
        )]) from None
    except yaml.YAMLError as error:
        raise ConfigError([ConfigIssue("config", str(path), f"is not valid YAML: {error}", "fix the YAML syntax.")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("config", type(raw).__name__, "must be a mapping of sections.", "start with `task:`.")])
    raw.setdefault("name", path.stem)
    override_issues = apply_overrides(raw, overrides or [])
    return validate_config(raw, source=str(path), extra_issues=override_issues)


def apply_overrides(raw: dict, overrides: list[str]) -> list[ConfigIssue]:
    """Set each `a.b.c=VALUE` in `raw` in place; VALUE is parsed as YAML (so `3e-5`, `true`, `[a, b]` work)."""
    issues = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            issues.append(ConfigIssue("override", item, "is not of the form KEY=VALUE.", "write e.g. training.learning_rate=3e-5."))
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                issues.append(_override_into_value_issue(key, value, ".".join(parts[: depth + 1]), child))
                break
            node = child
        else:
            node[parts[-1]] = value
    return issues


def _override_into_value_issue(key: str, value: Any, value_key: str, current: Any) -> ConfigIssue:
    # The fix repeats the current value in YAML flow style, so a list such as schedule.stages can be copied,
    # edited and given back whole.
    flow = yaml.safe_dump(current, default_flow_style=True, width=float("inf")).strip()
    flow = flow.removesuffix("...").strip()  # a plain scalar is dumped as a document ending in `...`
    return ConfigIssue(
        key, value, f"'{value_key}' is a value, not a section, so its parts cannot be overridden one by one.",
        f"override the whole value, e.g. {value_key}='{flow}'.",
    )


def _number_or_text(value: Any) -> Any:
    # PyYAML (YAML 1.1) reads `3e-5` as a string because it has no dot; users mean a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _accepts_number(annotation: Any) -> bool:
    """Whether a field takes a number and no string, so that numeric text like `3e-5` should become a number."""
    args = get_args(annotation) or (annotation,)
    if str in args or get_origin(annotation) is Literal:
        return False
    return any(arg in (int, float) for arg in args)


def validate_config(raw: dict, source: str | None = None, extra_issues: list[ConfigIssue] | None = None) -> RunConfig:
    """Validate a config mapping and return it as a `RunConfig`, or raise one `ConfigError` with every problem."""
    raw = _normalise_numbers(raw, RunConfig)
    issues = list(extra_issues or [])
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        issues += _issues_from_validation(error, raw)
        issues += _problems_of_valid_sections(raw)
        raise ConfigError(issues, source) from None
    issues += config.problems()
    for name in SECTIONS:
        issues += getattr(config, name).problems()
    if issues:
        raise ConfigError(issues, source)
    return config


def _problems_of_valid_sections(raw: dict) -> list[ConfigIssue]:
    """Return the consistency problems of the sections that are valid on their own, so that a type error in
    one section does not hide a contradiction in another until the next attempt."""
    issues = []
    for name, section in SECTIONS.items():
        if not isinstance(raw.get(name), dict):
            continue
        try:
            issues += section.model_validate(raw[name]).problems()
        except ValidationError:
            continue  # its field errors are already reported
    return issues


def _normalise_numbers(node: Any, model: type[BaseModel] | None) -> Any:
    # Only fields that take numbers are converted: a quoted "2" stays text in a string field such as
    # data.hub_config_name or data.keep_labels.
    if isinstance(node, list):
        return [_normalise_numbers(value, model) for value in node]
    if not isinstance(node, dict) or model is None:
        return node
    normalised = {}
    for key, value in node.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is not None and isinstance(value, str) and _accepts_number(field.annotation):
            value = _number_or_text(value)
        elif field is not None:
            value = _normalise_numbers(value, _nested_model(field.annotation))
        normalised[key] = value
    return normalised


def _issues_from_validation(error: ValidationError, raw: dict) -> list[ConfigIssue]:
    issues = []
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        # Union members add their type name to the location (e.g. `train.str`); drop them for the user.
        location = [part for part in location if part not in _TYPE_NAMES]
        key = ".".join(location) or "config"
        value = _lookup(raw, location)
        kind = item["type"]
        if kind == "extra_forbidden":
            issues.append(_unknown_key_issue(location, value))
        elif kind == "missing":
            issues.append(ConfigIssue(key, MISSING, "is required.", f"add `{location[-1]}:` to the config. {_help_for(location)}".strip()))
        elif kind in ("model_type", "dict_type") and _model_at(location) is not None:
            issues.append(_section_issue(location, value))
        else:
            # Pydantic's message already states what is expected; the option's meaning helps choose a value.
            described = _help_for([part for part in location if not part.isdigit()])
            meaning = f" ({key}: {described})" if described else ""
            issues.append(ConfigIssue(key, value, item["msg"].rstrip(".") + "." + meaning))
    return _dedupe(issues)


_TYPE_NAMES = {"str", "int", "float", "bool", "list[str]", "none", "literal['auto','never']"}


def _dedupe(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    seen, unique = set(), []
    for issue in issues:
        if (issue.key, issue.message) not in seen:
            seen.add((issue.key, issue.message))
            unique.append(issue)
    return unique


def _section_issue(location: list[str], value: Any) -> ConfigIssue:
    # A section written as one value (`training: 5`). Pydantic reports only "valid dictionary" for it.
    keys = list(_model_at(location).model_fields)
    example = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return ConfigIssue(".".join(location), value, "must be a section of `key: value` settings, not a single value.",
                       f"indent its settings ({example}) under `{location[-1]}:` or remove the line.")


def _unknown_key_issue(location: list[str], value: Any) -> ConfigIssue:
    parent = _model_at(location[:-1])
    known = list(parent.model_fields) if parent else []
    close = difflib.get_close_matches(location[-1], known, n=1, cutoff=0.6)
    fix = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(sorted(known))}."
    return ConfigIssue(".".join(location), value, "unknown key.", fix)


def _model_at(location: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in location:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        nested = _nested_model(field.annotation)
        if nested is None:
            return None
        model = nested
    return model


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _help_for(location: list[str]) -> str:
    parent = _model_at(location[:-1])
    field = parent.model_fields.get(location[-1]) if parent else None
    return (field.description or "") if field else ""


def _lookup(raw: Any, location: list[str]) -> Any:
    node = raw
    for part in location:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (defaults filled in) as YAML that `load_config` reads back unchanged."""
    data = config.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Option descriptions


@dataclass(frozen=True)
class OptionDoc:
    """One leaf option of the schema: dotted key, type, default, allowed choices, bounds and description."""

    key: str
    type_name: str
    default: Any
    required: bool
    description: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    # True when the bound itself is not allowed (pydantic `gt` / `lt` rather than `ge` / `le`).
    minimum_exclusive: bool = False
    maximum_exclusive: bool = False


def describe_options(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[OptionDoc]:
    """List every leaf option of the schema in declaration order, with its one description."""
    docs = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        is_list = get_origin(field.annotation) is list or any(get_origin(a) is list for a in get_args(field.annotation))
        if nested is not None and not is_list:
            docs += describe_options(nested, prefix=f"{key}.")
            continue
        minimum = maximum = None
        minimum_exclusive = maximum_exclusive = False
        for meta in field.metadata:
            minimum = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else minimum
            if getattr(meta, "gt", None) is not None:
                minimum, minimum_exclusive = meta.gt, True
            maximum = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else maximum
            if getattr(meta, "lt", None) is not None:
                maximum, maximum_exclusive = meta.lt, True
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        docs.append(
            OptionDoc(
                key=key,
                type_name=_type_name(field.annotation),
                default=default,
                required=field.is_required(),
                description=field.description or "",
                choices=_choices(field.annotation),
                minimum=minimum,
                maximum=maximum,
                minimum_exclusive=minimum_exclusive,
                maximum_exclusive=maximum_exclusive,
            )
        )
    return docs


def option_doc(key: str) -> OptionDoc:
    """Return the description of one dotted option key, e.g. `training.learning_rate`."""
    for doc in describe_options():
        if doc.key == key:
            return doc
    raise KeyError(key)


def _choices(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()


def _type_name(annotation: Any) -> str:
    """Return a short type name such as `int | None` or `list[str]`; a Literal is `choice`."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "choice"
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in get_args(annotation))
    if origin is list:
        return f"list[{_type_name(get_args(annotation)[0])}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
