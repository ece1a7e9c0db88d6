"""The Train tab: a form for the common options, a YAML editor for all of them, validation, a schedule
picture, data uploads and the launch button."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr

from ..log import get_logger
from . import configform, plots
from .security import UPLOAD_SUFFIXES, UploadRejected, resolve_inside, store_upload
from .service import JobService
from .settings import AppSettings

logger = get_logger(__name__)

# Form fields whose change redraws the schedule picture.
SCHEDULE_KEYS = ("model.name_or_path", "schedule.preset", "training.learning_rate", "training.num_train_epochs")


def build_train_tab(
    settings: AppSettings, service: JobService,
) -> tuple[gr.Code, list[gr.components.Component], list[gr.components.Component]]:
    """Lay out the Train tab inside the current `gr.Blocks` and wire its events.

    Returns the YAML editor, the form's inputs (in `configform.FORM_KEYS` order) and the outputs of
    `validation_outputs`. The Jobs tab fills the first two to edit a job as a new one, then validates into the
    third, so no message or picture of the previous config stays on screen.
    """
    backbones = backbone_choices(settings)
    start = configform.default_config(backbone=backbones[0][1] if backbones else "")
    with gr.Row():
        with gr.Column(scale=1):
            inputs, errors = _build_form(start, backbones)
            upload = gr.File(
                label=f"or upload data (zip of an image folder, CSV, JSON, Parquet; at most {settings.max_upload_mb:g} MiB)",
                file_types=list(UPLOAD_SUFFIXES), elem_id="data-upload",
            )
        with gr.Column(scale=1):
            editor = gr.Code(configform.dump_yaml(start), language="yaml", label="config (YAML)", elem_id="yaml-editor")
            other_errors = gr.Markdown(elem_id="other-errors")
            with gr.Row():
                validate_button = gr.Button("Validate", elem_id="validate")
                launch_button = gr.Button("Launch", variant="primary", elem_id="launch")
            status = gr.Markdown(elem_id="train-status")
    schedule_plot = gr.Plot(label="schedule stages", elem_id="schedule-plot")
    _wire(settings, service, inputs, errors, editor, other_errors, status, schedule_plot,
          (upload, validate_button, launch_button))
    return editor, inputs, [*errors, other_errors, status, schedule_plot]


def _build_form(start: dict, backbones: list[tuple[str, str]]) -> tuple[list[gr.components.Component], list[gr.Markdown]]:
    inputs, errors = [], []
    for field in configform.form_fields():
        doc = field.doc
        value = configform.get_key(start, doc.key)
        element_id = "field-" + doc.key.replace(".", "-").replace("_", "-")
        if doc.key == "model.name_or_path":
            component = gr.Dropdown(backbones, value=value, label=doc.key, info=doc.description,
                                    allow_custom_value=True, elem_id=element_id)
        elif field.kind == "choice":
            component = gr.Dropdown(list(doc.choices), value=value, label=doc.key, info=doc.description, elem_id=element_id)
        elif field.kind in ("int", "float"):
            # No minimum or maximum: Gradio would reject an out-of-range value in a toast that names no field and
            # leave the old value in the YAML, so the form and the launched config would differ. Validation
            # reports the bound next to the field instead.
            component = gr.Number(value, label=doc.key, info=doc.description,
                                  precision=0 if field.kind == "int" else None, elem_id=element_id)
        else:
            component = gr.Textbox(value or "", label=doc.key, info=doc.description, elem_id=element_id)
        inputs.append(component)
        errors.append(gr.Markdown(visible=False, elem_id=f"{element_id}-error", elem_classes=["field-error"]))
    return inputs, errors


def backbone_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """Return (label, value) pairs: bundled offline backbones, then model folders found under the model roots."""
    choices = [(label, str(path)) for path, label in configform.bundled_backbones(settings)]
    for root in settings.model_roots:
        for config_file in sorted(Path(root).glob("*/config.json"))[:200]:
            folder = config_file.parent
            choices.append((f"{folder.name} ({root})", str(folder)))
    return choices


def _wire(settings, service, inputs, errors, editor, other_errors, status, schedule_plot, buttons) -> None:
    upload, validate_button, launch_button = buttons
    def picture(text: str):
        return schedule_picture(text, settings)

    for key, component in zip(configform.FORM_KEYS, inputs):
        # In Gradio 6 `.input` defaults to trigger_mode "once", which drops the keystrokes typed while a sync is
        # pending, so the YAML (and the launched config) would miss the last characters that the form shows.
        synced = component.input(sync_form_to_yaml, [editor, *inputs], editor, show_progress="hidden",
                                 trigger_mode="always_last", api_visibility="private")
        if key in SCHEDULE_KEYS:
            # One shared queue of limit 1 draws the pictures in the order of the edits, so a slow, older
            # picture never replaces a newer one.
            synced.then(picture, editor, schedule_plot, show_progress="hidden", api_visibility="private",
                        concurrency_id="schedule-picture", concurrency_limit=1)
    editor.input(sync_yaml_to_form, editor, inputs, show_progress="hidden", trigger_mode="always_last",
                 api_visibility="private")
    editor.blur(picture, editor, schedule_plot, show_progress="hidden", api_visibility="private",
                concurrency_id="schedule-picture", concurrency_limit=1)

    def validate(text: str):
        return validation_outputs(text, settings, len(inputs))

    def launch(text: str):
        return launch_job(text, settings, service, len(inputs))

    def upload_data(path: str | None, text: str):
        return accept_upload(path, text, settings, len(inputs))

    outputs = [*errors, other_errors, status, schedule_plot]
    validate_button.click(validate, editor, outputs, api_name="validate")
    launch_button.click(launch, editor, outputs, api_name="launch")
    upload.upload(upload_data, [upload, editor], [editor, *inputs, status, upload], api_name="upload_data")


def sync_form_to_yaml(text: str, *values: Any) -> str:
    return configform.form_to_yaml(text, list(values))


def sync_yaml_to_form(text: str) -> list[Any]:
    values = configform.yaml_to_form(text)
    if values is None:
        return [gr.skip() for _ in configform.FORM_KEYS]
    return values


def schedule_picture(text: str, settings: AppSettings | None = None):
    """Return the schedule figure of the editor's config, or skip the update while the YAML does not parse."""
    try:
        raw = configform.parse_yaml(text)
    except configform.ConfigError:
        return gr.skip()
    patterns = configform.get_key(raw, "model.layer_groups")
    groups, note = estimate_groups(str(configform.get_key(raw, "model.name_or_path") or ""), settings,
                                   patterns if isinstance(patterns, list) else None)
    try:
        return plots.schedule_figure(raw.get("schedule") or {}, raw.get("training") or {}, groups, note)
    except (TypeError, ValueError, ZeroDivisionError) as error:
        # Half-typed values (a stage without numbers, text in a number field) have no picture yet; validation names them.
        logger.info("schedule picture skipped: %s", error)
        return gr.skip()


def estimate_groups(model: str, settings: AppSettings | None, patterns: list | None = None) -> tuple[list[str], str]:
    """Return the layer groups to draw, bottom to top, and a note when they are placeholders.

    For a local transformers folder inside the model roots the groups are the engine's own
    (`finetune.groups.discover_layer_groups` on the model built from its config.json on the meta device, so no
    weights are read or allocated). Hub ids and other backbones get four placeholder groups.
    """
    folder = Path(model)
    if model and settings is not None and folder.is_absolute() and (folder / "config.json").is_file():
        try:
            resolve_inside(model, configform.model_roots(settings), subject="model folder")
            key = json.dumps(patterns or [], sort_keys=True)
            return list(_engine_group_names(str(folder), (folder / "config.json").stat().st_mtime, key)), ""
        except (ValueError, OSError, KeyError, ImportError) as error:
            # An unknown architecture or a folder transformers cannot read keeps the placeholders.
            logger.info("layer groups of %s not discovered for the schedule picture: %s", model, error)
    placeholder = ["bottom group", "middle group", "top group", "head"]
    return placeholder, "groups are placeholders until the job loads the model (finetune inspect lists the real ones)"


@functools.lru_cache(maxsize=16)
def _engine_group_names(folder: str, config_mtime: float, patterns_json: str) -> tuple[str, ...]:
    # config_mtime is part of the cache key, so a re-saved folder is read again.
    import torch
    import transformers

    from ..config import LayerGroupPattern
    from ..groups import discover_layer_groups

    config = transformers.AutoConfig.from_pretrained(folder)
    is_vision = hasattr(config, "num_channels") or hasattr(config, "image_size") or config.model_type == "timm_wrapper"
    auto = transformers.AutoModelForImageClassification if is_vision else transformers.AutoModelForSequenceClassification
    patterns = [LayerGroupPattern.model_validate(item) for item in json.loads(patterns_json)] or None
    with torch.device("meta"):
        model = auto.from_config(config)
    return tuple(group.name for group in discover_layer_groups(model, patterns))


def validation_outputs(text: str, settings: AppSettings, field_count: int) -> list[Any]:
    """Show every issue: next to its form field when the field is on the form, else in the list by the editor."""
    config, issues = configform.check(text, settings)
    by_field, others = configform.issues_by_field(issues)
    updates = []
    for key in configform.FORM_KEYS[:field_count]:
        messages = by_field.get(key, [])
        field_text = "\n\n".join(f"**Error:** `{key}` {message}" for message in messages)
        updates.append(gr.update(value=field_text, visible=bool(messages)))
    other_text = "\n".join(f"- {line}" for line in others)
    if config is None:
        status = f"**{len(issues)} problem(s)** — fix them and validate again."
    else:
        status = "The config is valid."
    return [*updates, other_text, status, schedule_picture(text, settings)]


def launch_job(text: str, settings: AppSettings, service: JobService, field_count: int) -> list[Any]:
    """Validate and submit the editor's config as a new job; on any issue, show them and submit nothing."""
    outputs = validation_outputs(text, settings, field_count)
    config, issues = configform.check(text, settings)
    if config is None:
        return outputs
    job_id = service.submit(config)
    outputs[-2] = f"Job **{job_id}** queued as `{config.name}`. Watch it on the Jobs tab."
    return outputs


def accept_upload(path: str | None, text: str, settings: AppSettings, field_count: int) -> list[Any]:
    """Store an uploaded data file (checked for size and kind first) and point `data.train` at it."""
    keep = [gr.skip()] * (1 + field_count)
    if not path:
        return [*keep, gr.skip(), gr.skip()]
    try:
        stored = store_upload(path, settings.upload_dir, settings.max_upload_bytes)
    except UploadRejected as error:
        return [*keep, f"**Upload rejected:** {error}", None]
    finally:
        Path(path).unlink(missing_ok=True)  # Gradio's cached copy is no longer needed either way.
    try:
        raw = configform.parse_yaml(text)
    except configform.ConfigError:
        raw = configform.default_config()
    configform.set_key(raw, "data.train", str(stored))
    if stored.is_dir():
        configform.set_key(raw, "data.format", "imagefolder")
        configform.set_key(raw, "task", "image-classification")
    new_text = configform.dump_yaml(raw)
    return [new_text, *configform.yaml_to_form(new_text), f"Stored the upload as `{stored}`.", gr.skip()]
