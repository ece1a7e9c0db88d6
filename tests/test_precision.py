"""Mixed precision: what `auto` resolves to on this machine, explicit requests the hardware cannot run, a bf16 run.

The CPU cases assume no CUDA device, as on the CI machine; they are skipped where one is present.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from finetune import precision  # noqa: E402
from finetune.config import ConfigError  # noqa: E402
from finetune.precision import cpu_supports_bf16, resolve_mixed_precision  # noqa: E402
from tiny import events_of, run_recipe, tiny_config  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path; this machine has a CUDA device")


def cpuinfo_flags() -> set[str]:
    """Return the CPU feature flags of the first processor in /proc/cpuinfo, or none off Linux."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return set()
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return set()


HAS_BF16 = bool(cpuinfo_flags() & {"amx_bf16", "avx512_bf16"})
needs_bf16_cpu = pytest.mark.skipif(not HAS_BF16, reason="this CPU has neither AMX-BF16 nor AVX512-BF16")


def test_cpu_bf16_detection():
    assert cpu_supports_bf16() is HAS_BF16


@no_cuda
def test_auto_on_this_cpu():
    assert resolve_mixed_precision("auto") == ("bf16" if HAS_BF16 else "no")


@no_cuda
def test_auto_without_bf16_is_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert resolve_mixed_precision("auto") == "no"


@no_cuda
@needs_bf16_cpu
def test_bf16_accepted_on_this_cpu():
    assert resolve_mixed_precision("bf16") == "bf16"


@no_cuda
def test_bf16_rejected_without_support(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ConfigError) as error:
        resolve_mixed_precision("bf16")
    assert "training.mixed_precision" in str(error.value)
    assert "bf16 is not supported on this CPU" in str(error.value)


@no_cuda
def test_fp16_rejected_without_cuda():
    with pytest.raises(ConfigError) as error:
        resolve_mixed_precision("fp16")
    assert "fp16 autocast needs a CUDA GPU" in str(error.value)


def test_no_is_kept():
    assert resolve_mixed_precision("no") == "no"


def test_auto_with_use_cpu():
    # use_cpu decides by the CPU's flags even where a GPU is present.
    assert resolve_mixed_precision("auto", use_cpu=True) == ("bf16" if HAS_BF16 else "no")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_auto_on_gpu():
    assert resolve_mixed_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@needs_cuda
def test_fp16_accepted_on_gpu():
    assert resolve_mixed_precision("fp16") == "fp16"


@pytest.fixture
def one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine make tiny steps many times slower
    yield
    torch.set_num_threads(threads)


@no_cuda
def test_bf16_run_rejected_before_training(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    config = tiny_config(tmp_path, training={"mixed_precision": "bf16"})
    code, events = run_recipe(config)
    assert code == 2
    assert events == []  # rejected before the run folder or its event log are written


@no_cuda
@needs_bf16_cpu
def test_bf16_run_completes(tmp_path, one_thread):
    config = tiny_config(tmp_path, training={"mixed_precision": "bf16", "max_steps": 4})
    code, events = run_recipe(config)
    losses = [event["loss"] for event in events_of(events, "train")]
    assert code == 0
    assert events_of(events, "run_start")[0]["mixed_precision"] == "bf16"
    assert len(losses) == 4
    assert all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
