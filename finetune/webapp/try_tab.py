"""The Try tab: classify an uploaded image or a typed text with one or two exported models, and inspect a
finished job's validation errors (confusion matrix and misclassified examples).

Prediction events share their own concurrency group, so a long event elsewhere in the app never delays them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
from PIL import Image

from ..jobs import JobNotFound
from ..log import get_logger
from . import configform, plots, runs
from .security import PathNotAllowed, resolve_inside
from .service import JobService
from .settings import AppSettings

logger = get_logger(__name__)

TRY_CONCURRENCY_ID = "try"
TRY_CONCURRENCY_LIMIT = 2
MAX_GALLERY = 48
_CACHE_SIZE = 3  # loaded models kept in memory; each costs its full size in RAM


class PredictorCache:
    """Keeps the most recently used `Predictor`s, keyed by folder and config.json mtime (a re-export reloads)."""

    def __init__(self, size: int = _CACHE_SIZE):
        self._size = size
        self._items: OrderedDict[tuple[str, float], object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, folder: Path):
        from ..predict import Predictor

        key = (str(folder), (folder / "config.json").stat().st_mtime)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        predictor = Predictor(folder)  # loaded outside the lock so another model can be used meanwhile
        with self._lock:
            self._items[key] = predictor
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return predictor


def build_try_tab(settings: AppSettings, service: JobService) -> None:
    """Lay out the Try tab inside the current `gr.Blocks` and wire its events."""
    cache = PredictorCache()
    with gr.Row():
        model_a = gr.Dropdown([], label="model", allow_custom_value=True, elem_id="try-model-a",
                              info="A finished job, or an exported model folder inside the model roots.")
        model_b = gr.Dropdown([], label="second model (optional, side by side)", allow_custom_value=True,
                              elem_id="try-model-b")
        refresh_button = gr.Button("Refresh models", scale=0)
    with gr.Row():
        image = gr.Image(type="filepath", label="image", elem_id="try-image", height=240)
        with gr.Column():
            text = gr.Textbox(label="text", lines=4, elem_id="try-text")
            text_pair = gr.Textbox("", label="second text (only for models trained on text pairs)", lines=2,
                                   elem_id="try-text-pair")
            top_k = gr.Slider(1, 20, value=5, step=1, label="top-k classes")
            predict_button = gr.Button("Classify", variant="primary", elem_id="try-predict")
    with gr.Row():
        label_a = gr.Label(label="model", elem_id="try-label-a")
        label_b = gr.Label(label="second model", elem_id="try-label-b")
    try_status = gr.Markdown(elem_id="try-status")
    analysis = _build_analysis(service, settings, model_a)
    # Results of the previous choice would otherwise stay on screen under the new model's name.
    model_a.change(lambda: [None, None, "", *clear_analysis()], None, [label_a, label_b, try_status, *analysis],
                   show_progress="hidden", api_visibility="private")
    model_b.change(lambda: [None, ""], None, [label_b, try_status], show_progress="hidden", api_visibility="private")

    def predict(a, b, image_path, typed, k, typed_pair=""):
        return predict_pair(settings, service, cache, a, b, image_path, typed, k, typed_pair)

    # text_pair comes last, so API clients that send the first five inputs keep working.
    predict_button.click(predict, [model_a, model_b, image, text, top_k, text_pair], [label_a, label_b, try_status],
                         api_name="predict", concurrency_id=TRY_CONCURRENCY_ID, concurrency_limit=TRY_CONCURRENCY_LIMIT)
    refresh_button.click(lambda: [gr.update(choices=model_choices(settings, service))] * 2, None, [model_a, model_b],
                         api_name="model_choices")
    gr.on([model_a.focus, model_b.focus], lambda: [gr.update(choices=model_choices(settings, service))] * 2,
          None, [model_a, model_b], show_progress="hidden", api_visibility="private")


def _build_analysis(service: JobService, settings: AppSettings, model_a: gr.Dropdown) -> list[gr.components.Component]:
    """Lay out the validation-error view of `model_a`'s job; return its output components."""
    gr.Markdown("### Validation errors of a finished job")
    with gr.Row():
        analyse_button = gr.Button("Show confusion matrix and misclassified examples", elem_id="try-analyse")
    confusion = gr.Plot(label="confusion matrix", elem_id="try-confusion")
    gallery = gr.Gallery(label="misclassified images (true → predicted)", columns=6, height=300, elem_id="try-gallery")
    texts = gr.Dataframe(headers=["text", "true", "predicted"], label="misclassified texts", elem_id="try-texts")
    message = gr.Markdown()
    analyse_button.click(lambda job: analyse_job(service, settings, job), model_a, [confusion, gallery, texts, message],
                         api_name="analyse", concurrency_id=TRY_CONCURRENCY_ID, concurrency_limit=TRY_CONCURRENCY_LIMIT)
    return [confusion, gallery, texts, message]


def clear_analysis() -> list:
    """Return empty values for the confusion matrix, the misclassified images and texts, and the message."""
    return [None, None, None, ""]


def model_choices(settings: AppSettings, service: JobService) -> list[tuple[str, str]]:
    """Return (label, value) for finished jobs with an export, then exported folders under the model roots."""
    choices = []
    for job in service.list_jobs():
        if runs.has_export(job.run_dir):
            best = "" if job.best is None else f", {job.metric} {job.best:.3f}"
            choices.append((f"job {job.id} · {job.name}{best}", f"job:{job.id}"))
    for root in settings.model_roots:
        for config_file in sorted(Path(root).glob("**/config.json"))[:200]:
            choices.append((f"{config_file.parent.relative_to(root) or config_file.parent.name} ({root})", str(config_file.parent)))
    return choices


def resolve_model(value: str | None, settings: AppSettings, service: JobService) -> Path:
    """Turn a `job:ID` choice or a typed folder into an export folder inside the allowed roots."""
    if not value:
        raise PathNotAllowed("Choose a model first.")
    if value.startswith("job:"):
        folder = runs.export_dir(service.run_dir(value[4:]))
    else:
        folder = resolve_inside(value, configform.model_roots(settings), subject="model folder")
    if not (folder / "config.json").is_file():
        raise PathNotAllowed(f"{folder} is not an exported model folder (no config.json); pick a finished job.")
    return folder


def _text_input(predictor, text: str, text_pair: str) -> str | dict:
    # A pair model given one text would classify it without its second text and still return a confident class.
    from ..predict import text_pair_column

    pair_column = text_pair_column(predictor.model_dir)
    if pair_column is None:
        if text_pair.strip():
            raise ValueError("this model was trained on single texts; leave the second text empty.")
        return text
    if not text_pair.strip():
        raise ValueError(f"this model was trained on text pairs (data.text_pair_column: {pair_column}); "
                         "type the second text too.")
    return {"text": text, "text_pair": text_pair}


def _model_label(value: str) -> str:
    # The dropdown value `job:3` is internal, so messages name the job as the Jobs tab does.
    return f"job {value[4:]}" if value.startswith("job:") else value


def predict_pair(settings, service, cache, model_a, model_b, image_path, text, top_k, text_pair=""):
    """Classify one input with model A and, when chosen, model B; return two gr.Label values and a message."""
    if not image_path and not (text or "").strip():
        return None, None, "Upload an image or type a text first."
    results, notes = [], []
    for value in (model_a, model_b):
        if not value:
            results.append(None)
            continue
        try:
            folder = resolve_model(value, settings, service)
            results.append(classify(cache.get(folder), image_path, text, int(top_k), text_pair))
        except (PathNotAllowed, FileNotFoundError, ValueError, KeyError) as error:
            logger.info("Try tab: prediction with %s failed: %s", _model_label(value), error)
            results.append(None)
            notes.append(f"**Error:** {_model_label(value)}: {error}")
    return results[0], results[1], "\n\n".join(notes)


def classify(predictor, image_path: str | None, text: str, top_k: int, text_pair: str = "") -> dict[str, float]:
    """Run one input through a predictor: an image model gets the image, a text model the text (and pair)."""
    wants_image = predictor.task == "image-classification"
    if wants_image and not image_path:
        raise ValueError("this is an image model; upload an image.")
    if not wants_image and not (text or "").strip():
        raise ValueError("this is a text model; type a text.")
    if wants_image:
        inputs = [Image.open(image_path).convert("RGB")]
    else:
        inputs = [_text_input(predictor, text, text_pair or "")]
    ranked = predictor.predict(inputs, top_k=top_k)[0]
    return {item["label"]: float(item["score"]) for item in ranked}


def analyse_job(service: JobService, settings: AppSettings, value: str | None):
    """Return the confusion matrix, misclassified images and texts of a finished job's validation set."""
    if not value or not value.startswith("job:"):
        return None, None, None, "Choose a finished job (not a folder) as the model to see its validation errors."
    try:
        run_dir = service.run_dir(value[4:])
    except JobNotFound as error:
        logger.info("job %s: validation analysis failed: %s", value[4:], error)
        return None, None, None, f"**Error:** {error}"
    rows = runs.read_validation_predictions(run_dir)
    if rows is None:
        return None, None, None, (
            f"Job {value[4:]} has no `export/{runs.PREDICTIONS_FILE}` (it is written when a run completes); "
            "nothing to show yet."
        )
    names = runs.label_names(run_dir)
    figure = plots.confusion_figure([str(r["label"]) for r in rows], [str(r["prediction"]) for r in rows], names)
    wrong = [row for row in rows if str(row["label"]) != str(row["prediction"])]
    images = [(_load_image(run_dir, row["image"]), f"{row['label']} → {row['prediction']}")
              for row in wrong[:MAX_GALLERY] if row.get("image")]
    texts = [[row["text"], row["label"], row["prediction"]] for row in wrong[:MAX_GALLERY * 4] if row.get("text")]
    is_text = any("text" in row for row in rows)
    return (
        figure,
        gr.update(value=images or None, visible=not is_text),
        gr.update(value=texts or None, visible=is_text),
        f"{len(wrong)} of {len(rows)} validation examples are misclassified.",
    )


def _load_image(run_dir: Path, relative: str) -> Image.Image:
    # Images are read here (not served by path) so the run folder never has to be exposed to the browser.
    path = resolve_inside(relative, [Path(run_dir)], subject="validation image")
    with Image.open(path) as image:
        return image.convert("RGB")
