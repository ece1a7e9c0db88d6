"""When a run stops before its last step: on a signal, on a stalled metric, or on a non-finite loss."""

from __future__ import annotations

import math
import signal
import threading
from types import FrameType
from typing import Any, Literal

from .log import get_logger


def _logger():
    # Looked up at call time: the rank-aware adapter exists only once Accelerate's state is initialised.
    return get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Stop on SIGTERM / SIGINT


class StopRequest:
    """A flag set by SIGTERM or SIGINT, so the loop can finish its optimizer step, checkpoint and exit 75.

    `install()` replaces the two handlers and `restore()` puts the previous ones back. The first signal sets
    `requested` and restores the previous handlers at once, so a second signal acts as it would without us:
    SIGTERM kills the process and Ctrl-C raises KeyboardInterrupt. Use it as a context manager, or call
    `install` and `restore` yourself.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        """Install the handlers; they can only be installed from the main thread of the main interpreter."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "StopRequest.install() must run in the main thread, because Python delivers signals only there; "
                "run training in the main thread or stop it through the job service."
            )
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were active before `install`; does nothing when none are installed."""
        for signum, handler in self._previous.items():
            # signal.signal returns None for handlers not installed from Python; the default is then correct.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self.restore()
        _logger().warning(
            "Received %s: finishing the current optimizer step, then writing a checkpoint and exiting. "
            "Send it again to stop at once without a checkpoint.", self.signal_name,
        )

    def requested_anywhere(self, accelerator: Any) -> bool:
        """Return whether any process received a stop signal; call it on all processes at the same step.

        A launcher may signal only some processes, and all of them must leave the loop at the same step.
        """
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


# ---------------------------------------------------------------------------------------------------------------
# Metric direction and early stopping


def metric_greater_is_better(name: str, override: bool | None = None) -> bool:
    """Return whether a higher value of metric `name` is better: `override` when given, else False for names
    containing "loss" (case-insensitive) and True for every other name."""
    if override is not None:
        return bool(override)
    return "loss" not in name.lower()


class EarlyStopping:
    """Tracks the best value of one evaluation metric and stops after `patience` evaluations without progress.

    `best_value` and `best_step` follow every strict improvement, because they pick the exported model. The
    patience counter resets only when a value beats the best so far by more than `threshold`, so slow creeping
    gains still run out of patience. A NaN value never improves. With `patience` None the run never stops early,
    but the best value is still tracked.
    """

    def __init__(self, metric: str, greater_is_better: bool, patience: int | None = None, threshold: float = 0.0):
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be an integer >= 1 or None, got {patience!r}")
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.patience = patience
        self.threshold = threshold
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.evaluations_without_improvement = 0

    def update(self, value: float, step: int) -> bool:
        """Record the metric `value` measured at optimizer `step`; return True when it is the best so far."""
        value = float(value)
        previous = self.best_value
        if math.isnan(value):
            self.evaluations_without_improvement += 1
            return False
        is_best = previous is None or self._better(value, previous, 0.0)
        significant = previous is None or self._better(value, previous, self.threshold)
        if is_best:
            self.best_value, self.best_step = value, int(step)
        if significant:
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        return is_best

    def _better(self, value: float, reference: float, margin: float) -> bool:
        if self.greater_is_better:
            return value > reference + margin
        return value < reference - margin

    @property
    def should_stop(self) -> bool:
        """Whether `patience` evaluations in a row brought no improvement larger than `threshold`."""
        return self.patience is not None and self.evaluations_without_improvement >= self.patience

    def state_dict(self) -> dict:
        """Return the JSON-serialisable state; the settings are included so a resume can detect a change."""
        return {
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
            "patience": self.patience,
            "threshold": self.threshold,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "evaluations_without_improvement": self.evaluations_without_improvement,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the progress saved by `state_dict`; the settings given to the constructor are kept.

        A resumed run may change patience or threshold on purpose, but the best value of another metric or
        direction means nothing here, so that raises ValueError.
        """
        for key in ("metric", "greater_is_better"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"early-stopping state was saved for {key} {state.get(key)!r}, but this run uses "
                    f"{getattr(self, key)!r}; resume with the same training.metric_for_best_model and greater_is_better."
                )
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.evaluations_without_improvement = int(state["evaluations_without_improvement"])


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite and `training.nan_policy` is `stop`."""

    def __init__(self, loss: float, step: int):
        self.loss = loss
        self.step = step
        super().__init__(
            f"training loss is {loss} at optimizer step {step}; the run stops and keeps its last checkpoint. "
            "Fix: lower training.learning_rate, set training.max_grad_norm, use mixed_precision bf16 instead of "
            "fp16, check the data, or set training.nan_policy: skip."
        )


def check_finite_loss(loss: float, step: int, policy: Literal["stop", "skip"]) -> bool:
    """Return True when `loss` is finite. Otherwise raise `NonFiniteLossError` (policy `stop`) or log a warning
    and return False so the caller skips the optimizer step (policy `skip`).

    In a multi-process run pass the loss reduced over all processes, so that every process decides alike.
    """
    if policy not in ("stop", "skip"):
        raise ValueError(f"nan_policy must be 'stop' or 'skip', got {policy!r}")
    loss = float(loss)
    if math.isfinite(loss):
        return True
    if policy == "stop":
        raise NonFiniteLossError(loss, step)
    _logger().warning("Training loss is %s at optimizer step %d; skipping this step (nan_policy: skip).", loss, step)
    return False
