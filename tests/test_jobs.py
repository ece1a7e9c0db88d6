"""Job service without training: store, transitions, concurrent submits, placement, progress and the CLI."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from finetune import cli, runlog
from finetune.config import ConfigError, validate_config
from finetune.jobs import InvalidTransition, JobNotFound, JobStatus, Scheduler, Workspace, read_progress
from finetune.jobs.placement import (
    Placement, PlacementError, detect_gpus, device_environment, launch_flags, place, resolve_accelerate_config,
)
from finetune.jobs.processes import find_process

CONFIG = """\
task: text-classification
model:
  name_or_path: some/model
data:
  train: train.csv
training:
  metric_for_best_model: accuracy
"""


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


# -- store and actions ----------------------------------------------------------------------------------------------


def test_submit_applies_overrides(workspace):
    job = workspace.submit(CONFIG, ["training.learning_rate=3e-5"], name="demo")
    stored = validate_config(yaml.safe_load(job.config))
    assert stored.training.learning_rate == 3e-5
    assert stored.name == "demo"
    assert job.status == JobStatus.QUEUED
    assert job.run_dir == workspace.path / "runs" / str(job.id)
    assert (job.run_dir / "job_config.yaml").read_text() == job.config


def test_submit_from_path_names_job(workspace, tmp_path):
    path = tmp_path / "imdb_bert.yaml"
    path.write_text(CONFIG)
    job = workspace.submit(path)
    assert job.name == "imdb_bert"
    assert job.source == str(path.resolve())


def test_submit_rejects_bad_config(workspace):
    with pytest.raises(ConfigError) as error:
        workspace.submit(CONFIG, ["training.learning_rate=-1", "training.epochs=3"])
    keys = [issue.key for issue in error.value.issues]
    assert "training.learning_rate" in keys
    assert "training.epochs" in keys
    assert workspace.list_jobs() == []


def test_submit_rejects_process_mismatch(workspace):
    with pytest.raises(ValueError, match="num_processes=1 does not match gpus=2"):
        workspace.submit(CONFIG, num_processes=1, gpus=2)


def test_submit_rejects_unknown_accelerate_config(workspace):
    with pytest.raises(ValueError, match="accelerate config 'nope' not found"):
        workspace.submit(CONFIG, accelerate_config="nope")


def test_gpus_default_processes(workspace):
    job = workspace.submit(CONFIG, gpus=2)
    assert job.num_processes == 2
    assert job.requested_gpus == 2


def test_cancel_only_queued(workspace):
    job = workspace.submit(CONFIG)
    assert workspace.cancel(job.id).status == JobStatus.CANCELLED
    with pytest.raises(InvalidTransition, match="is cancelled, but this needs it queued"):
        workspace.cancel(job.id)


def test_stop_queued_rejected(workspace):
    job = workspace.submit(CONFIG)
    with pytest.raises(InvalidTransition, match="cancel it instead"):
        workspace.stop(job.id)


def test_resume_needs_stopped_or_failed(workspace):
    job = workspace.submit(CONFIG)
    with pytest.raises(InvalidTransition, match="needs it stopped or failed"):
        workspace.resume(job.id)


def test_delete_removes_row_and_folder(workspace):
    job = workspace.submit(CONFIG)
    workspace.delete(str(job.id))
    assert not job.run_dir.exists()
    with pytest.raises(JobNotFound):
        workspace.get(job.id)


def test_delete_running_rejected(workspace):
    job = workspace.submit(CONFIG)
    workspace.store.update(job.id, status=JobStatus.RUNNING)
    with pytest.raises(InvalidTransition, match="stop it before deleting"):
        workspace.delete(job.id)


def test_clone_keeps_config_and_devices(workspace):
    source = workspace.submit(CONFIG, ["training.seed=7"], name="base", num_processes=2, gpus=0)
    clone = workspace.clone(source.id, ["training.learning_rate=1e-4"])
    stored = validate_config(yaml.safe_load(clone.config))
    assert clone.id != source.id
    assert clone.name == "base-clone"
    assert stored.training.seed == 7
    assert stored.training.learning_rate == 1e-4
    assert clone.num_processes == 2
    assert clone.requested_gpus == 0


def test_unknown_id_message(workspace):
    with pytest.raises(JobNotFound, match="job 42 not found"):
        workspace.get(42)
    with pytest.raises(JobNotFound, match="invalid job id 'abc'"):
        workspace.get("abc")


def test_concurrent_submits_all_stored(workspace):
    # 20 threads, each with its own Workspace object (its own connections), submit 5 jobs each at once.
    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def submit_five(thread_index: int) -> None:
        own = Workspace(workspace.path)
        barrier.wait()
        try:
            for job_index in range(5):
                own.submit(CONFIG, name=f"t{thread_index}-j{job_index}")
        except BaseException as error:  # Collected and asserted below; a thread cannot fail the test itself.
            errors.append(error)

    threads = [threading.Thread(target=submit_five, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs = workspace.list_jobs()
    assert errors == []
    assert len(jobs) == 100
    assert len({job.id for job in jobs}) == 100
    assert sorted(job.name for job in jobs) == sorted(f"t{t}-j{j}" for t in range(20) for j in range(5))
    assert all(job.run_dir.is_dir() for job in jobs)


def test_database_uses_wal(workspace):
    import sqlite3

    connection = sqlite3.connect(workspace.path / "jobs.sqlite")
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        connection.close()


# -- processes ------------------------------------------------------------------------------------------------------


def test_find_process_checks_create_time():
    me = psutil.Process()
    assert find_process(me.pid, me.create_time()) is not None
    assert find_process(me.pid, me.create_time() - 100.0) is None


def test_recycled_pid_not_reattached(workspace):
    # A job whose recorded pid now belongs to another process (this test) must be recorded as ended.
    job = workspace.submit(CONFIG)
    me = psutil.Process()
    workspace.store.update(
        job.id, status=JobStatus.RUNNING, started_at=time.time(), pid=me.pid,
        pid_create_time=me.create_time() - 100.0, token=f"{job.id}-test", attempt=1,
    )
    Scheduler(workspace, max_cpu_jobs=0, gpu_count=0).tick()
    job = workspace.get(job.id)
    assert job.status == JobStatus.FAILED
    assert "ended without recording an exit code" in job.failure_reason


def _ended_running_job(workspace, exit_code: int, status: str):
    """Submit a job recorded as running under a pid that does not exist, with its runner's exit file written."""
    job = workspace.submit(CONFIG)
    workspace.store.update(
        job.id, status=JobStatus.RUNNING, started_at=time.time(), pid=2**22 + 1, pid_create_time=1.0,
        token=f"{job.id}-test", attempt=1,
    )
    record = {"token": f"{job.id}-test", "exit_code": exit_code, "status": status}
    (job.run_dir / "exit_code.json").write_text(json.dumps(record))
    return job


def test_exit_file_decides_outcome(workspace):
    job = _ended_running_job(workspace, runlog.EXIT_STOPPED, "stopped")
    Scheduler(workspace, max_cpu_jobs=0, gpu_count=0).tick()
    job = workspace.get(job.id)
    assert job.status == JobStatus.STOPPED
    assert job.exit_code == runlog.EXIT_STOPPED


def test_killed_training_reason(workspace):
    # A SIGKILLed training process leaves no run_end event, and its stderr ends in a tqdm bar and the runner.
    job = _ended_running_job(workspace, runlog.EXIT_FAILED, "failed")
    bar = "training:  27%|##7       | {}/1500 [00:13<04:45,  3.83step/s, loss=0.0019]"
    stderr = (
        bar.format(405) + " " * 8 + "02:02:19 INFO finetune.checkpoint: Saved checkpoint checkpoint-405\n"
        + bar.format(405) + "\r" + bar.format(406)
        + "02:02:19 INFO finetune.jobs.runner: runner 1 finished: launcher exit 1, job exit 1 (failed)\n"
    )
    (job.run_dir / "stderr.log").write_text(stderr)
    Scheduler(workspace, max_cpu_jobs=0, gpu_count=0).tick()
    job = workspace.get(job.id)
    assert job.status == JobStatus.FAILED
    assert job.failure_reason == (
        "exit code 1: the training process ended without recording a run_end event, so a signal killed it (such "
        "as SIGKILL or the out-of-memory killer) or it crashed. Resume the job to continue from the last checkpoint. Last log line: "
        f"02:02:19 INFO finetune.checkpoint: Saved checkpoint checkpoint-405 (see {job.run_dir / 'stderr.log'})"
    )


# -- placement ------------------------------------------------------------------------------------------------------


def test_place_cpu_limit():
    assert place(None, 1, [], set(), cpu_jobs_running=0, max_cpu_jobs=1) == Placement(("cpu",), 1)
    assert place(None, 1, [], set(), cpu_jobs_running=1, max_cpu_jobs=1) is None


def test_place_gpu_free_only():
    placement = place(2, 2, ["0", "1", "2", "3"], {"0", "2"}, cpu_jobs_running=0, max_cpu_jobs=1)
    assert placement == Placement(("1", "3"), 2)
    assert place(2, 2, ["0", "1", "2"], {"0", "2"}, cpu_jobs_running=0, max_cpu_jobs=1) is None


def test_place_auto_uses_gpus():
    assert place(None, 2, ["0", "1"], set(), 0, 1) == Placement(("0", "1"), 2)


def test_place_too_many_gpus():
    with pytest.raises(PlacementError, match="requests 3 GPU\\(s\\) but this host has 2"):
        place(3, 3, ["0", "1"], set(), 0, 1)


def test_scheduler_never_shares_gpus(workspace):
    first = workspace.submit(CONFIG, gpus=2)
    second = workspace.submit(CONFIG, gpus=1)
    third = workspace.submit(CONFIG, gpus=2)
    cpu_job = workspace.submit(CONFIG, gpus=0)
    scheduler = Scheduler(workspace, max_cpu_jobs=1, gpu_count=4)
    claimed = {job.id: placement.devices for job, placement in scheduler.claim_queued()}
    assert claimed == {first.id: ("0", "1"), second.id: ("2",), cpu_job.id: ("cpu",)}
    assert workspace.get(third.id).status == JobStatus.QUEUED
    # Freeing the first job's GPUs lets the third one in, on exactly those GPUs.
    workspace.store.update(first.id, status=JobStatus.COMPLETED)
    claimed = {job.id: placement.devices for job, placement in scheduler.claim_queued()}
    assert claimed == {third.id: ("0", "1")}


def test_scheduler_fails_unplaceable(workspace):
    job = workspace.submit(CONFIG, gpus=2)
    Scheduler(workspace, gpu_count=1).claim_queued()
    job = workspace.get(job.id)
    assert job.status == JobStatus.FAILED
    assert "requests 2 GPU(s) but this host has 1" in job.failure_reason


def test_detect_gpus_env_and_visible(monkeypatch):
    monkeypatch.setenv("FINETUNE_GPU_COUNT", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert detect_gpus() == ["4", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert detect_gpus() == ["0", "1"]
    assert detect_gpus(gpu_count=0) == []


def test_detect_gpus_invalid_env(monkeypatch):
    monkeypatch.setenv("FINETUNE_GPU_COUNT", "two")
    with pytest.raises(ValueError, match="FINETUNE_GPU_COUNT='two' is invalid"):
        detect_gpus()


def test_launch_flags_cases():
    assert launch_flags(Placement(("cpu",), 1), None)[:3] == ["--cpu", "--num_processes", "1"]
    multi_cpu = launch_flags(Placement(("cpu",), 2), None, port=29123)
    assert multi_cpu[:3] == ["--multi_gpu", "--num_processes", "2"]
    assert multi_cpu[-2:] == ["--main_process_port", "29123"]
    one_gpu = launch_flags(Placement(("3",), 1), None)
    assert "--cpu" not in one_gpu
    assert "--multi_gpu" not in one_gpu
    named = launch_flags(Placement(("0", "1"), 2), "fsdp", port=29124)
    assert named[:2] == ["--config_file", str(resolve_accelerate_config("fsdp"))]
    assert "--multi_gpu" not in named


def test_device_environment():
    assert device_environment(Placement(("cpu",), 2)) == {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    assert device_environment(Placement(("1", "3"), 2)) == {"CUDA_VISIBLE_DEVICES": "1,3"}


@pytest.mark.parametrize(
    "name, distributed_type",
    [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED")],
)
def test_accelerate_config_loads(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    path = resolve_accelerate_config(name)
    assert path.read_text().startswith("# ")
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == distributed_type
    assert config.gpu_ids == "all"


# -- progress -------------------------------------------------------------------------------------------------------


def _write_events(run_dir: Path, events: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / runlog.METRICS_FILE, "w") as handle:
        for event in events:
            handle.write(json.dumps(event) + "\n")


def test_progress_from_events(workspace):
    job = workspace.submit(CONFIG)
    job = workspace.store.update(job.id, status=JobStatus.RUNNING)
    _write_events(job.run_dir, [
        {"event": "run_start", "time": 100.0, "step": 0, "epoch": 0.0, "total_steps": 40, "num_train_epochs": 2},
        {"event": "stage", "time": 100.0, "step": 0, "epoch": 0.0, "stage": 0, "name": "head"},
        {"event": "train", "time": 110.0, "step": 10, "epoch": 0.5, "loss": 0.9, "learning_rate": 1e-3},
        {"event": "eval", "time": 120.0, "step": 20, "epoch": 1.0, "split": "validation", "accuracy": 0.8, "loss": 0.5},
        {"event": "stage", "time": 120.0, "step": 20, "epoch": 1.0, "stage": 1, "name": "all"},
        {"event": "eval", "time": 125.0, "step": 25, "epoch": 1.25, "split": "validation", "accuracy": 0.7, "loss": 0.4},
    ])
    progress = read_progress(job, now=125.0)
    assert progress.step == 25
    assert progress.total_steps == 40
    assert progress.fraction == 25 / 40
    assert progress.epoch == 1.25
    assert progress.stage == "all"
    assert progress.stage_index == 1
    assert progress.train_metrics == {"loss": 0.9, "learning_rate": 1e-3}
    assert progress.validation_metrics == {"accuracy": 0.7, "loss": 0.4}
    assert (progress.best_metric, progress.best_value, progress.best_step) == ("accuracy", 0.8, 20)
    # 25 steps in 25 s since run_start: 15 steps left take 15 s.
    assert progress.eta_seconds == 15.0


def test_progress_eta_uses_current_attempt(workspace):
    job = workspace.submit(CONFIG)
    job = workspace.store.update(job.id, status=JobStatus.RUNNING)
    _write_events(job.run_dir, [
        {"event": "run_start", "time": 0.0, "step": 0, "epoch": 0.0, "total_steps": 100},
        {"event": "train", "time": 1000.0, "step": 50, "epoch": 0.5, "loss": 1.0},
        {"event": "run_start", "time": 5000.0, "step": 50, "epoch": 0.5, "total_steps": 100},
        {"event": "train", "time": 5010.0, "step": 60, "epoch": 0.6, "loss": 0.8},
    ])
    progress = read_progress(job, now=5010.0)
    assert progress.eta_seconds == 40.0


def test_progress_best_from_run_end(workspace):
    job = workspace.submit(CONFIG, ["training.metric_for_best_model=loss"])
    _write_events(job.run_dir, [
        {"event": "eval", "time": 1.0, "step": 5, "epoch": 1.0, "split": "validation", "loss": 0.6},
        {"event": "eval", "time": 2.0, "step": 10, "epoch": 2.0, "split": "validation", "loss": 0.3},
        {"event": "run_end", "time": 3.0, "step": 10, "epoch": 2.0, "status": "completed", "best_metric": "loss",
         "best_value": 0.3, "best_step": 10, "export_dir": "/x/export"},
    ])
    progress = read_progress(job)
    assert (progress.best_metric, progress.best_value, progress.best_step) == ("loss", 0.3, 10)
    assert progress.export_dir == "/x/export"
    assert progress.eta_seconds is None


def test_progress_without_events(workspace):
    progress = read_progress(workspace.submit(CONFIG))
    assert progress.step == 0
    assert progress.total_steps is None
    assert progress.best_value is None


# -- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_submit_list_show_cancel(workspace, tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text(CONFIG)
    ws = ["--workspace", str(workspace.path)]
    assert cli.main(["jobs", "submit", str(config), "training.seed=3", "--gpus", "0", *ws]) == 0
    assert "queued job 1 (demo)" in capsys.readouterr().out
    assert cli.main(["jobs", "list", *ws]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["ID", "NAME", "STATUS", "PROGRESS", "ETA", "STAGE", "BEST"]
    assert listing[1].split()[:3] == ["1", "demo", "queued"]
    assert cli.main(["jobs", "show", "1", *ws]) == 0
    shown = capsys.readouterr().out
    assert "seed: 3" in shown
    assert f"working directory  {Path.cwd().resolve()}" in shown.splitlines()
    assert cli.main(["jobs", "cancel", "1", *ws]) == 0
    assert workspace.get(1).status == JobStatus.CANCELLED


def test_cli_clone_sets_gpus(workspace, capsys):
    source = workspace.submit(CONFIG, name="big", gpus=2)
    ws = ["--workspace", str(workspace.path)]
    assert cli.main(["jobs", "clone", str(source.id), "--gpus", "0", *ws]) == 0
    clone = workspace.get(2)
    assert clone.requested_gpus == 0
    assert clone.num_processes == 1
    assert source.num_processes == 2


@pytest.mark.parametrize("option, value, message", [
    ("--max-cpu-jobs", "-1", "argument --max-cpu-jobs: -1 is negative; give a whole number of at least 0."),
    ("--poll-seconds", "0", "argument --poll-seconds: 0 is not above 0; give a number of seconds above 0, e.g. 2."),
    ("--stop-timeout", "-5", "argument --stop-timeout: -5 is negative; give a number of seconds of at least 0."),
    ("--poll-seconds", "soon", "argument --poll-seconds: invalid number 'soon'; give a number of seconds, e.g. 2."),
])
def test_worker_rejects_bad_option(workspace, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["worker", option, value, "--workspace", str(workspace.path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"finetune worker: error: {message}"


def test_cli_errors_exit_codes(workspace, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.replace("text-classification", "audio"))
    ws = ["--workspace", str(workspace.path)]
    assert cli.main(["jobs", "submit", str(config), *ws]) == 2
    assert "task" in capsys.readouterr().err
    assert cli.main(["jobs", "resume", "7", *ws]) == 1
    assert "job 7 not found" in capsys.readouterr().err


def test_cli_logs_prints_tail(workspace, capsys):
    job = workspace.submit(CONFIG)
    (job.run_dir / "stderr.log").write_text("".join(f"line {index}\n" for index in range(10)))
    assert cli.main(["jobs", "logs", str(job.id), "--lines", "2", "--workspace", str(workspace.path)]) == 0
    assert capsys.readouterr().out == "line 8\nline 9\n"


def test_cli_logs_zero_lines(workspace, capsys):
    job = workspace.submit(CONFIG)
    (job.run_dir / "stderr.log").write_text("".join(f"line {index}\n" for index in range(10)))
    assert cli.main(["jobs", "logs", str(job.id), "--lines", "0", "--workspace", str(workspace.path)]) == 0
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as exited:
        cli.main(["jobs", "logs", str(job.id), "--lines", "-5", "--workspace", str(workspace.path)])
    assert exited.value.code == 2
    assert "-5 is negative" in capsys.readouterr().err


def test_default_workspace_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_WORKSPACE", str(tmp_path / "env-ws"))
    assert Workspace().path == (tmp_path / "env-ws").resolve()


# -- stop escalation, with a real process that ignores SIGTERM ----------------------------------------------------------


@pytest.fixture
def stubborn_job(workspace):
    """A running job whose process ignores SIGTERM, as a run stuck in a long checkpoint write would."""
    import subprocess
    import sys

    job = workspace.submit(CONFIG)
    token = f"{job.id}-stubborn"
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
        env={**os.environ, "FINETUNE_JOB_TOKEN": token}, start_new_session=True, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout.readline() == "ready\n"
    job = workspace.store.update(
        job.id, status=JobStatus.RUNNING, started_at=time.time(), pid=process.pid,
        pid_create_time=psutil.Process(process.pid).create_time(), token=token, attempt=1,
    )
    yield job, process
    process.kill()
    process.wait()


def test_second_stop_kills(workspace, stubborn_job):
    job, process = stubborn_job
    assert workspace.stop(job.id).status == JobStatus.STOPPING
    assert process.poll() is None
    stopped = workspace.stop(job.id)
    process.wait(timeout=30)
    assert not psutil.pid_exists(process.pid)
    assert stopped.status == JobStatus.STOPPED
    assert "killed with SIGKILL" in stopped.failure_reason


def test_stop_timeout_kills(workspace, stubborn_job):
    job, process = stubborn_job
    workspace.stop(job.id)
    Scheduler(workspace, max_cpu_jobs=0, gpu_count=0, stop_timeout=0.0).tick()
    process.wait(timeout=30)
    assert not psutil.pid_exists(process.pid)
    assert workspace.get(job.id).status == JobStatus.STOPPED


def test_failed_exit_during_stop_is_stopped(workspace):
    job = workspace.submit(CONFIG)
    workspace.store.update(
        job.id, status=JobStatus.RUNNING, started_at=time.time(), pid=2**22 + 1, pid_create_time=1.0,
        token=f"{job.id}-test", attempt=1,
    )
    workspace.store.update(job.id, status=JobStatus.STOPPING, stop_requested_at=time.time())
    record = {"token": f"{job.id}-test", "exit_code": runlog.EXIT_FAILED, "status": "failed"}
    (job.run_dir / "exit_code.json").write_text(json.dumps(record))
    (job.run_dir / "stderr.log").write_text("Traceback (most recent call last):\nKeyboardInterrupt: x\nRuntimeError: died\n")
    Scheduler(workspace, max_cpu_jobs=0, gpu_count=0).tick()
    job = workspace.get(job.id)
    assert job.status == JobStatus.STOPPED
    assert job.failure_reason.startswith("stopped without a final checkpoint: exit code 1: RuntimeError: died")


def test_cli_logs_follow_finished(workspace, capsys):
    job = workspace.submit(CONFIG)
    workspace.cancel(job.id)
    (job.run_dir / "stderr.log").write_text("only line\n")
    assert cli.main(["jobs", "logs", str(job.id), "--follow", "--workspace", str(workspace.path)]) == 0
    assert capsys.readouterr().out == "only line\n"
