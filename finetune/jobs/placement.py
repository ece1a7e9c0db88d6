"""Device placement and the `accelerate launch` command line of a job.

A job requests `requested_gpus` (None: as many as it has processes when the host has GPUs, else CPU; 0: CPU;
N: N GPUs) and `num_processes`. GPUs are handed out whole: one GPU never serves two jobs at once. CPU jobs
share the host, so at most `max_cpu_jobs` of them run at once.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .store import JOB_CONFIG_FILE

GPU_COUNT_ENV = "FINETUNE_GPU_COUNT"
ACCELERATE_CONFIGS_ENV = "FINETUNE_ACCELERATE_CONFIGS"
CPU = "cpu"


def detect_gpus(gpu_count: int | None = None) -> list[str]:
    """Return the GPU ids jobs may use, as `CUDA_VISIBLE_DEVICES` understands them.

    `gpu_count`, else the `FINETUNE_GPU_COUNT` environment variable, overrides detection (tests fake a GPU
    host with it). When the scheduler itself runs with `CUDA_VISIBLE_DEVICES` set, jobs get ids from that list,
    so a container or a user can fence the scheduler to some GPUs.
    """
    if gpu_count is None and os.environ.get(GPU_COUNT_ENV, "").strip():
        text = os.environ[GPU_COUNT_ENV].strip()
        if not text.isdigit():
            raise ValueError(f"{GPU_COUNT_ENV}={text!r} is invalid; set it to a whole number of GPUs, e.g. 0 or 2.")
        gpu_count = int(text)
    if gpu_count is None:
        import torch  # Deferred: the CLI's other commands need no torch. device_count() uses NVML, no CUDA context.

        gpu_count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        ids = [item.strip() for item in visible.split(",") if item.strip()]
        return ids[:gpu_count]
    return [str(index) for index in range(gpu_count)]


@dataclass(frozen=True)
class Placement:
    """The devices of a placed job: `["cpu"]`, or the GPU ids it owns while it runs, and its process count."""

    devices: tuple[str, ...]
    num_processes: int

    @property
    def on_cpu(self) -> bool:
        return self.devices == (CPU,)


class PlacementError(ValueError):
    """Raised when a job can never be placed on this host (e.g. it requests more GPUs than exist)."""


def gpus_needed(requested_gpus: int | None, num_processes: int, host_gpus: int) -> int:
    """Return how many GPUs a job takes on a host with `host_gpus` GPUs (0 means a CPU job)."""
    if requested_gpus is None:
        return num_processes if host_gpus > 0 else 0
    return requested_gpus


def place(
    requested_gpus: int | None, num_processes: int, gpus: list[str], busy_gpus: set[str], cpu_jobs_running: int,
    max_cpu_jobs: int,
) -> Placement | None:
    """Return the placement of a job, or None when it must wait for running jobs to free their devices.

    Raises `PlacementError` when the job can never run on this host.
    """
    needed = gpus_needed(requested_gpus, num_processes, len(gpus))
    if needed == 0:
        if cpu_jobs_running >= max_cpu_jobs:
            return None
        return Placement((CPU,), num_processes)
    if needed > len(gpus):
        raise PlacementError(
            f"the job requests {needed} GPU(s) but this host has {len(gpus)}; clone it with fewer GPUs "
            "(`finetune jobs clone ID --gpus N`), or with --gpus 0 to run on the CPU."
        )
    free = [gpu for gpu in gpus if gpu not in busy_gpus]
    if len(free) < needed:
        return None
    return Placement(tuple(free[:needed]), num_processes)


def accelerate_configs_dir() -> Path:
    """Return the folder of named accelerate configs: `$FINETUNE_ACCELERATE_CONFIGS`, else `configs/accelerate`."""
    override = os.environ.get(ACCELERATE_CONFIGS_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def available_accelerate_configs() -> list[str]:
    folder = accelerate_configs_dir()
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_accelerate_config(name: str) -> Path:
    """Return the file of a named accelerate config (`fsdp`) or of a path to one; raise ValueError if missing."""
    candidate = Path(name).expanduser()
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate.resolve()
    named = accelerate_configs_dir() / f"{name}.yaml"
    if named.is_file():
        return named
    known = ", ".join(available_accelerate_configs()) or "none found"
    raise ValueError(
        f"accelerate config {name!r} not found in {accelerate_configs_dir()}; use one of: {known}, or a path to a YAML file."
    )


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now, for torch.distributed's rendezvous.

    Each multi-process job needs its own port; two jobs on accelerate's default 29500 would collide.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_flags(placement: Placement, accelerate_config: str | None, port: int | None = None) -> list[str]:
    """Return the `accelerate launch` options that place a job; the devices themselves go in the environment.

    A named accelerate config sets the distributed type (DDP, FSDP, DeepSpeed), and `--num_processes` on the
    command line overrides the count written in it. Without one: `--cpu` for one CPU process, `--multi_gpu`
    for several processes (a gloo group on the CPU, see `device_environment`), nothing extra for one GPU.
    """
    flags = ["--num_processes", str(placement.num_processes), "--num_machines", "1", "--dynamo_backend", "no"]
    # Without --quiet, accelerate 1.16 ends every non-zero exit (75 for a clean stop, 2 for a data error) with
    # its own traceback and a second copy of the training's stderr, which buries the real message in the log.
    flags.append("--quiet")
    if accelerate_config:
        flags = ["--config_file", str(resolve_accelerate_config(accelerate_config)), *flags]
    elif placement.num_processes > 1:
        flags = ["--multi_gpu", *flags]
    elif placement.on_cpu:
        flags = ["--cpu", *flags]
    if not placement.on_cpu or placement.num_processes > 1:
        # A gpu_ids list in a config file would replace the CUDA_VISIBLE_DEVICES that placed the job.
        flags += ["--gpu_ids", "all"]
    if placement.num_processes > 1:
        flags += ["--main_process_port", str(port if port is not None else free_port())]
    return flags


def train_command(
    run_dir: Path, placement: Placement, accelerate_config: str | None, overrides: list[str],
    train_module: str = "finetune.train", port: int | None = None,
) -> list[str]:
    """Return the argument list of one attempt: accelerate launch running `train_module` on the job config."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", *launch_flags(placement, accelerate_config, port),
        "-m", train_module, "--config", str(run_dir / JOB_CONFIG_FILE), f"output.run_dir={run_dir}", *overrides,
    ]


def device_environment(placement: Placement) -> dict[str, str]:
    """Return the environment entries that fence a job to its devices."""
    if placement.on_cpu:
        # No GPU for a CPU job, since another job may own it. ACCELERATE_USE_CPU makes `--multi_gpu` workers
        # form a gloo group on the CPU; without it each worker of accelerate 1.16 runs alone (world size 1).
        return {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    return {"CUDA_VISIBLE_DEVICES": ",".join(placement.devices)}
