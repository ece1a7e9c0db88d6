"""Logging set-up: one `finetune` logger, to the console and to the run folder's log file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from accelerate.logging import get_logger as _accelerate_logger

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str):
    """Return a rank-aware logger: messages go out on the main process only unless `main_process_only=False`.

    Before the Accelerate state exists (config validation, CLI), it falls back to a plain logger.
    """
    from accelerate.state import PartialState

    if PartialState._shared_state:
        return _accelerate_logger(name)
    return logging.getLogger(name)


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Send `finetune` records to stderr, and to `log_file` when given (main process only)."""
    root = logging.getLogger("finetune")
    root.setLevel(level)
    root.propagate = False
    formatter = logging.Formatter(_FORMAT, datefmt="%H:%M:%S")
    if not any(getattr(handler, "_finetune_console", False) for handler in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        console._finetune_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                handler.close()
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
