"""The web app served for real (a subprocess on 127.0.0.1) and driven through gradio_client: a tiny job from
launch to prediction, and the safety rules (roots, symlinks, upload limit, login, concurrency of Try)."""

from __future__ import annotations

import csv
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT_MB = 1


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared with test_browser.py


def make_tiny_bert(folder: Path) -> Path:
    """Save a randomly initialised 2-layer BERT (hidden size 32) with a WordPiece tokenizer into `folder`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "a", "is", "was", "very"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


def make_reviews_csv(path: Path, rows: int = 48) -> Path:
    """Write a CSV of short `text,label` reviews with labels pos and neg, alternating."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for index in range(rows):
            label = "pos" if index % 2 else "neg"
            word = rng.choice(["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"])
            writer.writerow([f"the {rng.choice(['movie', 'film'])} was very {word} {index}", label])
    return path


def tiny_job_yaml(model_dir: Path, data_file: Path, name: str = "tiny", epochs: int = 2) -> str:
    return f"""\
name: {name}
task: text-classification
model:
  name_or_path: {model_dir}
data:
  train: {data_file}
  max_length: 16
  validation_size: 0.25
  test_size: 0.0
training:
  num_train_epochs: {epochs}
  per_device_train_batch_size: 8
  learning_rate: 1.0e-3
  mixed_precision: "no"
  logging_steps: 1
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """`finetune app` in a subprocess on a free 127.0.0.1 port; `url` is its address."""

    def __init__(self, root: Path, extra_args: list[str] = (), env: dict | None = None):
        self.root = root
        self.workspace = root / "workspace"
        self.data_root = root / "data"
        self.model_root = root / "models"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = root / f"app-{self.port}.log"
        command = [
            sys.executable, "-m", "finetune.cli", "app", "--port", str(self.port), "--workspace", str(self.workspace),
            "--data-root", str(self.data_root), "--model-root", str(self.model_root),
            "--max-upload-mb", str(UPLOAD_LIMIT_MB), *extra_args,
        ]
        # A login in the developer's own environment must not leak into servers meant to run without one.
        full_env = {key: value for key, value in os.environ.items() if key != "FINETUNE_AUTH"}
        full_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
        full_env.update(env or {})
        self.log_handle = open(self.log, "wb")
        self.process = subprocess.Popen(command, cwd=root, env=full_env, stdout=self.log_handle,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"app did not answer on {self.url} within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_handle.close()


def start_server(root: Path, extra_args: list[str] = (), env: dict | None = None) -> AppServer:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    make_reviews_csv(root / "data" / "reviews.csv")
    make_tiny_bert(root / "models" / "tiny-bert")
    server = AppServer(root, extra_args, env)
    server.wait_ready()
    return server


def wait_for_status(client: Client, job_id: str, expected: tuple[str, ...], timeout: float = 300.0) -> str:
    """Poll the job table through the API until the job's status is one of `expected`; return it."""
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        table = client.predict(job_id, None, api_name="/jobs_refresh")[0]
        rows = {str(row[0]): row for row in table["data"]}
        status = rows[job_id][2] if job_id in rows else "missing"
        if status in expected:
            return status
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} is still {status!r} after {timeout} s; expected one of {expected}")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = start_server(tmp_path_factory.mktemp("app"))
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory):
    """An app with a login and no scheduler, so submitted jobs stay queued."""
    app = start_server(tmp_path_factory.mktemp("locked"), ["--no-scheduler"], env={"FINETUNE_AUTH": "alice:s3cret"})
    yield app
    app.close()


def job_id_from(status_text: str) -> str:
    # The launch status reads "Job **ID** queued as ...".
    return status_text.split("**")[1]


# ---------------------------------------------------------------------------------------------------------------
# Tests


def test_job_launch_to_prediction(server, client):
    text = tiny_job_yaml(server.model_root / "tiny-bert", server.data_root / "reviews.csv")
    outputs = client.predict(text, api_name="/launch")
    status = outputs[-2]
    assert "queued" in status, outputs
    job_id = job_id_from(status)

    assert wait_for_status(client, job_id, ("completed", "failed")) == "completed"
    followed = client.predict(job_id, api_name="/job_follow")
    assert "completed" in followed

    label_a, label_b, message = client.predict(f"job:{job_id}", None, None, "the movie was very good", 2,
                                               api_name="/predict")
    assert message == ""
    assert "confidences" not in label_b
    assert {item["label"] for item in label_a["confidences"]} == {"neg", "pos"}
    assert label_a["label"] in ("neg", "pos")


def test_finished_job_analysis(server, client):
    table = client.predict(None, None, api_name="/jobs_refresh")[0]
    finished = [str(row[0]) for row in table["data"] if row[2] == "completed"]
    if not finished:
        pytest.skip("needs the completed job of test_job_launch_to_prediction")
    confusion, gallery, texts, message = client.predict(f"job:{finished[0]}", api_name="/analyse")
    assert "validation examples are misclassified" in message
    assert confusion is not None


def test_leaderboard_and_compare(server, client):
    rows = client.predict(api_name="/leaderboard")[0]["data"]
    completed = [row for row in rows if row[2] == "completed"]
    if not completed:
        pytest.skip("needs the completed job of test_job_launch_to_prediction")
    assert completed[0][3] == "accuracy"
    assert completed[0][6] == "full"
    job_id = str(completed[0][0])
    diff, curves = client.predict(job_id, job_id, api_name="/compare")
    assert diff["data"] == [["(no difference)", "", ""]]
    assert curves is not None


def test_validate_reports_every_issue(server, client):
    text = tiny_job_yaml(server.model_root / "tiny-bert", server.data_root / "reviews.csv").replace(
        "learning_rate: 1.0e-3", "learning_rate: -1"
    ) + "checkpoint:\n  save_total_limit: 0\n"
    outputs = client.predict(text, api_name="/validate")
    learning_rate_error = outputs[5]
    assert learning_rate_error["visible"] is True
    assert "greater than 0" in learning_rate_error["value"]
    assert "checkpoint.save_total_limit" in outputs[-3]
    assert "2 problem(s)" in outputs[-2]


def test_data_path_outside_roots(server, client):
    text = tiny_job_yaml(server.model_root / "tiny-bert", server.data_root / ".." / "app.log")
    outputs = client.predict(text, api_name="/launch")
    data_error = outputs[3]
    assert data_error["visible"] is True
    assert "outside the allowed folders" in data_error["value"]
    assert "queued" not in outputs[-2]


def test_model_path_outside_roots(server, client):
    text = tiny_job_yaml(Path("/usr/lib"), server.data_root / "reviews.csv")
    outputs = client.predict(text, api_name="/validate")
    assert "outside the allowed folders" in outputs[2]["value"]


def test_symlink_out_of_root(server, client, tmp_path):
    outside = make_reviews_csv(tmp_path / "secret.csv")
    link = server.data_root / "link.csv"
    link.symlink_to(outside)
    text = tiny_job_yaml(server.model_root / "tiny-bert", link)
    outputs = client.predict(text, api_name="/launch")
    assert "outside the allowed folders" in outputs[3]["value"]
    assert "queued" not in outputs[-2]


def test_try_rejects_folder_outside_roots(server, client, tmp_path):
    make_tiny_bert(tmp_path / "elsewhere")
    _, _, message = client.predict(str(tmp_path / "elsewhere"), None, None, "good film", 2, api_name="/predict")
    assert "outside the allowed folders" in message


def test_oversized_upload_rejected(server, client, tmp_path):
    jobs_before = client.predict(None, None, api_name="/jobs_refresh")[0]["data"]
    big = tmp_path / "big.csv"
    big.write_bytes(b"text,label\n" + b"x" * (UPLOAD_LIMIT_MB * 2**20 + 10))
    with pytest.raises(Exception) as raised:
        client.predict(handle_file(str(big)), "", api_name="/upload_data")
    assert str(UPLOAD_LIMIT_MB * 2**20) in str(raised.value)
    stored = list((server.workspace / "uploads").glob("**/*")) if (server.workspace / "uploads").exists() else []
    assert stored == []
    jobs_after = client.predict(None, None, api_name="/jobs_refresh")[0]["data"]
    assert len(jobs_after) == len(jobs_before)


def test_upload_within_limit_sets_data(server, client):
    outputs = client.predict(handle_file(str(server.data_root / "reviews.csv")), "name: x\n", api_name="/upload_data")
    stored = Path(outputs[4])  # the data.train field
    assert stored.name == "reviews.csv"
    assert stored.is_relative_to(server.workspace / "uploads")
    assert f"train: {stored}" in outputs[0]


def test_wrong_credentials_rejected(locked_server):
    with pytest.raises(Exception):
        Client(locked_server.url, auth=("alice", "wrong"), verbose=False)


def test_unauthenticated_api_rejected(locked_server):
    with pytest.raises(Exception):
        Client(locked_server.url, verbose=False)


def test_clone_cancel_delete(locked_server):
    client = Client(locked_server.url, auth=("alice", "s3cret"), verbose=False)
    text = tiny_job_yaml(locked_server.model_root / "tiny-bert", locked_server.data_root / "reviews.csv", name="orig")
    job_id = job_id_from(client.predict(text, api_name="/launch")[-2])
    message = client.predict(job_id, api_name="/job_clone")
    clone_id = message.split("cloned as job ")[1].split()[0]
    assert clone_id != job_id

    assert "cancelled" in client.predict(clone_id, api_name="/job_stop")
    assert "deleted" in client.predict(clone_id, api_name="/job_delete")
    rows = client.predict(None, None, api_name="/jobs_refresh")[0]["data"]
    assert clone_id not in {str(row[0]) for row in rows}
    assert not (locked_server.workspace / "runs" / clone_id).exists()
    assert "cancelled" in client.predict(job_id, api_name="/job_stop")


def test_resume_of_queued_job_reports_error(locked_server):
    client = Client(locked_server.url, auth=("alice", "s3cret"), verbose=False)
    text = tiny_job_yaml(locked_server.model_root / "tiny-bert", locked_server.data_root / "reviews.csv")
    job_id = job_id_from(client.predict(text, api_name="/launch")[-2])
    message = client.predict(job_id, api_name="/job_resume")
    assert message.startswith("**Error:** resume failed")
    client.predict(job_id, api_name="/job_stop")


def test_try_answers_during_long_event(locked_server):
    client = Client(locked_server.url, auth=("alice", "s3cret"), verbose=False)
    text = tiny_job_yaml(locked_server.model_root / "tiny-bert", locked_server.data_root / "reviews.csv")
    job_id = job_id_from(client.predict(text, api_name="/launch")[-2])
    # Without a scheduler the job stays queued, so following it is an event that runs until it is cancelled.
    follow = client.submit(job_id, api_name="/job_follow")
    time.sleep(2.0)

    label, _, message = client.predict(str(locked_server.model_root / "tiny-bert"), None, None, "a great film", 2,
                                       api_name="/predict")
    assert message == ""
    assert len(label["confidences"]) == 2
    assert not follow.done()

    assert "cancelled" in client.predict(job_id, api_name="/job_stop")
    assert "cancelled" in follow.result(timeout=60)


def test_busy_port_names_option(server, tmp_path):
    command = [sys.executable, "-m", "finetune.cli", "app", "--port", str(server.port), "--workspace", str(tmp_path / "ws"),
               "--no-scheduler"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert result.returncode == 1
    assert "Fix: pass --port with a free port" in result.stderr
