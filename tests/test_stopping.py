"""Stop conditions: the signal flag, metric direction, early stopping and the non-finite loss policy."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from finetune.stopping import (
    EarlyStopping,
    NonFiniteLossError,
    StopRequest,
    check_finite_loss,
    metric_greater_is_better,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Metric direction


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("loss", False),
        ("eval_loss", False),
        ("train_LOSS", False),
        ("accuracy", True),
        ("f1_macro", True),
        ("precision_macro", True),
    ],
)
def test_direction_inferred(name, expected):
    assert metric_greater_is_better(name) is expected


def test_direction_override_wins():
    assert metric_greater_is_better("loss", True) is True
    assert metric_greater_is_better("accuracy", False) is False


# ---------------------------------------------------------------------------------------------------------------
# Early stopping


def feed(stopper: EarlyStopping, values: list[float]) -> list[tuple[bool, bool]]:
    """Return (is_best, should_stop) after each value; steps are 10, 20, 30, ..."""
    return [(stopper.update(value, 10 * (index + 1)), stopper.should_stop) for index, value in enumerate(values)]


def test_early_stopping_on_loss():
    stopper = EarlyStopping("loss", greater_is_better=False, patience=2)
    outcome = feed(stopper, [0.9, 0.7, 0.8, 0.6, 0.65, 0.7])
    assert outcome == [(True, False), (True, False), (False, False), (True, False), (False, False), (False, True)]
    assert stopper.best_value == 0.6
    assert stopper.best_step == 40


def test_early_stopping_on_accuracy():
    stopper = EarlyStopping("accuracy", greater_is_better=True, patience=3)
    outcome = feed(stopper, [0.5, 0.6, 0.6, 0.55, 0.6])
    assert outcome == [(True, False), (True, False), (False, False), (False, False), (False, True)]
    assert stopper.best_value == 0.6
    assert stopper.best_step == 20


def test_early_stopping_threshold():
    # Gains of 0.005 are new bests (the exported model follows them) but do not reset the patience count.
    stopper = EarlyStopping("accuracy", greater_is_better=True, patience=2, threshold=0.01)
    outcome = feed(stopper, [0.5, 0.505, 0.51])
    assert outcome == [(True, False), (True, False), (True, True)]
    assert stopper.best_value == 0.51


def test_early_stopping_threshold_reset():
    stopper = EarlyStopping("loss", greater_is_better=False, patience=2, threshold=0.05)
    outcome = feed(stopper, [1.0, 0.97, 0.9, 0.89])
    assert outcome == [(True, False), (True, False), (True, False), (True, False)]
    assert stopper.evaluations_without_improvement == 1


def test_early_stopping_nan_counts():
    stopper = EarlyStopping("loss", greater_is_better=False, patience=1)
    assert stopper.update(0.5, 1) is True
    assert stopper.update(math.nan, 2) is False
    assert stopper.should_stop
    assert stopper.best_value == 0.5


def test_early_stopping_without_patience():
    stopper = EarlyStopping("loss", greater_is_better=False, patience=None)
    feed(stopper, [0.5, 0.6, 0.7, 0.8, 0.9])
    assert not stopper.should_stop
    assert stopper.best_step == 10


def test_early_stopping_state_roundtrip():
    stopper = EarlyStopping("f1_macro", greater_is_better=True, patience=3)
    feed(stopper, [0.4, 0.5, 0.45])
    state = json.loads(json.dumps(stopper.state_dict()))
    restored = EarlyStopping("f1_macro", greater_is_better=True, patience=3)
    restored.load_state_dict(state)
    assert restored.state_dict() == stopper.state_dict()
    assert feed(restored, [0.44, 0.43]) == [(False, False), (False, True)]


def test_early_stopping_state_other_metric():
    state = EarlyStopping("loss", greater_is_better=False, patience=2).state_dict()
    with pytest.raises(ValueError, match="saved for metric 'loss', but this run uses 'accuracy'"):
        EarlyStopping("accuracy", greater_is_better=True, patience=2).load_state_dict(state)


@pytest.mark.parametrize("patience", [0, -1, True, 1.5])
def test_early_stopping_rejects_patience(patience):
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        EarlyStopping("loss", greater_is_better=False, patience=patience)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss


def test_finite_loss_passes():
    assert check_finite_loss(0.25, step=3, policy="stop") is True


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_stops(loss):
    with pytest.raises(NonFiniteLossError, match=f"training loss is {loss} at optimizer step 17;") as caught:
        check_finite_loss(loss, step=17, policy="stop")
    assert caught.value.step == 17


def test_nonfinite_loss_skips():
    assert check_finite_loss(math.nan, step=17, policy="skip") is False


def test_nan_policy_invalid():
    with pytest.raises(ValueError, match="nan_policy must be 'stop' or 'skip', got 'ignore'"):
        check_finite_loss(1.0, step=1, policy="ignore")


# ---------------------------------------------------------------------------------------------------------------
# Stop signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_flag(signum):
    previous = signal.getsignal(signum)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        assert stop.requested
        assert stop.signal_name == signal.Signals(signum).name
        # The first signal already put back the previous handler, so a second one acts as before.
        assert signal.getsignal(signum) is previous
    assert signal.getsignal(signum) is previous


def test_restore_without_signal():
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install()
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not stop.requested


def test_install_off_main_thread():
    errors = []

    def install() -> None:
        try:
            StopRequest().install()
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "must run in the main thread" in errors[0]


# Sends itself SIGTERM argv[1] times: after one it exits 75 on its own, a second one kills it.
SIGNALLED_LOOP = textwrap.dedent(
    """
    import os, signal, sys, time
    from finetune.stopping import StopRequest

    stop = StopRequest().install()
    print("ready", flush=True)
    signal_count = int(sys.argv[1])
    for _ in range(signal_count):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
    if stop.requested:
        print("stopping after", stop.signal_name, flush=True)
        sys.exit(75)
    """
)


@pytest.mark.parametrize(("signal_count", "expected_code"), [(1, 75), (2, -signal.SIGTERM)])
def test_second_signal_forces_exit(signal_count, expected_code):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", SIGNALLED_LOOP, str(signal_count)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == expected_code, result.stderr
