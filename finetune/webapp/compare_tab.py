"""The Compare tab: a leaderboard of runs and the config difference of two runs with their curves overlaid."""

from __future__ import annotations

import gradio as gr

from .. import runlog
from ..jobs import JobNotFound
from ..log import get_logger
from . import plots, runs
from .service import JobService
from .settings import AppSettings

LEADERBOARD_HEADERS = ["id", "name", "status", "metric", "best", "backbone", "schedule", "precision", "minutes"]

logger = get_logger(__name__)


def build_compare_tab(settings: AppSettings, service: JobService, tab: gr.Tab | None = None) -> None:
    """Lay out the Compare tab inside the current `gr.Blocks` and wire its events; selecting `tab` refreshes it."""
    refresh_button = gr.Button("Refresh", elem_id="compare-refresh")
    board = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False, label="leaderboard (best first)",
                         elem_id="leaderboard")
    with gr.Row():
        run_a = gr.Dropdown([], label="run A", elem_id="compare-a", allow_custom_value=True)
        run_b = gr.Dropdown([], label="run B", elem_id="compare-b", allow_custom_value=True)
        compare_button = gr.Button("Compare", variant="primary", elem_id="compare-run")
    diff = gr.Dataframe(headers=["key", "run A", "run B"], interactive=False, label="config difference",
                        elem_id="config-diff")
    overlay = gr.Plot(label="curves overlaid", elem_id="compare-curves")

    def refresh():
        rows = leaderboard(service)
        choices = [(f"{row[0]} · {row[1]}", row[0]) for row in rows]
        return rows, gr.update(choices=choices), gr.update(choices=choices)

    refresh_button.click(refresh, None, [board, run_a, run_b], api_name="leaderboard")
    if tab is not None:
        tab.select(refresh, None, [board, run_a, run_b], api_visibility="private")
    compare_button.click(lambda a, b: compare_runs(service, a, b), [run_a, run_b], [diff, overlay], api_name="compare")


def leaderboard(service: JobService) -> list[list]:
    """Return one row per job, those with a metric first, best first within each metric."""
    rows = []
    for job in service.list_jobs():
        summary = runs.summarize_run(job.run_dir)
        best = summary["best"]
        rows.append([job.id, job.name, job.status, summary["metric"], None if best is None else round(best, 4),
                     summary["backbone"], summary["schedule"], summary["precision"], summary["minutes"]])

    def order(row):
        metric, best = row[3], row[4]
        if best is None:
            return (1, metric, 0.0)
        return (0, metric, best if "loss" in metric else -best)

    return sorted(rows, key=order)


def compare_runs(service: JobService, job_a: str | None, job_b: str | None):
    """Return the differing config keys of two runs and a figure with both runs' curves."""
    if not job_a or not job_b:
        return None, None
    try:
        dir_a, dir_b = service.run_dir(job_a), service.run_dir(job_b)
    except JobNotFound as error:
        logger.info("compare runs %s and %s failed: %s", job_a, job_b, error)
        raise gr.Error(str(error)) from None
    flat_a, flat_b = runs.flatten(runs.read_config(dir_a)), runs.flatten(runs.read_config(dir_b))
    keys = sorted(set(flat_a) | set(flat_b))
    rows = [[key, _text(flat_a.get(key)), _text(flat_b.get(key))] for key in keys if flat_a.get(key) != flat_b.get(key)]
    metric = runs.metric_name(runs.read_config(dir_a))
    events = {f"run {job_a}": runlog.read_events(dir_a), f"run {job_b}": runlog.read_events(dir_b)}
    return rows or [["(no difference)", "", ""]], plots.curves_figure(events, metric=metric)


def _text(value) -> str:
    return "" if value is None else str(value)
