"""Choosing the autocast precision: `auto` resolves to what the hardware runs fast; bf16 where unsupported fails."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError, ConfigIssue

# CPU flags (Linux /proc/cpuinfo) that mean native bf16 matrix instructions: AMX tiles or AVX512-BF16.
_BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}


def cpu_supports_bf16() -> bool:
    """Return whether this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16), per /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return False
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return bool(_BF16_CPU_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def resolve_mixed_precision(requested: str, use_cpu: bool | None = None) -> str:
    """Turn `training.mixed_precision` into what Accelerate takes ('no', 'fp16' or 'bf16').

    auto: bf16 on GPUs that support it and on CPUs with AMX or AVX512-BF16; fp16 on older GPUs; else 'no'.
    An explicit request the hardware cannot honour raises `ConfigError` before training, never a silent fall-back.
    """
    on_gpu = torch.cuda.is_available() and not use_cpu
    if requested == "auto":
        if on_gpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "no"
    if requested == "bf16" and not (torch.cuda.is_bf16_supported() if on_gpu else cpu_supports_bf16()):
        where = "this GPU" if on_gpu else "this CPU (no AMX-BF16 or AVX512-BF16)"
        raise ConfigError(
            [ConfigIssue("training.mixed_precision", "bf16", f"bf16 is not supported on {where}.", "use 'auto', 'fp16' on a GPU, or 'no'.")]
        )
    if requested == "fp16" and not on_gpu:
        raise ConfigError(
            [ConfigIssue("training.mixed_precision", "fp16", "fp16 autocast needs a CUDA GPU.", "use 'auto', 'bf16' or 'no' on a CPU.")]
        )
    return requested
