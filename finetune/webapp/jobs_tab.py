"""The Jobs tab: a self-refreshing job table, and for the selected job its log tail, live curves, controls
and the export download.

Everything shown is read again from the job store and the run folder on each tick, so closing the browser
and coming back later shows the job's current state.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from .. import runlog
from ..jobs import JobNotFound
from ..log import get_logger
from . import plots, runs
from .service import JobService, JobView, export_zip_path
from .settings import AppSettings
from .train_tab import sync_yaml_to_form, validation_outputs

logger = get_logger(__name__)

REFRESH_SECONDS = 2.0
LOG_TAIL_LINES = 40
TABLE_HEADERS = ["id", "name", "status", "progress", "ETA", "stage", "best metric", "created"]
FINAL = ("completed", "stopped", "failed", "cancelled")
# Runs in the page before the delete handler and replaces its inputs with the job id and the user's choice.
CONFIRM_DELETE_JS = """(jobId, confirmed) => [
  jobId, jobId ? window.confirm(`Delete job ${jobId} and its run folder (checkpoints, logs, export)?`) : false
]"""


def build_jobs_tab(settings: AppSettings, service: JobService, edit_target: tuple | None = None) -> None:
    """Lay out the Jobs tab inside the current `gr.Blocks` and wire its events.

    `edit_target` is `(tabs, editor, form_inputs, validation)` of the Train tab: "Edit as new" copies the
    selected job's config there, switches to it and validates the copy into `validation` (the outputs of
    `train_tab.validation_outputs`). Without it the button is left out.
    """
    timer = gr.Timer(REFRESH_SECONDS)
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="jobs", elem_id="jobs-table")
    with gr.Row():
        selected = gr.Dropdown([], label="selected job", elem_id="job-select", scale=3, allow_custom_value=True)
        stop_button = gr.Button("Stop", elem_id="job-stop", scale=1)
        resume_button = gr.Button("Resume", elem_id="job-resume", scale=1)
        clone_button = gr.Button("Clone", elem_id="job-clone", scale=1)
        edit_button = gr.Button("Edit as new", elem_id="job-edit", scale=1, visible=edit_target is not None)
        delete_button = gr.Button("Delete", variant="stop", elem_id="job-delete", scale=1)
        download_button = gr.Button("Zip export", elem_id="job-download", scale=1)
    action_status = gr.Markdown(elem_id="job-action-status")
    job_status = gr.Markdown(elem_id="job-status")
    curves = gr.Plot(label="curves", elem_id="job-curves")
    # The box is as tall as the tail, so the newest line is visible without scrolling.
    log_tail = gr.Textbox(label="log tail", lines=12, max_lines=LOG_TAIL_LINES, autoscroll=True, elem_id="job-log")
    download = gr.File(label="exported model (zip)", elem_id="job-export-zip")
    drawn = gr.State(None)  # (job id, metrics.jsonl size) of the curves on screen, to redraw only on change

    def refresh(job_id, drawn_key):
        return refresh_view(service, job_id, drawn_key)

    outputs = [table, selected, job_status, log_tail, curves, drawn]
    # Every open page ticks, so several refreshes may run at once; each only reads the store and run folder.
    timer.tick(refresh, [selected, drawn], outputs, show_progress="hidden", api_name="jobs_refresh",
               concurrency_limit=4, concurrency_id="jobs-refresh")
    selected.change(refresh, [selected, gr.State(None)], outputs, show_progress="hidden", api_visibility="private")
    table.select(_job_from_row, table, selected, api_visibility="private")
    for button, action in ((stop_button, "stop"), (resume_button, "resume"), (clone_button, "clone")):
        button.click(_action_handler(service, action), selected, action_status, api_name=f"job_{action}")
    # Delete removes the run folder, so the browser shows a confirmation dialog first. API clients skip the dialog: `confirmed` keeps
    # its default True there, because the JavaScript runs only in the page.
    confirmed = gr.Checkbox(True, visible=False)
    delete_button.click(_delete_handler(service), [selected, confirmed], action_status, api_name="job_delete",
                        js=CONFIRM_DELETE_JS)
    if edit_target is not None:
        tabs, editor, form_inputs, validation = edit_target
        copied = gr.State(None)  # the copied YAML, or None when nothing was copied
        edited = edit_button.click(_edit_handler(service, len(form_inputs)), selected,
                                   [tabs, editor, *form_inputs, action_status, copied], api_visibility="private")

        def validate_copy(text: str | None) -> list:
            # Without this, the Train tab keeps the schedule picture, field errors and launch message of the
            # config it showed before. Without a copy, the Train tab is left as the user left it.
            if text is None:
                return [gr.skip()] * len(validation)
            return validation_outputs(text, settings, len(form_inputs))

        edited.success(validate_copy, copied, validation, api_visibility="private")
    download_button.click(lambda job_id: zip_job_export(service, settings, job_id), selected, [download, action_status],
                          api_name="job_export_zip")
    def follow(job_id):
        # A generator function (not a lambda returning one), so Gradio streams its updates.
        yield from follow_job(service, job_id)

    gr.Button("Follow until done", visible=False).click(
        follow, selected, job_status,
        api_name="job_follow", concurrency_limit=16, concurrency_id="follow",
    )


def refresh_view(service: JobService, job_id: str | None, drawn_key) -> list:
    """Return the table, the job choices and the selected job's status, log and (when changed) curves."""
    jobs = service.list_jobs()
    rows = [_table_row(job) for job in jobs]
    choices = [(job.label, job.id) for job in jobs]
    ids = {job.id for job in jobs}
    value = job_id or None
    if value is not None and value not in ids:
        # Keep the vanished id selected: moving the selection to another job would point Stop and Delete at a
        # job the user never chose.
        message = f"Job {value} no longer exists (it was deleted); select another job."
        return [rows, gr.update(choices=choices, value=value), message, "", None, None]
    # Keep the selection; with none yet, select the newest job so a returning user sees it at once.
    if value is None and jobs:
        value = jobs[0].id
    # A refresh that began before the user picked another job must not put the old pick back, so the value is
    # sent only when this refresh chose it.
    selector = gr.update(choices=choices) if value == job_id else gr.update(choices=choices, value=value)
    if value is None:
        return [rows, selector, "No job selected.", "", gr.skip(), drawn_key]
    job = next(job for job in jobs if job.id == value)
    metrics = job.run_dir / runlog.METRICS_FILE
    key = (job.id, metrics.stat().st_size if metrics.is_file() else 0)
    figure = gr.skip()
    if key != (tuple(drawn_key) if drawn_key else None):
        events = runlog.read_events(job.run_dir)
        figure = plots.curves_figure({job.name: events}, metric=job.metric)
    return [rows, selector, status_text(job), runs.tail_log(job.run_dir, max_lines=LOG_TAIL_LINES), figure, list(key)]


def _table_row(job: JobView) -> list:
    best = "" if job.best is None else f"{job.metric} {job.best:.4f}"
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created_at))
    return [job.id, job.name, job.status, job.progress_text, job.eta_text, job.stage, best, created]


def status_text(job: JobView) -> str:
    parts = [f"**job {job.id}** `{job.name}` — **{job.status}**"]
    if job.total_steps:
        parts.append(f"step {job.progress_text}")
    # A job that has not started has no epoch yet, though the progress reader reports 0.0 for it.
    if job.total_steps and job.epoch is not None:
        parts.append(f"epoch {job.epoch:.2f}")
    if job.stage:
        parts.append(f"stage {job.stage}")
    if job.eta_text:
        parts.append(f"ETA {job.eta_text}")
    if job.best is not None:
        parts.append(f"best {job.metric} {job.best:.4f}")
    text = " · ".join(parts)
    if job.failure_reason:
        # A stopped job keeps the reason its stop was not clean (e.g. killed after the stop timeout), but it did
        # not fail, and it resumes like any stopped job.
        label = "Failure" if job.status == "failed" else "Note"
        text += f"\n\n**{label}:** {job.failure_reason}"
    return text


def _job_from_row(table, event: gr.SelectData):
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    try:
        return str(table.iloc[row, 0])
    except (IndexError, AttributeError):
        return gr.skip()


def _action_handler(service: JobService, action: str):
    def handle(job_id: str | None) -> str:
        if not job_id:
            return "Select a job first."
        try:
            if action == "stop" and service.get(job_id).status == "queued":
                return service.cancel(job_id)
            return getattr(service, action)(job_id)
        except (KeyError, ValueError, OSError) as error:
            # The job service raises these for an unknown id or an action that does not fit the status.
            logger.info("job %s: %s failed: %s", job_id, action, error)
            return f"**Error:** {action} failed for job {job_id}: {error}"

    return handle


def _edit_handler(service: JobService, field_count: int):
    def handle(job_id: str | None) -> list:
        unchanged = [gr.skip()] * (2 + field_count)
        if not job_id:
            return [*unchanged, "Select a job first.", None]
        try:
            text = service.config_for_new_job(job_id)
        except (KeyError, ValueError) as error:
            logger.info("job %s: edit as new failed: %s", job_id, error)
            return [*unchanged, f"**Error:** cannot copy the config of job {job_id}: {error}", None]
        message = f"Copied the config of job {job_id} into the Train tab; edit it, then Validate and Launch."
        return [gr.Tabs(selected="train"), text, *sync_yaml_to_form(text), message, text]

    return handle


def _delete_handler(service: JobService):
    delete = _action_handler(service, "delete")

    def handle(job_id: str | None, confirmed: bool = True) -> str:
        if job_id and not confirmed:
            return f"Job {job_id} was not deleted."
        return delete(job_id)

    return handle


def zip_job_export(service: JobService, settings: AppSettings, job_id: str | None):
    """Zip the selected job's export folder for download."""
    if not job_id:
        return None, "Select a job first."
    try:
        target = export_zip_path(settings, job_id)
        path = runs.zip_export(service.run_dir(job_id), target.parent, target.stem)
    except (JobNotFound, FileNotFoundError) as error:
        logger.info("job %s: export zip failed: %s", job_id, error)
        return None, f"**Error:** {error}"
    return str(path), f"Zipped the export of job {job_id} ({Path(path).stat().st_size / 2**20:.1f} MiB)."


def follow_job(service: JobService, job_id: str | None, poll_seconds: float = 1.0):
    """Stream the job's status line until it reaches a final status (for API clients that wait on a job)."""
    if not job_id:
        yield "Select a job first."
        return
    while True:
        job = service.get(job_id)
        yield status_text(job)
        if job.status in FINAL:
            return
        time.sleep(poll_seconds)
