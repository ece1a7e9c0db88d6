"""Job service end to end: real `accelerate launch` subprocesses training a tiny random BERT on CPU."""

from __future__ import annotations

import csv
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from finetune import runlog
from finetune.jobs import JobStatus, Scheduler, Workspace

POLL_SECONDS = 0.5
JOB_TIMEOUT_SECONDS = 240.0
# 240 optimizer steps of the tiny model: long enough that a job is still running when a test stops or kills
# it after its first event, short enough (seconds) to finish after a resume.
LONG_JOB = ("training.num_train_epochs=60", "checkpoint.save_steps=20")

TINY_CONFIG = """\
task: text-classification
model:
  name_or_path: model
data:
  train: data.csv
  validation_size: 8
  test_size: 8
  max_length: 16
training:
  num_train_epochs: 1
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 16
  learning_rate: 1.0e-3
  mixed_precision: "no"
  logging_steps: 1
checkpoint:
  save_steps: 2
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder with a tiny random BERT (`model/`), a 48-row two-class CSV and `tiny.yaml`."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_project")
    words = ["good", "great", "nice", "fine", "bad", "awful", "poor", "terrible", "film"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=32,
    )
    BertForSequenceClassification(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = random.Random(0)
    with open(folder / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for index in range(48):
            positive = index % 2 == 0
            pool = words[:4] if positive else words[4:8]
            text = " ".join(rng.choice(pool) for _ in range(3)) + f" film {index}"
            writer.writerow([text, "pos" if positive else "neg"])
    (folder / "tiny.yaml").write_text(TINY_CONFIG)
    return folder


@pytest.fixture
def offline(monkeypatch):
    # Jobs inherit the scheduler's environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("FINETUNE_GPU_COUNT", "0")


def submit(workspace: Workspace, project: Path, *overrides: str, **options):
    return workspace.submit(project / "tiny.yaml", list(overrides), workdir=project, **options)


def wait_for(scheduler: Scheduler | None, workspace: Workspace, job_id: int, condition, timeout: float = JOB_TIMEOUT_SECONDS):
    """Tick the scheduler (when given) until `condition(job)` holds; return the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scheduler is not None:
            scheduler.tick()
        job = workspace.get(job_id)
        if condition(job):
            return job
        time.sleep(POLL_SECONDS)
    log = workspace.tail_log(job_id, max_lines=40)
    raise AssertionError(f"job {job_id} did not reach the expected state in {timeout} s: {workspace.get(job_id)}\n{log}")


def has_event(kind: str):
    return lambda job: any(event["event"] == kind for event in runlog.read_events(job.run_dir))


def finished(job) -> bool:
    return job.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED)


def run_starts(job) -> list[dict]:
    return [event for event in runlog.read_events(job.run_dir) if event["event"] == "run_start"]


def kill_job_processes(job) -> None:
    runner = psutil.Process(job.pid)
    victims = [runner, *runner.children(recursive=True)]
    for process in victims:
        process.kill()
    psutil.wait_procs(victims, timeout=30)


@pytest.mark.timeout(600)
def test_queue_runs_in_order(tmp_path, project, offline):
    workspace = Workspace(tmp_path / "ws")
    first = submit(workspace, project, name="first")
    second = submit(workspace, project, name="second")
    scheduler = Scheduler(workspace, max_cpu_jobs=1)
    max_running = 0
    deadline = time.monotonic() + 2 * JOB_TIMEOUT_SECONDS
    while time.monotonic() < deadline and not all(finished(workspace.get(job.id)) for job in (first, second)):
        scheduler.tick()
        max_running = max(max_running, len(workspace.list_jobs((JobStatus.RUNNING, JobStatus.STOPPING))))
        time.sleep(POLL_SECONDS)
    first, second = workspace.get(first.id), workspace.get(second.id)
    assert first.status == JobStatus.COMPLETED, workspace.tail_log(first.id)
    assert second.status == JobStatus.COMPLETED, workspace.tail_log(second.id)
    assert max_running == 1
    assert second.started_at >= first.finished_at
    assert first.exit_code == runlog.EXIT_COMPLETED
    assert (first.run_dir / "export" / "config.json").is_file()


@pytest.mark.timeout(600)
def test_stop_then_resume_completes(tmp_path, project, offline):
    workspace = Workspace(tmp_path / "ws")
    job = submit(workspace, project, *LONG_JOB)
    scheduler = Scheduler(workspace, max_cpu_jobs=1)
    wait_for(scheduler, workspace, job.id, has_event("train"))
    assert workspace.stop(job.id).status == JobStatus.STOPPING
    stopped = wait_for(scheduler, workspace, job.id, finished)
    assert stopped.status == JobStatus.STOPPED, workspace.tail_log(job.id)
    assert stopped.exit_code == runlog.EXIT_STOPPED
    assert list((stopped.run_dir / "checkpoints").iterdir())
    workspace.resume(job.id)
    done = wait_for(scheduler, workspace, job.id, finished)
    assert done.status == JobStatus.COMPLETED, workspace.tail_log(job.id)
    assert done.attempt == 2
    assert run_starts(done)[-1]["resumed_from"] is not None


@pytest.mark.timeout(600)
def test_failed_job_log_is_clean(tmp_path, project, offline):
    workspace = Workspace(tmp_path / "ws")
    job = submit(workspace, project, "data.train=missing.csv")
    failed = wait_for(Scheduler(workspace, max_cpu_jobs=1), workspace, job.id, finished)
    log = workspace.tail_log(job.id, max_lines=1000)
    assert failed.status == JobStatus.FAILED
    assert "Traceback" not in log
    assert log.count("data file 'missing.csv' not found") == 1


@pytest.mark.timeout(600)
def test_restarted_scheduler_reattaches(tmp_path, project, offline):
    workspace = Workspace(tmp_path / "ws")
    job = submit(workspace, project, *LONG_JOB)
    worker = subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "worker", "--workspace", str(workspace.path), "--poll-seconds", "0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        running = wait_for(None, workspace, job.id, lambda job: job.pid is not None and has_event("train")(job))
    finally:
        worker.kill()
        worker.wait()
    runner = psutil.Process(running.pid)
    assert runner.is_running()
    done = wait_for(Scheduler(workspace, max_cpu_jobs=1), workspace, job.id, finished)
    assert done.status == JobStatus.COMPLETED, workspace.tail_log(job.id)
    assert done.attempt == 1
    assert done.pid == running.pid


@pytest.mark.timeout(600)
def test_killed_job_fails_then_resumes(tmp_path, project, offline):
    workspace = Workspace(tmp_path / "ws")
    job = submit(workspace, project, *LONG_JOB)
    running = wait_for(Scheduler(workspace, max_cpu_jobs=1), workspace, job.id, has_event("checkpoint"))
    # The scheduler above is gone (no more ticks); now the job dies without a chance to record anything.
    kill_job_processes(running)
    scheduler = Scheduler(workspace, max_cpu_jobs=1)
    scheduler.tick()
    failed = workspace.get(job.id)
    assert failed.status == JobStatus.FAILED
    assert "ended without recording an exit code" in failed.failure_reason
    workspace.resume(job.id)
    done = wait_for(scheduler, workspace, job.id, finished)
    assert done.status == JobStatus.COMPLETED, workspace.tail_log(job.id)
    assert run_starts(done)[-1]["resumed_from"] is not None


@pytest.mark.timeout(120)
def test_worker_exits_on_sigterm(tmp_path, offline):
    worker = subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "worker", "--workspace", str(tmp_path / "ws"), "--poll-seconds", "0.2"],
        stderr=subprocess.PIPE, text=True,
    )
    first_line = worker.stderr.readline()
    assert "scheduler started" in first_line
    worker.send_signal(signal.SIGTERM)
    _, rest = worker.communicate(timeout=60)
    assert worker.returncode == 0
    assert "scheduler stopped" in rest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_cpu_job(tmp_path, project, offline):
    workspace = Workspace(tmp_path / "ws")
    job = submit(workspace, project, num_processes=2, gpus=0)
    done = wait_for(Scheduler(workspace, max_cpu_jobs=1), workspace, job.id, finished)
    assert done.status == JobStatus.COMPLETED, workspace.tail_log(job.id)
    assert done.assigned_devices == ["cpu"]
    assert run_starts(done)[-1]["world_size"] == 2
