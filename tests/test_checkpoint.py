"""Checkpoint manager: atomic saves, retention, recovery, compatibility and resume resolution.

The tests use a real `Accelerator` on CPU and a small torch model; the crash tests kill real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from finetune.checkpoint import (
    COMPLETE_FILE,
    CheckpointError,
    CheckpointManager,
    IncompatibleCheckpointError,
    check_compatible,
    is_complete,
    list_complete,
    read_checkpoint_record,
    resolve_resume,
)
from finetune.config import ConfigError
from forking import engine_forkserver, free_port

REPO = Path(__file__).resolve().parents[1]
FINGERPRINT = {"task": "text-classification", "model": "tiny-bert", "label_names": ["neg", "pos"], "world_size": 1}


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_training(accelerator: Accelerator, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return accelerator.prepare(model, optimizer, scheduler)


def train_step(accelerator, model, optimizer, scheduler) -> None:
    loss = model(torch.randn(5, 4)).pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def steps_of(paths) -> list[int]:
    return [int(path.name.split("-")[1]) for path in paths]


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def test_save_layout(tmp_path, accelerator):
    model, optimizer, scheduler = make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    path = manager.save(7, {"global_step": 7}, is_best=False, fingerprint=FINGERPRINT)
    assert path == tmp_path / "checkpoints" / "checkpoint-7"
    names = {child.name for child in path.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= names
    assert {"trainer_state.json", COMPLETE_FILE} <= names
    assert is_complete(path)
    assert [child.name for child in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-7"]
    record = read_checkpoint_record(path)
    assert record["step"] == 7
    assert record["fingerprint"] == FINGERPRINT
    assert record["state"] == {"global_step": 7}


def test_load_restores_state(tmp_path, accelerator):
    model, optimizer, scheduler = make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    train_step(accelerator, model, optimizer, scheduler)
    saved_weights = weights(model)
    saved_lr = scheduler.get_last_lr()
    path = manager.save(1, {"global_step": 1, "epoch": 0}, is_best=True, fingerprint=FINGERPRINT)
    expected_draw = torch.rand(3)
    for _ in range(3):
        train_step(accelerator, model, optimizer, scheduler)

    state = manager.load(path)

    assert state == {"global_step": 1, "epoch": 0}
    for name, tensor in weights(model).items():
        assert torch.equal(tensor, saved_weights[name]), name
    assert scheduler.get_last_lr() == saved_lr
    assert optimizer.state_dict()["state"][0]["step"].item() == 1
    assert torch.equal(torch.rand(3), expected_draw)


def test_load_sets_aside_newer(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=5)
    older = manager.save(1, {"step": 1}, is_best=False, fingerprint=FINGERPRINT)
    manager.save(2, {"step": 2}, is_best=True, fingerprint=FINGERPRINT)
    manager.save(3, {"step": 3}, is_best=False, fingerprint=FINGERPRINT)

    manager.load(older, set_aside_newer=False)
    assert len(manager.list_complete()) == 3

    manager.load(older)

    assert manager.list_complete() == [older]
    assert manager.best() is None
    abandoned = sorted(child.name.rsplit("-", 1)[0] for child in manager.dir.glob("abandoned-*"))
    assert abandoned == ["abandoned-checkpoint-2", "abandoned-checkpoint-3"]


def test_load_rejects_incomplete(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    path = manager.save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    (path / COMPLETE_FILE).unlink()
    with pytest.raises(CheckpointError, match="checkpoint-1 is not a complete checkpoint"):
        manager.load(path)


def test_save_rejects_non_json_state(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        manager.save(1, {"tensor": torch.zeros(1)}, is_best=False, fingerprint=FINGERPRINT)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_truncated_file_is_incomplete(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    first = manager.save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    second = manager.save(2, {}, is_best=False, fingerprint=FINGERPRINT)
    with open(second / "optimizer.bin", "r+b") as handle:
        handle.truncate(10)
    assert not is_complete(second)
    assert manager.latest() == first


def test_resave_same_step_replaces(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    manager.save(4, {"evaluated": False}, is_best=False, fingerprint=FINGERPRINT)
    path = manager.save(4, {"evaluated": True}, is_best=True, fingerprint=FINGERPRINT)
    assert read_checkpoint_record(path)["state"] == {"evaluated": True}
    assert manager.best() == path
    assert [child.name for child in manager.dir.iterdir()] == ["checkpoint-4"]


def test_resave_keeps_best_mark(tmp_path, accelerator):
    # The loop saves a step twice when an evaluation step is also an epoch end: first as best, then plainly.
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    manager.save(3, {}, is_best=True, fingerprint=FINGERPRINT)
    path = manager.save(4, {}, is_best=True, fingerprint=FINGERPRINT)
    manager.save(4, {"epoch_end": True}, is_best=False, fingerprint=FINGERPRINT)
    assert manager.best() == path
    assert read_checkpoint_record(path)["is_best"] is True
    assert read_checkpoint_record(path)["state"] == {"epoch_end": True}


# ---------------------------------------------------------------------------------------------------------------
# Retention


def test_retention_keeps_last_and_best(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    for step in range(1, 6):
        manager.save(step, {}, is_best=step == 2, fingerprint=FINGERPRINT)
    assert steps_of(manager.list_complete()) == [2, 4, 5]
    assert steps_of([manager.best()]) == [2]
    assert steps_of([manager.latest()]) == [5]


def test_retention_drops_superseded_best(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=1)
    for step, is_best in [(1, True), (2, False), (3, True), (4, False), (5, False)]:
        manager.save(step, {}, is_best=is_best, fingerprint=FINGERPRINT)
    assert steps_of(manager.list_complete()) == [3, 5]
    assert steps_of([manager.best()]) == [3]
    assert not any(child.name.startswith(".tmp-") for child in manager.dir.iterdir())


def test_best_none_without_improvement(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=3)
    manager.save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    assert manager.best() is None


# ---------------------------------------------------------------------------------------------------------------
# Recovery of folders left by a killed run


def _clone_as(source: Path, name: str) -> Path:
    target = source.parent / name
    shutil.copytree(source, target)
    return target


def test_recovery_removes_partial_temp(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=3)
    good = manager.save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    partial = _clone_as(good, ".tmp-checkpoint-2-0a1b2c3d")
    (partial / COMPLETE_FILE).unlink()
    doomed = _clone_as(good, ".tmp-delete-1-deadbeef")

    CheckpointManager(tmp_path, accelerator, save_total_limit=3)

    assert not partial.exists()
    assert not doomed.exists()
    assert steps_of(list_complete(manager.dir)) == [1]


def test_recovery_publishes_complete_temp(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=3)
    good = manager.save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    # A save killed after COMPLETE was written but before the rename.
    _clone_as(good, ".tmp-checkpoint-2-0a1b2c3d")
    # A replacement of checkpoint-3 killed between moving the old one aside and renaming the new one.
    os.rename(_clone_as(good, "checkpoint-3"), manager.dir / ".tmp-replaced-3-0a1b2c3d")

    CheckpointManager(tmp_path, accelerator, save_total_limit=3)

    assert steps_of(list_complete(manager.dir)) == [1, 2, 3]
    assert sorted(child.name for child in manager.dir.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_recovery_prefers_visible_checkpoint(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=3)
    good = manager.save(1, {"kept": True}, is_best=False, fingerprint=FINGERPRINT)
    stale = _clone_as(good, ".tmp-replaced-1-0a1b2c3d")
    (stale / "trainer_state.json").write_text("{}", encoding="utf-8")

    CheckpointManager(tmp_path, accelerator, save_total_limit=3)

    assert not stale.exists()
    assert read_checkpoint_record(good)["state"] == {"kept": True}


# ---------------------------------------------------------------------------------------------------------------
# Compatibility and resume resolution


def test_compatible_accepts_same(tmp_path, accelerator):
    make_training(accelerator)
    path = CheckpointManager(tmp_path, accelerator, 2).save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    check_compatible(path, dict(FINGERPRINT, label_names=("neg", "pos")))


def test_compatible_tolerates_world_size(tmp_path, accelerator):
    make_training(accelerator)
    path = CheckpointManager(tmp_path, accelerator, 2).save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    check_compatible(path, dict(FINGERPRINT, world_size=2))


def test_compatible_names_every_difference(tmp_path, accelerator):
    make_training(accelerator)
    path = CheckpointManager(tmp_path, accelerator, 2).save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    other = dict(FINGERPRINT, model="other-bert", label_names=["neg", "neutral", "pos"])
    with pytest.raises(IncompatibleCheckpointError) as caught:
        check_compatible(path, other)
    message = str(caught.value)
    assert str(path) in message
    assert 'model: saved "tiny-bert", config "other-bert"' in message
    assert 'label names: saved ["neg", "pos"], config ["neg", "neutral", "pos"]' in message
    assert "task" not in message
    assert "checkpoint.resume: never" in message


def test_resume_never(tmp_path, accelerator):
    make_training(accelerator)
    CheckpointManager(tmp_path, accelerator, 2).save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    assert resolve_resume("never", tmp_path) is None


def test_resume_auto(tmp_path, accelerator):
    make_training(accelerator)
    assert resolve_resume("auto", tmp_path) is None
    manager = CheckpointManager(tmp_path, accelerator, 3)
    manager.save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    latest = manager.save(2, {}, is_best=False, fingerprint=FINGERPRINT)
    incomplete = _clone_as(latest, "checkpoint-3")
    (incomplete / COMPLETE_FILE).unlink()
    assert resolve_resume("auto", tmp_path) == latest


def test_resume_explicit_path(tmp_path, accelerator):
    make_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, 3)
    first = manager.save(1, {}, is_best=False, fingerprint=FINGERPRINT)
    latest = manager.save(2, {}, is_best=False, fingerprint=FINGERPRINT)
    assert resolve_resume(str(first), tmp_path / "elsewhere") == first
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == latest


def test_resume_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.resume = .*nowhere.*folder not found"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_resume_incomplete_path(tmp_path):
    folder = tmp_path / "checkpoints" / "checkpoint-5"
    folder.mkdir(parents=True)
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        resolve_resume(str(folder), tmp_path)


def test_resume_empty_run_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="run folder has no complete checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Failed writes and crashes, in subprocesses

# Saves `steps` checkpoints, then (with --limit-bytes) caps the file size so the next save fails like a full disk.
FAILING_WRITER = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from accelerate import Accelerator
    from finetune.checkpoint import CheckpointManager, CheckpointWriteError

    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(64, 64))
    manager = CheckpointManager(run_dir, accelerator, save_total_limit=2)
    manager.save(1, {"step": 1}, is_best=True, fingerprint={})
    if mode == "fsize":
        # Writes past 1 KiB now fail with EFBIG ("File too large"), as writes to a full disk fail with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    else:
        (run_dir / "checkpoints").chmod(0o555)
    try:
        manager.save(2, {"step": 2}, is_best=False, fingerprint={})
    except CheckpointWriteError as error:
        print(json.dumps({"error": str(error), "latest": str(manager.latest())}))
    """
)


def _run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


@pytest.mark.parametrize("mode", ["fsize", "readonly"])
def test_failed_write_keeps_previous(tmp_path, mode):
    if mode == "readonly" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    result = _run_python(FAILING_WRITER, str(tmp_path), mode)
    (tmp_path / "checkpoints").chmod(0o755)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    checkpoints = tmp_path / "checkpoints"
    assert f"cannot write checkpoint {checkpoints}/.tmp-checkpoint-2-" in report["error"]
    assert f"previous checkpoint {checkpoints}/checkpoint-1 is still complete" in report["error"]
    assert report["latest"] == str(checkpoints / "checkpoint-1")
    assert steps_of(list_complete(checkpoints)) == [1]


def _weights_digest(model) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def _digest_training(accelerator: Accelerator):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return accelerator.prepare(model, optimizer)


def _save_forever(run_dir: str) -> None:
    """Resume from the newest checkpoint, then train and save until killed.

    Each checkpoint records a digest of the weights in memory, so a reader can check that the weights file of
    every visible checkpoint belongs to it. Runs in a forked process.
    """
    accelerator = Accelerator(cpu=True)
    model, optimizer = _digest_training(accelerator)
    manager = CheckpointManager(run_dir, accelerator, save_total_limit=2)
    step = 0
    latest = resolve_resume("auto", run_dir)
    if latest is not None:
        state = manager.load(latest)
        step = state["step"]
        if state["digest"] != _weights_digest(model):
            sys.exit(f"weights of {latest} do not match its trainer state")
    while True:
        step += 1
        model(torch.randn(8, 128)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.save(step, {"step": step, "digest": _weights_digest(model)}, is_best=step % 3 == 0, fingerprint={})


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.001)
    return False


def _incomplete_visible(checkpoints: Path) -> list[str]:
    """Return the names of visible checkpoint folders that are not complete."""
    if not checkpoints.is_dir():
        return []
    return [child.name for child in checkpoints.iterdir() if child.name.startswith("checkpoint-") and not is_complete(child)]


def _newest_step(checkpoints: Path) -> int:
    return max(steps_of(list_complete(checkpoints)), default=0)


@pytest.fixture(scope="module")
def forkserver():
    return engine_forkserver()


@pytest.mark.slow
def test_sigkill_during_save(tmp_path, accelerator, forkserver):
    checkpoints = tmp_path / "checkpoints"
    rng = random.Random(1234)
    newest_steps = []
    killed_during_write = 0
    for cycle in range(10):
        start_step = _newest_step(checkpoints)
        process = forkserver.Process(target=_save_forever, args=(str(tmp_path),))
        process.start()
        try:
            progressed = _wait_for(lambda: _newest_step(checkpoints) > start_step or not process.is_alive(), 120)
            assert progressed and process.is_alive(), f"cycle {cycle}: saver exited with {process.exitcode}"
            if cycle % 2 == 0:
                # Kill while a temporary folder exists, in the middle of a save.
                killed_during_write += _wait_for(lambda: any(checkpoints.glob(".tmp-checkpoint-*")), 30)
                time.sleep(rng.uniform(0, 0.004))
            else:
                time.sleep(rng.uniform(0, 0.3))
        finally:
            process.kill()
            process.join(timeout=30)
        assert _incomplete_visible(checkpoints) == [], f"cycle {cycle}"
        newest_steps.append(_newest_step(checkpoints))

    model, _ = _digest_training(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, save_total_limit=2)
    for path in manager.list_complete():
        state = manager.load(path, set_aside_newer=False)
        assert state["digest"] == _weights_digest(model), path
    assert newest_steps == sorted(newest_steps)
    assert killed_during_write >= 3
    assert not any(child.name.startswith(".tmp-") for child in checkpoints.iterdir())


# Two processes save and load through the same manager; each prints what it saw.
TWO_PROCESS_SAVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from accelerate import Accelerator
    from finetune.checkpoint import CheckpointManager

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    manager = CheckpointManager(Path(sys.argv[1]), accelerator, save_total_limit=1)
    for step in (1, 2):
        path = manager.save(step, {"step": step}, is_best=False, fingerprint={"world_size": accelerator.num_processes})
    draw = torch.rand(1).item()
    state = manager.load(path)
    print(json.dumps({"rank": accelerator.process_index, "path": str(path), "state": state,
                      "rng_restored": torch.rand(1).item() == draw}), flush=True)
    """
)


def json_objects(text: str) -> list[dict]:
    """Parse every JSON object in `text`; two ranks writing to one pipe can put their lines side by side."""
    decoder, objects, position = json.JSONDecoder(), [], text.find("{")
    while position != -1:
        item, end = decoder.raw_decode(text, position)
        objects.append(item)
        position = text.find("{", end)
    return objects


@pytest.mark.slow
def test_two_process_save(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(TWO_PROCESS_SAVER, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", str(script), str(tmp_path / "run"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted(json_objects(result.stdout), key=lambda item: item["rank"])
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert [item["rank"] for item in reports] == [0, 1]
    assert {item["path"] for item in reports} == {str(checkpoint)}
    assert all(item["state"] == {"step": 2} for item in reports)
    assert all(item["rng_restored"] is True for item in reports)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {child.name for child in checkpoint.iterdir()}
    assert sorted(child.name for child in checkpoint.parent.iterdir()) == ["checkpoint-2"]

