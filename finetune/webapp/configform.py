"""The Train tab's logic without the UI: form fields from the schema, form <-> YAML sync, validation.

The form shows a few common options; the YAML editor contains the whole config. Each form field is one dotted
config key, and its label, help text, choices and bounds come from `describe_options()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, ConfigIssue, OptionDoc, RunConfig, describe_options, validate_config
from .security import PathNotAllowed, looks_like_hub_id, resolve_inside, resolve_model_reference
from .settings import AppSettings
from ..log import get_logger

logger = get_logger(__name__)

# Form fields in display order. The key order is also the order of values passed between UI and logic.
FORM_KEYS = (
    "name",
    "task",
    "model.name_or_path",
    "data.train",
    "schedule.preset",
    "training.learning_rate",
    "training.num_train_epochs",
    "training.per_device_train_batch_size",
    "training.mixed_precision",
)
# Keys whose values are paths typed by the user and must stay inside the data roots.
DATA_PATH_KEYS = ("data.train", "data.validation", "data.test")


@dataclass(frozen=True)
class FormField:
    """One form field: the option's schema description and the widget kind that shows it."""

    doc: OptionDoc
    kind: str  # "choice", "int", "float" or "text"

    @property
    def label(self) -> str:
        return self.doc.key


def form_fields() -> list[FormField]:
    docs = {doc.key: doc for doc in describe_options()}
    fields = []
    for key in FORM_KEYS:
        doc = docs[key]
        if doc.choices:
            kind = "choice"
        elif doc.type_name.startswith("int"):
            kind = "int"
        elif doc.type_name.startswith("float"):
            kind = "float"
        else:
            kind = "text"
        fields.append(FormField(doc, kind))
    return fields


def default_config(backbone: str = "", task: str = "text-classification") -> dict:
    """Return the starting config of the editor: the required keys plus the form's options at their defaults."""
    raw: dict = {"name": "my-run", "task": task, "model": {"name_or_path": backbone}, "data": {"train": ""}}
    for field in form_fields():
        if field.doc.default is not None and get_key(raw, field.doc.key) is None:
            set_key(raw, field.doc.key, field.doc.default)
    return raw


def get_key(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_key(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if value is None or value == "":
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def parse_yaml(text: str) -> dict:
    """Parse the editor's text; raise `ConfigError` when it is not a YAML mapping."""
    try:
        raw = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as error:
        raise ConfigError([ConfigIssue("config", "", f"is not valid YAML: {error}", "fix the YAML syntax.")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("config", type(raw).__name__, "must be a mapping of sections.", "start with `task:`.")])
    return raw


def dump_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def form_to_yaml(text: str, values: list[Any]) -> str:
    """Write the form's values into the editor's YAML, keeping every other key the user wrote."""
    try:
        raw = parse_yaml(text)
    except ConfigError:
        raw = {}
    for field, value in zip(form_fields(), values):
        set_key(raw, field.doc.key, _form_value(field, value))
    return dump_yaml(raw)


def _form_value(field: FormField, value: Any) -> Any:
    # gr.Number returns floats; integer options are stored as ints so the YAML reads naturally.
    if value is None or value == "":
        return None
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def yaml_to_form(text: str) -> list[Any] | None:
    """Return the form's values read from the YAML, or None when the YAML does not parse (form unchanged)."""
    try:
        raw = parse_yaml(text)
    except ConfigError:
        return None
    return [get_key(raw, field.doc.key) for field in form_fields()]


def check(text: str, settings: AppSettings) -> tuple[RunConfig | None, list[ConfigIssue]]:
    """Validate the editor's YAML against the schema and the app's path rules; return the config or every issue.

    Path issues (data outside the data roots, a model folder outside the model roots, a custom run folder)
    are listed with the schema's issues, so the user sees them all at once.
    """
    try:
        raw = parse_yaml(text)
    except ConfigError as error:
        return None, list(error.issues)
    path_issues = check_paths(raw, settings)
    try:
        config = validate_config(raw, source="editor", extra_issues=path_issues)
    except ConfigError as error:
        return None, list(error.issues)
    image_issues = image_path_issues(config, settings)
    if image_issues:
        return None, image_issues
    return config, []


def image_path_issues(config: RunConfig, settings: AppSettings) -> list[ConfigIssue]:
    """List data sources of an image task that name image files outside the data roots.

    A CSV, JSON or Parquet file inside the roots may list any path, and a folder may hold symlinks, so the
    image paths the job would read are checked too. Misclassified images are shown in the app, so a path
    outside the roots would leak that file.

    NOTE: the check runs when the config is validated; a data file edited after the launch is not checked again.
    """
    if config.task != "image-classification" or config.data.format == "hub":
        return []
    from ..data.common import DataError
    from ..data.image import read_image_paths

    issues = []
    for key in DATA_PATH_KEYS:
        split = key.split(".")[1]
        value = getattr(config.data, split)
        if not value:
            continue
        try:
            paths = read_image_paths(value, split, config)
        except (DataError, OSError) as error:
            # Data the app cannot read fails the job too, with the engine's own message.
            logger.info("image paths of %s not checked: %s", value, error)
            continue
        for path in paths:
            try:
                resolve_inside(path, settings.all_data_roots(), subject="image")
            except PathNotAllowed as error:
                issues.append(ConfigIssue(key, value, f"lists an image outside the data roots: {error}",
                                          "list only images inside the data roots, or upload them in a zip."))
                break
    return issues


def check_paths(raw: dict, settings: AppSettings) -> list[ConfigIssue]:
    """Resolve the config's paths in place and list those outside the configured roots."""
    issues = []
    is_hub_data = get_key(raw, "data.format") == "hub"
    if get_key(raw, "data.train") == "":
        issues.append(ConfigIssue("data.train", "", "is empty.", "type a path inside the data roots or upload a file."))
    for key in DATA_PATH_KEYS:
        value = get_key(raw, key)
        if not isinstance(value, str) or not value.strip():
            continue
        if is_hub_data:
            issues.extend(hub_name_issues(key, value, settings))
            continue
        try:
            set_key(raw, key, str(resolve_inside(value, settings.all_data_roots(), subject=key)))
        except PathNotAllowed as error:
            issues.append(ConfigIssue(key, value, str(error)))
    model = get_key(raw, "model.name_or_path")
    if isinstance(model, str) and model.strip() and not model.startswith("asset:"):
        try:
            set_key(raw, "model.name_or_path", resolve_model_reference(model, model_roots(settings)))
        except PathNotAllowed as error:
            issues.append(ConfigIssue("model.name_or_path", model, str(error)))
    for key in ("output.run_dir", "checkpoint.resume"):
        value = get_key(raw, key)
        if key == "output.run_dir" and value is not None:
            issues.append(ConfigIssue(key, value, "is chosen by the job service in the app.", "remove output.run_dir."))
        if key == "checkpoint.resume" and value not in (None, "auto", "never"):
            issues.append(ConfigIssue(key, value, "must be auto or never in the app.", "use resume on the Jobs tab."))
    return issues


def hub_name_issues(key: str, value: str, settings: AppSettings) -> list[ConfigIssue]:
    """List an issue when a data value under `data.format: hub` is not a plain Hub dataset name.

    `datasets.load_dataset` reads a local folder or file when the name is a path, so a path here would bypass
    the data roots. The job runs in the workspace, so a relative name that exists there is a path too.
    """
    name = value.strip()
    if ":" in name:
        name = name.rpartition(":")[0]  # `NAME:SPLIT` picks a split; only the name is a path risk.
    if looks_like_hub_id(name) and not (settings.workspace / name).exists():
        return []
    return [ConfigIssue(
        key, value, "is not a Hub dataset name (owner/name); with data.format hub a local path would bypass the data roots.",
        "give a Hub dataset name, or remove data.format: hub and use a path inside the data roots.",
    )]


def model_roots(settings: AppSettings) -> list[Path]:
    """Model roots plus the folders of the bundled offline backbones."""
    return [*settings.all_model_roots(), *(path.parent for path, _ in bundled_backbones(settings))]


def bundled_backbones(settings: AppSettings) -> list[tuple[Path, str]]:
    """Return (folder, label) of the offline backbones that are installed: MiniLM and a converted EfficientNet."""
    found = []
    try:
        from .. import assets

        found.append((Path(assets.minilm_model_dir()).resolve(), "all-MiniLM-L6-v2 (bundled, text)"))
    except (ImportError, FileNotFoundError) as error:
        # A missing asset package only removes the choice; typed Hub ids and local folders still work.
        logger.info("bundled MiniLM backbone not offered: %s", error)
    for base in [Path.cwd(), settings.workspace, *settings.model_roots]:
        folder = base / "runs" / "assets" / "efficientnet_lite0"
        if (folder / "config.json").is_file():
            found.append((folder.resolve(), "EfficientNet-Lite0 (converted, image)"))
            break
    return found


def issues_by_field(issues: list[ConfigIssue]) -> tuple[dict[str, list[str]], list[str]]:
    """Split issues into those shown next to a form field (by key) and the rest, shown beside the editor."""
    keys = set(FORM_KEYS)
    by_field: dict[str, list[str]] = {}
    others = []
    for issue in issues:
        text = issue.message + (f" Fix: {issue.fix}" if issue.fix else "")
        if issue.key in keys:
            by_field.setdefault(issue.key, []).append(text)
        else:
            others.append(f"`{issue.key}`: {text}")
    return by_field, others
