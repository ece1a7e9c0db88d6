"""Crash-safe checkpoints of a training run, written through Accelerate's `save_state`.

Layout of `<run_dir>/checkpoints/`:

- `checkpoint-<step>/`: one complete checkpoint, named by its optimizer step. It contains what
  `Accelerator.save_state` writes (`model.safetensors`, `optimizer.bin`, `scheduler.bin`, `scaler.pt` with
  fp16, one `random_states_<rank>.pkl` per process with the Python, NumPy, torch CPU and CUDA generators, and
  one `custom_checkpoint_<i>.pkl` per object registered with `accelerator.register_for_checkpointing`), plus
  `trainer_state.json` and the `COMPLETE` marker, written last.
- `.tmp-*`: work in progress. A checkpoint is written into `.tmp-checkpoint-<step>-<nonce>/` and renamed to
  `checkpoint-<step>` only after every file is fsynced and `COMPLETE` is written inside it, so a visible
  `checkpoint-<step>` is never incomplete. Deleted checkpoints are first renamed to `.tmp-delete-*`, so a
  process killed halfway through a deletion leaves no half-deleted checkpoint visible either.
- `abandoned-checkpoint-<step>-<nonce>/`: a checkpoint newer than the one a run resumed from, set aside
  (not deleted) because the resumed run replaces the steps it covered.

`COMPLETE` is a JSON manifest of every file in the checkpoint with its size in bytes. `is_complete` checks it,
so it also catches a file truncated after the fact.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import SafetensorError

from . import runlog
from .config import ConfigError, ConfigIssue, RunConfig
from .log import get_logger

COMPLETE_FILE = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"

# Fingerprint keys whose change does not make a checkpoint unusable: another world size re-shards the data
# and another autocast precision changes rounding, so the run continues, only not bit-identically.
RESUME_TOLERATED_KEYS = frozenset({"world_size", "mixed_precision"})

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_NAME = re.compile(r"^\.tmp-(checkpoint|replaced|delete)-(\d+)-[0-9a-f]+$")


def _logger():
    # Looked up at call time: the rank-aware adapter exists only once Accelerate's state is initialised.
    return get_logger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or used."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed; the message names the folder, and earlier checkpoints are untouched."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written by a run whose fingerprint differs from this one's."""


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoint folders


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """Return the optimizer step of a `checkpoint-<step>` folder name, or None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | os.PathLike) -> bool:
    """Check that `path` has a `COMPLETE` manifest and every file it lists exists with the listed size."""
    path = Path(path)
    marker = path / COMPLETE_FILE
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_complete(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Return the complete `checkpoint-<step>` folders under `checkpoints_dir`, oldest step first."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [child for child in folder.iterdir() if checkpoint_step(child) is not None and child.is_dir()]
    return sorted((child for child in found if is_complete(child)), key=checkpoint_step)


def read_checkpoint_record(path: str | os.PathLike) -> dict:
    """Return the whole `trainer_state.json` record: `step`, `is_best`, `fingerprint`, `saved_at`, `state`."""
    file = Path(path) / TRAINER_STATE_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {file}: {error}") from error


def build_fingerprint(config: RunConfig, label_names: list[str], world_size: int, mixed_precision: str) -> dict:
    """Return what a checkpoint must share with the run that resumes it, as JSON-compatible values.

    A different model, label set, adapter or layer grouping changes the parameters or the optimizer's
    parameter groups, so resuming would fail or silently train the wrong thing. `world_size` and
    `mixed_precision` are recorded too, but a change there only logs a warning (see RESUME_TOLERATED_KEYS).
    """
    model = config.model
    return {
        "task": config.task,
        "model": model.name_or_path,
        "revision": model.revision,
        "label_names": list(label_names),
        "lora": model.lora.model_dump(mode="json") if model.lora else None,
        "layer_groups": [group.model_dump(mode="json") for group in model.layer_groups or []],
        "schedule_preset": config.schedule.preset,
        "world_size": int(world_size),
        "mixed_precision": str(mixed_precision),
    }


def check_compatible(path: str | os.PathLike, fingerprint: dict) -> None:
    """Raise `IncompatibleCheckpointError` naming every fingerprint difference between a checkpoint and this run.

    Differences in RESUME_TOLERATED_KEYS are logged as warnings instead.
    """
    saved = read_checkpoint_record(path).get("fingerprint") or {}
    current = json.loads(json.dumps(fingerprint))  # tuples become lists, as in the saved JSON
    differences, tolerated = [], []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) == current.get(key):
            continue
        text = f"{key.replace('_', ' ')}: saved {_short(saved.get(key))}, config {_short(current.get(key))}"
        (tolerated if key in RESUME_TOLERATED_KEYS else differences).append(text)
    for text in tolerated:
        _logger().warning("Resuming from %s with a changed setting (%s); the run continues, not bit-identically.", path, text)
    if differences:
        raise IncompatibleCheckpointError(
            f"checkpoint {path} was written by an incompatible run: {'; '.join(differences)}. Fix: resume with the "
            "config that wrote it, point checkpoint.resume at another checkpoint, set checkpoint.resume: never, "
            "or use a new output.run_dir."
        )


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """Return the checkpoint that `checkpoint.resume` selects, or None to start from scratch.

    `auto` selects the newest complete checkpoint of `run_dir` (None when there is none), `never` selects
    nothing, and any other value is a path: a checkpoint folder, or a run folder whose newest checkpoint is used.
    A path that does not exist or contains no complete checkpoint raises `ConfigError`. Create the run's
    `CheckpointManager` first, because it recovers a checkpoint that a killed run finished but did not publish.
    """
    if resume == "never":
        return None
    if resume == "auto":
        complete = list_complete(Path(run_dir) / runlog.CHECKPOINTS_DIR)
        return complete[-1] if complete else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError([ConfigIssue("checkpoint.resume", resume, "folder not found.", "give an existing checkpoint folder, auto or never.")])
    if checkpoint_step(path) is None and (path / runlog.CHECKPOINTS_DIR).is_dir():
        complete = list_complete(path / runlog.CHECKPOINTS_DIR)
        if not complete:
            raise ConfigError(
                [ConfigIssue("checkpoint.resume", resume, "run folder has no complete checkpoint.", "use auto or never.")]
            )
        return complete[-1]
    if not is_complete(path):
        raise ConfigError(
            [
                ConfigIssue(
                    "checkpoint.resume", resume, f"is not a complete checkpoint (missing or invalid {COMPLETE_FILE} manifest).",
                    "give a checkpoint-<step> folder written by finetune, auto or never.",
                )
            ]
        )
    return path


# ---------------------------------------------------------------------------------------------------------------
# Writing


class CheckpointManager:
    """Write, list, prune and load the checkpoints of one run folder.

    Construct it and call `save` and `load` on every process: Accelerate writes one RNG file per process, and
    the processes meet at barriers. Only the main process publishes, prunes and writes the metadata.
    """

    def __init__(self, run_dir: str | os.PathLike, accelerator: Accelerator, save_total_limit: int):
        if isinstance(save_total_limit, bool) or not isinstance(save_total_limit, int) or save_total_limit < 1:
            raise ValueError(f"save_total_limit must be an integer >= 1, got {save_total_limit!r}")
        self.dir = Path(run_dir) / runlog.CHECKPOINTS_DIR
        self.accelerator = accelerator
        self.save_total_limit = save_total_limit
        error = None
        if accelerator.is_main_process:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._recover_temp_folders()
            except OSError as caught:
                error = caught
        self._raise_if_any_failed(error, f"cannot prepare checkpoint folder {self.dir}")

    # -- queries -------------------------------------------------------------------------------------------------

    def list_complete(self) -> list[Path]:
        """Return the complete checkpoints, oldest step first."""
        return list_complete(self.dir)

    def latest(self) -> Path | None:
        """Return the complete checkpoint with the highest step, or None."""
        complete = self.list_complete()
        return complete[-1] if complete else None

    def best(self) -> Path | None:
        """Return the newest complete checkpoint saved with `is_best=True`, or None.

        Each save marks whether the metric improved, so the newest such checkpoint has the best metric.
        """
        for path in reversed(self.list_complete()):
            if read_checkpoint_record(path).get("is_best"):
                return path
        return None

    # -- save ----------------------------------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict, is_best: bool, fingerprint: dict) -> Path:
        """Write `checkpoint-<step>` atomically and prune old checkpoints; return its path. Call on all processes.

        `trainer_state` and `fingerprint` must be JSON-serialisable; `is_best` marks that the metric improved at
        this step. A checkpoint already present at `step` is replaced, and keeps its best mark: the weights of
        one step are the same, so a second save at that step (say at the epoch end) must not unmark them. On a failed write (disk full, permission
        denied) every process raises `CheckpointWriteError` naming the folder; the temporary folder is removed
        and earlier checkpoints stay complete. The run should then stop rather than continue: it could no longer
        be resumed, and the export would likely fail the same way.
        """
        record = {
            "step": int(step),
            "is_best": bool(is_best),
            "saved_at": time.time(),
            "fingerprint": fingerprint,
            "state": trainer_state,
        }
        try:
            record_text = json.dumps(record, indent=2, allow_nan=True)
        except (TypeError, ValueError) as error:
            raise TypeError(f"trainer_state and fingerprint must be JSON-serialisable: {error}") from error

        nonce = self._shared_nonce()
        tmp = self.dir / f"{TMP_PREFIX}checkpoint-{step}-{nonce}"
        final = self.dir / f"{CHECKPOINT_PREFIX}{step}"
        error = None
        try:
            self.accelerator.save_state(str(tmp), safe_serialization=True)
        # torch.save reports a full disk as RuntimeError, safetensors as SafetensorError.
        except (OSError, RuntimeError, SafetensorError) as caught:
            error = caught
        # Every process has written its files (or failed) past this point; the exchange is the barrier.
        self._raise_if_any_failed(error, f"cannot write checkpoint {tmp}", cleanup=tmp)

        if self.accelerator.is_main_process:
            try:
                if not is_best and _marked_best(final):
                    record_text = json.dumps(dict(record, is_best=True), indent=2, allow_nan=True)
                (tmp / TRAINER_STATE_FILE).write_text(record_text, encoding="utf-8")
                _write_manifest(tmp)
                _publish(tmp, final, nonce)
            except OSError as caught:
                error = caught
        self._raise_if_any_failed(error, f"cannot complete checkpoint {final}", cleanup=tmp)

        if self.accelerator.is_main_process:
            self._prune()
        self.accelerator.wait_for_everyone()
        _logger().info("Saved checkpoint %s%s", final, " (best so far)" if is_best else "")
        return final

    def _shared_nonce(self) -> str:
        # All processes must write into the same temporary folder, so the main process picks the name.
        holder = [secrets.token_hex(4)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(holder, from_process=0)
        return holder[0]

    def _raise_if_any_failed(self, error: BaseException | None, context: str, cleanup: Path | None = None) -> None:
        """Share each process's error, so that all processes raise together instead of waiting at a barrier."""
        message = None if error is None else f"{type(error).__name__}: {error}"
        if self.accelerator.num_processes > 1:
            messages = gather_object([message])
        else:
            messages = [message]
        failures = [f"process {rank}: {text}" for rank, text in enumerate(messages) if text is not None]
        if not failures:
            return
        if cleanup is not None and self.accelerator.is_main_process:
            _remove_folder(cleanup)
        latest = self.latest()
        previous = f" The previous checkpoint {latest} is still complete." if latest else ""
        raise CheckpointWriteError(f"{context}: {'; '.join(failures)}.{previous} Free disk space or fix permissions on {self.dir}.") from error

    # -- retention and recovery (main process only) --------------------------------------------------------------

    def _prune(self) -> None:
        """Delete complete checkpoints beyond the newest `save_total_limit`, keeping the best one."""
        complete = self.list_complete()
        keep = set(complete[-self.save_total_limit :])
        best = self.best()
        if best is not None:
            keep.add(best)
        for path in complete:
            if path in keep:
                continue
            doomed = self.dir / f"{TMP_PREFIX}delete-{checkpoint_step(path)}-{secrets.token_hex(4)}"
            try:
                os.rename(path, doomed)
            except OSError as error:
                # The new checkpoint is complete, so a leftover old one only costs disk space.
                _logger().warning("Could not delete old checkpoint %s: %s", path, error)
                continue
            _remove_folder(doomed)
            _logger().info("Deleted old checkpoint %s", path)

    def _recover_temp_folders(self) -> None:
        """Publish complete checkpoints that a killed run wrote but did not rename, and delete all other `.tmp-*`.

        A `save` killed between writing `COMPLETE` and the rename leaves a complete `.tmp-checkpoint-*`. One
        killed while replacing a checkpoint of the same step can leave the old one as `.tmp-replaced-*`. Either
        is published when its step has no visible checkpoint, and new writes take precedence over replaced ones.
        """
        order = {"checkpoint": 0, "replaced": 1, "delete": 2}
        temps = [child for child in self.dir.iterdir() if child.name.startswith(TMP_PREFIX)]
        temps.sort(key=lambda child: (order.get(_temp_kind(child)[0], 3), child.name))
        for child in temps:
            kind, step = _temp_kind(child)
            final = self.dir / f"{CHECKPOINT_PREFIX}{step}"
            if kind in ("checkpoint", "replaced") and not final.exists() and is_complete(child):
                os.rename(child, final)
                _fsync_dir(self.dir)
                _logger().info("Recovered checkpoint %s left unpublished by an interrupted run", final)
                continue
            _remove_folder(child)
            _logger().info("Removed %s left by an interrupted run", child)
        for child in self.dir.iterdir():
            if checkpoint_step(child) is not None and not is_complete(child):
                _logger().warning("Ignoring incomplete checkpoint folder %s (no valid %s manifest)", child, COMPLETE_FILE)

    # -- load ----------------------------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike, set_aside_newer: bool = True) -> dict:
        """Restore the model, optimizer, scheduler, scaler, RNG and registered objects from `path`; return the
        `trainer_state` given to `save`. Call on all processes, after `accelerator.prepare` and registration.

        A resumed run replaces the steps after `path`, so by default this run's checkpoints with higher steps
        are renamed to `abandoned-checkpoint-*`. Pass `set_aside_newer=False` to only read a checkpoint.
        """
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (missing or invalid {COMPLETE_FILE} manifest)")
        record = read_checkpoint_record(path)
        self.accelerator.load_state(str(path))
        _logger().info("Resumed from checkpoint %s (step %s)", path, record.get("step"))
        if set_aside_newer and self.accelerator.is_main_process:
            self._set_aside_newer_than(path)
        self.accelerator.wait_for_everyone()
        return record["state"]

    def _set_aside_newer_than(self, path: Path) -> None:
        """Rename this run's checkpoints with a higher step than `path` to `abandoned-checkpoint-<step>-<nonce>`.

        Resuming from an older checkpoint abandons the steps after it. Left visible, those checkpoints would
        be picked by `latest()` after the next interruption and by `best()`. Renaming keeps their files.
        """
        step = checkpoint_step(path)
        if step is None or path.resolve().parent != self.dir.resolve():
            return
        for newer in self.list_complete():
            if checkpoint_step(newer) <= step:
                continue
            target = self.dir / f"abandoned-{newer.name}-{secrets.token_hex(4)}"
            try:
                os.rename(newer, target)
            except OSError as error:
                # Not raised: the other processes wait at the barrier, and the resume itself has succeeded.
                _logger().warning("Could not move %s aside (%s); remove it, or a later `resume: auto` may pick it.",
                                  newer, error)
                continue
            _logger().warning("Resuming from step %d abandons the later %s; moved it to %s", step, newer, target)


def _marked_best(path: Path) -> bool:
    if not is_complete(path):
        return False
    return bool(read_checkpoint_record(path).get("is_best"))


def _temp_kind(path: Path) -> tuple[str, int | None]:
    match = _TMP_NAME.match(path.name)
    return (match.group(1), int(match.group(2))) if match else ("unknown", None)


def _write_manifest(folder: Path) -> None:
    """fsync every file of `folder`, then write and fsync the `COMPLETE` manifest listing them."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync_file(file)
        files[file.relative_to(folder).as_posix()] = file.stat().st_size
    for sub in sorted(p for p in folder.rglob("*") if p.is_dir()):
        _fsync_dir(sub)
    marker = folder / COMPLETE_FILE
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(folder)


def _publish(tmp: Path, final: Path, nonce: str) -> None:
    """Rename the complete `tmp` to `final`; an existing `final` is moved aside first and deleted after."""
    replaced = None
    if final.exists():
        step = checkpoint_step(final)
        replaced = final.with_name(f"{TMP_PREFIX}replaced-{step}-{nonce}")
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if replaced is not None:
        _remove_folder(replaced)


def _remove_folder(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as error:
        # Leftovers under a .tmp- name are invisible to readers and removed at the next start.
        _logger().warning("Could not remove %s: %s", path, error)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes renames and new entries durable; POSIX only, so a no-op where directories cannot be opened.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
