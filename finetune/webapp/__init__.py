"""The web app: one Gradio `Blocks` with Train, Jobs, Try and Compare tabs over the job service.

`main(argv)` is `finetune app`; `build_app(settings, service)` returns the Blocks for tests and embedding.
"""

from __future__ import annotations

import os
import sys

from ..log import get_logger, setup_logging
from .settings import AppSettings, parse_settings

logger = get_logger(__name__)

__all__ = ["AppSettings", "build_app", "launch_app", "main", "parse_settings"]


def build_app(settings: AppSettings, service=None):
    """Build the app's `gr.Blocks`; `service` defaults to a `JobService` on `settings.workspace`."""
    import gradio as gr

    from .compare_tab import build_compare_tab
    from .jobs_tab import build_jobs_tab
    from .service import JobService
    from .train_tab import build_train_tab
    from .try_tab import build_try_tab

    service = service or JobService(settings)
    with gr.Blocks(title="finetune") as app:
        gr.Markdown(f"# finetune\nWorkspace `{settings.workspace}`")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                editor, form_inputs, validation = build_train_tab(settings, service)
            with gr.Tab("Jobs", id="jobs"):
                build_jobs_tab(settings, service, edit_target=(tabs, editor, form_inputs, validation))
            with gr.Tab("Try", id="try"):
                build_try_tab(settings, service)
            with gr.Tab("Compare", id="compare") as compare_tab:
                build_compare_tab(settings, service, compare_tab)
    app.finetune_service = service  # kept so callers can stop the scheduler
    return app


def launch_app(settings: AppSettings, prevent_thread_lock: bool = False):
    """Start the scheduler (unless disabled), build the app and serve it; return the launched Blocks."""
    from .service import JobService

    service = JobService(settings)
    if settings.run_scheduler:
        service.start_scheduler()
    app = build_app(settings, service)
    settings.download_dir.mkdir(parents=True, exist_ok=True)
    warn_missing_roots(settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.auth:
        logger.warning("the app listens on %s without a login; anyone who reaches the port can run jobs", settings.host)
    logger.info("serving the app on http://%s:%d (workspace %s)", settings.host, settings.port, settings.workspace)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=settings.host,
        server_port=settings.port,
        auth=settings.auth,
        max_file_size=settings.max_upload_bytes,
        allowed_paths=[str(settings.download_dir)],
        prevent_thread_lock=prevent_thread_lock,
        show_error=True,
        quiet=True,
        css=_CSS,
    )
    return app


def warn_missing_roots(settings: AppSettings) -> None:
    """Log a warning for each --data-root or --model-root that is not a folder.

    A mistyped root is not an error, because the folder may be created later. Until then, every typed path under
    it fails as not found, and a path in the intended folder is rejected as outside the roots.
    """
    for option, roots in (("--data-root", settings.data_roots), ("--model-root", settings.model_roots)):
        for root in roots:
            if not root.is_dir():
                logger.warning("%s %s is not a folder. Fix: check the path; no file can be read from it until it exists.", option, root)


_CSS = ".field-error, .field-error * { color: #b91c1c !important; }"


def main(argv: list[str] | None = None) -> int:
    """Run `finetune app [options]` until interrupted; return the exit code."""
    settings = parse_settings(argv)
    setup_logging()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        launch_app(settings)
    except OSError as error:
        # Gradio's message for a busy port names its own launch() parameters, not this command's options.
        logger.error(
            "could not start the app on %s:%d: %s Fix: pass --port with a free port, or stop the program that uses it.",
            settings.host, settings.port, error,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
