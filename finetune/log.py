"""Logging set-up: one `finetune` logger, to the console and to the run folder's log file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RankAwareLogger(logging.LoggerAdapter):
    """Logger adapter that logs on the main process only, once the Accelerate state is initialised.

    Pass `main_process_only=False` to log on every process. Before that state exists (config checks, the CLI),
    every call logs."""

    def log(self, level, msg, *args, main_process_only: bool = True, **kwargs):
        from accelerate.state import PartialState

        if main_process_only and PartialState._shared_state and not PartialState().is_main_process:
            return
        if self.isEnabledFor(level):
            self.logger.log(level, msg, *args, **kwargs)


class _ProgressAwareHandler(logging.StreamHandler):
    """Console handler that writes through `tqdm.write`, so a record starts its own line while a tqdm bar is drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report the failure and keep running
            self.handleError(record)


def get_logger(name: str) -> RankAwareLogger:
    """Return the rank-aware logger `name`. A module run with `python -m` logs under its module name."""
    if name == "__main__":
        # `python -m finetune.train` (and `accelerate launch -m`) name the module __main__, but its spec keeps the
        # real name. A plain script has no spec and logs as finetune.__main__, inside the package's handlers.
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None and spec.name.startswith("finetune.") else "finetune.__main__"
    return RankAwareLogger(logging.getLogger(name), {})


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Send `finetune` records to stderr, and to `log_file` when given (main process only)."""
    root = logging.getLogger("finetune")
    root.setLevel(level)
    root.propagate = False
    formatter = logging.Formatter(_FORMAT, datefmt="%H:%M:%S")
    if not any(getattr(handler, "_finetune_console", False) for handler in root.handlers):
        console = _ProgressAwareHandler(sys.stderr)
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
