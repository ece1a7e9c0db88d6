"""Shared parts of the benchmarks that compare finetune's engine with a plain Accelerate loop and `Trainer`.

A benchmark script is both the driver and the worker. The driver calls `measure`, which starts the same script
again with `--worker NAME` and the measurement's options. The worker runs one system, prints one `RESULT {json}`
line through `run_worker` and exits. One process per measurement keeps each system's peak memory its own and
keeps one system's warm caches and allocator state out of the next system's timing.

Throughput is samples per second over the steps after `warmup`, counted from the end of the last warm-up step to
the end of the last step. Peak memory is the worker's peak RSS on CPU (its own process only: DataLoader worker
processes are not counted) or `torch.cuda.max_memory_allocated` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULT_PREFIX = "RESULT "
# The system every ratio is computed against: a ratio above 1 means the engine is faster.
REFERENCE_SYSTEM = "engine"


# ----------------------------------------------------------------------------------------------------------
# Measurements inside a worker


def peak_memory_mb() -> float:
    """Return this process's peak memory in MiB: max allocated CUDA memory on a GPU, else peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM is the peak RSS of this process's own address space. Linux carries ru_maxrss over fork and exec, so
    # there a worker started by a larger driver would report the driver's peak instead of its own.
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit / 1024


def throughput(step_ends: list[float], warmup: int, batch_size: int) -> float:
    """Return samples per second between the end of step `warmup` and the end of the last step.

    `step_ends` contains `time.perf_counter()` at the end of each step. Raises `RuntimeError` when fewer than two
    steps remain after the warm-up, because one step gives no interval.
    """
    measured = step_ends[warmup:]
    if len(measured) < 2:
        raise RuntimeError(
            f"{len(step_ends)} steps with {warmup} warm-up steps leave too few to measure; raise --steps"
        )
    return (len(measured) - 1) * batch_size / (measured[-1] - measured[0])


def time_engine_steps(raw_config: dict) -> list[float]:
    """Run finetune's recipe on `raw_config` and return the `perf_counter` time at the end of each optimizer step.

    Only setup, training and cleanup run: the config should turn off evaluation and checkpoints, and the final
    evaluation and export (`FineTuneRecipe.finish`) are left out.
    """
    from finetune.config import validate_config
    from finetune.train import FineTuneRecipe

    step_ends: list[float] = []

    class TimedRecipe(FineTuneRecipe):
        def _finish_step(self, step_loss):
            status = super()._finish_step(step_loss)
            step_ends.append(time.perf_counter())
            return status

    recipe = TimedRecipe(validate_config(raw_config))
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return step_ends


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_worker(workers: dict[str, Callable[[argparse.Namespace], dict]], args: argparse.Namespace) -> None:
    """Run the worker `args.worker`, add its peak memory and print the result as one `RESULT {json}` line."""
    result = workers[args.worker](args)
    result["peak_memory_mb"] = peak_memory_mb()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Driver


def measure(script: str | os.PathLike, worker: str, options: dict[str, object]) -> dict:
    """Run `script --worker WORKER --KEY VALUE ...` in a new process and return the dict its worker printed.

    Option names are written with dashes (`run_dir` becomes `--run-dir`). Raises `RuntimeError` with the end
    of the worker's stderr when it prints no result.
    """
    command = [sys.executable, str(script), "--worker", worker]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(
        f"worker {worker} with {options} failed (exit code {completed.returncode}):\n{completed.stderr[-3000:]}"
    )


def measure_repeats(script: str | os.PathLike, worker: str, options: dict[str, object], repeats: int,
                    run_dir: Path) -> dict:
    """Measure `worker` `repeats` times and return the median per key.

    Each run gets a fresh process and its own run folder, `run_dir` with `-0`, `-1`, ... appended.
    """
    runs = [measure(script, worker, {**options, "run_dir": f"{run_dir}-{index}"}) for index in range(repeats)]
    return median_of(runs)


def measure_interleaved(script: str | os.PathLike, workers: list[str], options: dict[str, object], repeats: int,
                        run_dir: Path) -> dict[str, dict]:
    """Measure each worker `repeats` times in rounds (A B C, A B C, ...) and return the median per worker and key.

    Rounds spread a slow change in machine load over every system, where `measure_repeats` for one system
    after another would give it all to whichever system runs last. Each median dict also contains `runs`, the
    samples per second of every run in order, so the spread is visible.
    """
    runs: dict[str, list[dict]] = {worker: [] for worker in workers}
    for index in range(repeats):
        for worker in workers:
            result = measure(script, worker, {**options, "run_dir": f"{run_dir}-{worker}-{index}"})
            runs[worker].append(result)
            log_progress(f"  round {index + 1}/{repeats} {worker}: {result}")
    medians = {}
    for worker, results in runs.items():
        medians[worker] = median_of(results)
        medians[worker]["runs"] = [result["samples_per_second"] for result in results]
    return medians


def median_of(results: list[dict]) -> dict:
    """Return the median of each key over `results` (dicts with the same numeric keys)."""
    return {key: statistics.median(result[key] for result in results) for key in results[0]}


def log_progress(message: str) -> None:
    """Write one progress line to stderr, so that stdout contains only the Markdown table."""
    print(message, file=sys.stderr, flush=True)


def machine_description() -> dict:
    """Describe the CPU, GPU and library versions that produced the numbers."""
    import torch

    from finetune.precision import cpu_supports_bf16

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def ratio_table(cases: dict[str, dict[str, dict]]) -> list[str]:
    """Return Markdown table lines with samples/s, peak memory and engine ÷ system for each case and system.

    `cases` maps a case name to `{system: {"samples_per_second": ..., "peak_memory_mb": ...}}` and each case
    must include the engine.
    """
    lines = ["| case | system | samples/s | peak memory (MiB) | engine ÷ system |", "|---|---|---|---|---|"]
    for case, rows in cases.items():
        engine = rows[REFERENCE_SYSTEM]["samples_per_second"]
        for system, values in rows.items():
            ratio = engine / values["samples_per_second"]
            lines.append(f"| {case} | {system} | {values['samples_per_second']:.1f} | "
                         f"{values['peak_memory_mb']:.0f} | {ratio:.2f}x |")
    return lines


def add_timing_arguments(parser: argparse.ArgumentParser, workers: list[str], steps: int, warmup: int, repeats: int,
                         output: str) -> None:
    """Add `--steps`, `--warmup`, `--repeats`, `--output` and the hidden `--worker` and `--run-dir` options."""
    parser.add_argument("--steps", type=int, default=steps, help=f"Optimizer steps per measurement (default {steps}).")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"Steps left out of the timing (default {warmup}).")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"Runs per system; the median is reported (default {repeats}).")
    parser.add_argument("--output", default=output, help=f"JSON file for the full results (default {output}).")
    parser.add_argument("--worker", choices=sorted(workers), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)


def write_report(report: dict, output: str | os.PathLike) -> None:
    Path(output).write_text(json.dumps(report, indent=2), encoding="utf-8")
