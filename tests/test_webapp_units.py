"""The app's logic without a server: path roots, uploads, logins, form <-> YAML sync, schedule stages, plots."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from finetune.config import describe_options
from finetune.webapp import configform, plots
from finetune.webapp.security import (
    PathNotAllowed, UploadRejected, load_auth, looks_like_hub_id, resolve_inside, resolve_model_reference,
    store_upload,
)
from finetune.webapp.settings import AppSettings, parse_settings


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "train.csv").write_text("text,label\na,b\n")
    return root


def test_resolve_relative_inside(roots):
    assert resolve_inside("sub/train.csv", [roots]) == (roots / "sub" / "train.csv").resolve()


def test_resolve_absolute_inside(roots):
    path = roots / "sub" / "train.csv"
    assert resolve_inside(str(path), [roots]) == path.resolve()


def test_resolve_rejects_dotdot(roots):
    with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
        resolve_inside("sub/../../secret.csv", [roots])


def test_resolve_rejects_absolute_outside(roots):
    with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
        resolve_inside("/etc/passwd", [roots])


def test_resolve_rejects_symlink_out(roots, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("x")
    (roots / "link.csv").symlink_to(secret)
    with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
        resolve_inside("link.csv", [roots])


def test_resolve_rejects_symlinked_folder_out(roots, tmp_path):
    (tmp_path / "outside").mkdir()
    (roots / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(PathNotAllowed):
        resolve_inside("linked/file.csv", [roots])


def test_resolve_accepts_symlink_inside(roots):
    (roots / "alias.csv").symlink_to(roots / "sub" / "train.csv")
    assert resolve_inside("alias.csv", [roots]) == (roots / "sub" / "train.csv").resolve()


def test_resolve_rejects_empty(roots):
    with pytest.raises(PathNotAllowed, match="empty"):
        resolve_inside("  ", [roots])


def test_resolve_rejects_sibling_prefix(tmp_path):
    # /x/data2 shares the prefix "/x/data" as text but is not inside /x/data.
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    with pytest.raises(PathNotAllowed):
        resolve_inside(str(tmp_path / "data2"), [tmp_path / "data"])


@pytest.mark.parametrize("text, expected", [
    ("bert-base-uncased", True),
    ("google/vit-base-patch16-224", True),
    ("/models/bert", False),
    ("./bert", False),
    ("../x", False),
    ("~/bert", False),
    ("a/b/c", False),
])
def test_hub_id_detection(text, expected):
    assert looks_like_hub_id(text) is expected


def test_model_reference_hub_id_passes(roots):
    assert resolve_model_reference("google/vit-base-patch16-224", [roots]) == "google/vit-base-patch16-224"


def test_model_reference_local_folder(roots):
    assert resolve_model_reference("sub", [roots]) == str((roots / "sub").resolve())


def test_model_reference_outside_rejected(roots):
    with pytest.raises(PathNotAllowed):
        resolve_model_reference("/usr/lib", [roots])


def test_upload_over_limit_names_limit(tmp_path):
    source = tmp_path / "big.csv"
    source.write_bytes(b"x" * (2 * 2**20))
    with pytest.raises(UploadRejected, match="limit of 1 MiB"):
        store_upload(source, tmp_path / "uploads", max_bytes=2**20)
    assert not (tmp_path / "uploads").exists()


def test_upload_wrong_kind_rejected(tmp_path):
    source = tmp_path / "script.sh"
    source.write_text("echo hi")
    with pytest.raises(UploadRejected, match="must be one of"):
        store_upload(source, tmp_path / "uploads", max_bytes=2**20)


def test_upload_table_stored(tmp_path):
    source = tmp_path / "my data.csv"
    source.write_text("text,label\na,b\n")
    stored = store_upload(source, tmp_path / "uploads", max_bytes=2**20)
    assert stored.name == "my_data.csv"
    assert stored.read_text() == "text,label\na,b\n"


def test_upload_zip_extracts_image_folder(tmp_path):
    source = tmp_path / "pets.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("pets/cat/1.png", b"png")
        archive.writestr("pets/dog/1.png", b"png")
    stored = store_upload(source, tmp_path / "uploads", max_bytes=2**20)
    assert stored.name == "pets"
    assert sorted(path.name for path in stored.iterdir()) == ["cat", "dog"]


def test_upload_zip_slip_rejected(tmp_path):
    source = tmp_path / "evil.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("../evil.txt", b"x")
    with pytest.raises(UploadRejected, match="outside the archive"):
        store_upload(source, tmp_path / "uploads", max_bytes=2**20)
    assert not (tmp_path / "evil.txt").exists()


def test_upload_zip_bomb_rejected(tmp_path):
    source = tmp_path / "bomb.zip"
    with zipfile.ZipFile(source, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/b/zeros.png", b"\0" * (3 * 2**20))
    assert source.stat().st_size < 2**20
    with pytest.raises(UploadRejected, match="expands to 3.0 MiB"):
        store_upload(source, tmp_path / "uploads", max_bytes=2**20)


def test_auth_from_file(tmp_path):
    path = tmp_path / "users"
    path.write_text("# logins\nalice:one\nbob:two:with-colon\n")
    assert load_auth(str(path), None) == [("alice", "one"), ("bob", "two:with-colon")]


def test_auth_from_env():
    assert load_auth(None, "alice:secret") == [("alice", "secret")]


def test_auth_malformed_rejected():
    with pytest.raises(ValueError, match="user:password"):
        load_auth(None, "no-colon")


def test_auth_none_by_default():
    assert load_auth(None, None) is None


def test_settings_bind_loopback_by_default(monkeypatch):
    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    settings = parse_settings([])
    assert settings.host == "127.0.0.1"
    assert settings.run_scheduler is True


def test_missing_roots_warned(tmp_path, finetune_records):
    from finetune.webapp import warn_missing_roots

    (tmp_path / "data").mkdir()
    settings = AppSettings(
        workspace=tmp_path / "ws", data_roots=[tmp_path / "data", tmp_path / "dta"], model_roots=[tmp_path / "models"]
    )
    warn_missing_roots(settings)
    messages = [record.getMessage() for record in finetune_records if record.levelname == "WARNING"]
    assert messages == [
        f"--data-root {tmp_path / 'dta'} is not a folder. Fix: check the path; no file can be read from it until it exists.",
        f"--model-root {tmp_path / 'models'} is not a folder. Fix: check the path; no file can be read from it until it exists.",
    ]


def test_settings_upload_limit_bytes(monkeypatch, tmp_path):
    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    settings = parse_settings(["--max-upload-mb", "2", "--workspace", str(tmp_path), "--no-scheduler"])
    assert settings.max_upload_bytes == 2 * 2**20
    assert settings.run_scheduler is False
    assert settings.upload_dir in settings.all_data_roots()


def test_form_fields_use_schema_text():
    docs = {doc.key: doc for doc in describe_options()}
    for field in configform.form_fields():
        assert field.doc.description == docs[field.doc.key].description
    kinds = {field.doc.key: field.kind for field in configform.form_fields()}
    assert kinds["schedule.preset"] == "choice"
    assert kinds["training.num_train_epochs"] == "int"
    assert kinds["training.learning_rate"] == "float"


def test_form_to_yaml_keeps_other_keys():
    text = "task: text-classification\ndata:\n  train: a.csv\n  text_column: review\n"
    values = [None] * len(configform.FORM_KEYS)
    values[configform.FORM_KEYS.index("training.num_train_epochs")] = 4.0
    raw = configform.parse_yaml(configform.form_to_yaml(text, values))
    assert raw["data"]["text_column"] == "review"
    assert raw["training"]["num_train_epochs"] == 4
    assert isinstance(raw["training"]["num_train_epochs"], int)


def test_yaml_to_form_reads_values():
    values = configform.yaml_to_form("schedule:\n  preset: gradual\ntraining:\n  learning_rate: 3.0e-5\n")
    assert values[configform.FORM_KEYS.index("schedule.preset")] == "gradual"
    assert values[configform.FORM_KEYS.index("training.learning_rate")] == 3e-5


def test_yaml_to_form_bad_yaml_keeps_form():
    assert configform.yaml_to_form("task: [unclosed") is None


def test_check_lists_schema_and_path_issues(tmp_path):
    settings = AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"])
    text = "task: text-classification\nmodel:\n  name_or_path: /usr/lib\ndata:\n  train: /etc/passwd\n" \
           "training:\n  num_train_epochs: 0\noutput:\n  run_dir: /tmp/x\n"
    config, issues = configform.check(text, settings)
    assert config is None
    keys = sorted(issue.key for issue in issues)
    assert keys == ["data.train", "model.name_or_path", "output.run_dir", "training.num_train_epochs"]


def test_validate_draws_edited_schedule(tmp_path):
    # The picture must show the editor's learning rate and epochs, not those of an empty config.
    from finetune.webapp.train_tab import validation_outputs

    settings = AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\na,b\n")
    text = "task: text-classification\nmodel:\n  name_or_path: bert-base-uncased\ndata:\n  train: train.csv\n" \
           "training:\n  learning_rate: 0.001\n  num_train_epochs: 40\n"
    figure = validation_outputs(text, settings, len(configform.FORM_KEYS))[-1]
    axes = figure.axes[0]
    assert axes.get_xlim() == (0.0, 40.0)
    assert axes.texts[-1].get_text() == "1.0e-03"


HUB_CONFIG = "task: text-classification\nmodel:\n  name_or_path: bert-base-uncased\ndata:\n  format: hub\n  train: {}\n"


@pytest.mark.parametrize("train", ["/etc", "./secret", "../secret", "~/secret", "runs"])
def test_check_hub_format_rejects_paths(tmp_path, train):
    settings = AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"])
    (settings.workspace / "runs").mkdir(parents=True)
    config, issues = configform.check(HUB_CONFIG.format(train), settings)
    assert config is None
    assert [issue.key for issue in issues] == ["data.train"]


@pytest.mark.parametrize("train", ["imdb", "stanfordnlp/imdb", "stanfordnlp/imdb:test"])
def test_check_hub_format_accepts_names(tmp_path, train):
    settings = AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"])
    config, issues = configform.check(HUB_CONFIG.format(train), settings)
    assert issues == []
    assert config.data.train == train


def test_issues_split_by_field():
    from finetune.config import ConfigIssue

    by_field, others = configform.issues_by_field(
        [ConfigIssue("training.learning_rate", -1, "bad."), ConfigIssue("data.text_column", "", "empty.")]
    )
    assert list(by_field) == ["training.learning_rate"]
    assert others == ["`data.text_column`: empty."]


GROUPS = ["embeddings", "layer.0", "layer.1", "head"]


def test_plan_full_one_stage():
    stages, unit = plots.plan_stages({"preset": "full"}, {"num_train_epochs": 3}, GROUPS)
    assert unit == "epoch"
    assert [(s.start, s.end, s.trainable) for s in stages] == [(0, 3.0, tuple(GROUPS))]


def test_plan_freeze_then_unfreeze():
    stages, _ = plots.plan_stages({"preset": "freeze_then_unfreeze", "freeze_epochs": 1}, {"num_train_epochs": 3}, GROUPS)
    assert [(s.start, s.end, s.trainable) for s in stages] == [(0, 1.0, ("head",)), (1.0, 3.0, tuple(GROUPS))]


def test_plan_gradual_adds_one_group_per_epoch():
    stages, _ = plots.plan_stages({"preset": "gradual", "unfreeze_every_epochs": 1}, {"num_train_epochs": 5}, GROUPS)
    assert [s.trainable for s in stages] == [("head",), ("layer.1", "head"), ("layer.0", "layer.1", "head"), tuple(GROUPS)]
    assert [(s.start, s.end) for s in stages] == [(0, 1), (1, 2), (2, 3), (3, 5)]


def test_plan_gradual_stops_at_last_epoch():
    stages, _ = plots.plan_stages({"preset": "gradual", "unfreeze_every_epochs": 1}, {"num_train_epochs": 2}, GROUPS)
    assert [s.trainable for s in stages] == [("head",), ("layer.1", "head")]


def test_plan_gradual_in_steps():
    stages, unit = plots.plan_stages({"preset": "gradual", "unfreeze_every_steps": 50}, {}, GROUPS)
    assert unit == "step"
    assert [(s.start, s.end) for s in stages] == [(0, 50), (50, 100), (100, 150), (150, 200)]


def test_plan_milestones():
    schedule = {"preset": "milestones", "stages": [
        {"until_epoch": 2, "train": "head"}, {"until_epoch": 3, "train": "top:1", "learning_rate": 1e-4}, {"train": "all"},
    ]}
    stages, _ = plots.plan_stages(schedule, {"num_train_epochs": 4, "learning_rate": 5e-5}, GROUPS)
    assert [(s.start, s.end) for s in stages] == [(0, 2), (2, 3), (3, 4)]
    assert stages[1].trainable == ("layer.1", "head")
    assert stages[1].learning_rate == 1e-4


def test_plan_rejects_unknown_group():
    schedule = {"preset": "milestones", "stages": [{"until_epoch": 2, "train": "nothing*"}, {"train": "all"}]}
    with pytest.raises(ValueError, match="names no layer group"):
        plots.plan_stages(schedule, {"num_train_epochs": 3}, GROUPS)


def test_group_rates_layer_decay():
    rates = plots.group_rates(GROUPS, 1e-3, layer_decay=0.5, head_multiplier=10)
    assert rates == {"head": 1e-2, "layer.1": 1e-3, "layer.0": 5e-4, "embeddings": 2.5e-4}


def test_curves_figure_marks_stages():
    events = [
        {"event": "stage", "step": 0, "stage": 0, "name": "head"},
        {"event": "train", "step": 1, "loss": 0.7, "learning_rate": 1e-3},
        {"event": "stage", "step": 2, "stage": 1, "name": "all"},
        {"event": "train", "step": 3, "loss": 0.6, "learning_rate": 5e-4},
        {"event": "eval", "split": "validation", "step": 3, "loss": 0.65, "accuracy": 0.75},
    ]
    figure = plots.curves_figure({"run": events})
    loss_axes = figure.axes[0]
    assert len(loss_axes.lines) == 3  # train loss, validation loss, one stage boundary at step 2


def test_curves_figure_names_empty_panels():
    events = [{"event": "train", "step": 1, "loss": 0.7, "learning_rate": 1e-3}]
    figure = plots.curves_figure({"run": events})
    notes = [[text.get_text() for text in axes.texts] for axes in figure.axes]
    assert notes == [[], ["no validation yet"], []]


def test_curves_figure_without_events():
    figure = plots.curves_figure({"run": []})
    notes = [[text.get_text() for text in axes.texts] for axes in figure.axes]
    assert notes == [["no loss logged yet"], ["no validation yet"], ["no learning rate logged yet"]]


def test_confusion_figure_counts():
    figure = plots.confusion_figure(["a", "a", "b"], ["a", "b", "b"], ["a", "b"])
    texts = sorted(text.get_text() for text in figure.axes[0].texts)
    assert texts == ["0", "1", "1", "1"]


def test_log_lines_drop_progress_redraws():
    from finetune.webapp.runs import clean_log_lines

    text = "start\ntraining:  10%|#  | 1/10\rtraining:  20%|## | 2/10\r\n\x1b[1mbold\x1b[0m end\n"
    assert clean_log_lines(text) == ["start", "training:  20%|## | 2/10", "bold end", ""]


def test_form_numbers_accept_out_of_range(tmp_path):
    import gradio as gr

    from finetune.webapp import build_app

    settings = AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"])
    app = build_app(settings)
    numbers = {block.elem_id: block for block in app.blocks.values() if isinstance(block, gr.Number)}
    # Out-of-range values must reach the YAML, where validation names them next to their field.
    assert numbers["field-training-learning-rate"].preprocess(-1.0) == -1.0
    assert numbers["field-training-num-train-epochs"].preprocess(0) == 0


def test_try_model_change_clears_results(tmp_path):
    from finetune.webapp import build_app

    app = build_app(AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"]))
    elem_ids = {block._id: block.elem_id for block in app.blocks.values()}
    cleared = set()
    for dependency in app.config["dependencies"]:
        if ("try-model-a", "change") in [(elem_ids.get(target), event) for target, event in dependency["targets"]]:
            cleared.update(elem_ids.get(output) for output in dependency["outputs"])
    # A new model choice must not leave the previous model's prediction or validation errors on screen.
    assert "try-label-a" in cleared
    assert "try-confusion" in cleared
    assert "try-texts" in cleared
    assert "try-gallery" in cleared


def test_form_sync_keeps_last_keystroke(tmp_path):
    from finetune.webapp import build_app

    app = build_app(AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"]))
    elem_ids = {block._id: block.elem_id for block in app.blocks.values()}
    modes = {}
    for dependency in app.config["dependencies"]:
        for target, event in dependency["targets"]:
            if event == "input" and str(elem_ids.get(target)).startswith("field-"):
                modes[elem_ids[target]] = dependency["trigger_mode"]
    # With "once", a keystroke typed while the previous sync is pending never reaches the YAML.
    assert len(modes) == len(configform.FORM_KEYS)
    assert set(modes.values()) == {"always_last"}


def test_edit_as_new_revalidates(tmp_path):
    import gradio as gr

    from finetune.webapp import build_app

    app = build_app(AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"]))
    elem_ids = {block._id: block.elem_id for block in app.blocks.values()}
    dependencies = app.config["dependencies"]
    edit = next(
        dependency for dependency in dependencies
        if ("job-edit", "click") in [(elem_ids.get(target), event) for target, event in dependency["targets"]]
    )
    followers = [dependency for dependency in dependencies if dependency.get("trigger_after") == edit["id"]]
    redrawn = {elem_ids.get(output) for dependency in followers for output in dependency["outputs"]}
    # The launch message, field errors and schedule picture of the previous config must not stay on screen.
    assert "train-status" in redrawn
    assert "schedule-plot" in redrawn
    assert "field-data-train-error" in redrawn
    # Without a copied config (no job selected), the Train tab is left alone.
    validate_copy = app.fns[followers[0]["id"]].fn
    assert validate_copy(None) == [gr.skip()] * len(followers[0]["outputs"])


@pytest.mark.parametrize("status, label", [("failed", "Failure"), ("stopped", "Note")])
def test_job_status_labels_reason(status, label):
    from finetune.webapp.jobs_tab import status_text
    from finetune.webapp.service import JobView

    job = JobView(
        id="3", name="run", status=status, run_dir=Path("runs/3"), created_at=0.0, step=0, total_steps=None,
        epoch=None, stage="", eta_seconds=None, best=None, metric="accuracy", failure_reason="killed with SIGKILL",
    )
    assert status_text(job) == f"**job 3** `run` — **{status}**\n\n**{label}:** killed with SIGKILL"


def test_queued_job_status_has_no_epoch():
    from finetune.webapp.jobs_tab import status_text
    from finetune.webapp.service import JobView

    job = JobView(
        id="4", name="waiting", status="queued", run_dir=Path("runs/4"), created_at=0.0, step=0, total_steps=None,
        epoch=0.0, stage="", eta_seconds=None, best=None, metric="accuracy", failure_reason="",
    )
    assert status_text(job) == "**job 4** `waiting` — **queued**"


def test_jobs_view_keeps_deleted_selection(tmp_path):
    from finetune.webapp.jobs_tab import refresh_view
    from finetune.webapp.service import JobService

    service = JobService(AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"]))
    config = "task: text-classification\nmodel:\n  name_or_path: bert-base-uncased\ndata:\n  train: train.csv\n"
    older = service.workspace.submit(config, name="older")
    chosen = service.workspace.submit(config, name="chosen")
    service.workspace.cancel(chosen.id)
    service.workspace.delete(chosen.id)
    rows, selector, status, log, figure, drawn = refresh_view(service, str(chosen.id), None)
    # Selecting another job here would aim Stop and Delete at a job the user never chose.
    assert selector["value"] == str(chosen.id)
    assert status == f"Job {chosen.id} no longer exists (it was deleted); select another job."
    assert [row[0] for row in rows] == [str(older.id)]
    assert figure is None


def test_jobs_refresh_leaves_pick_alone(tmp_path):
    from finetune.webapp.jobs_tab import refresh_view
    from finetune.webapp.service import JobService

    service = JobService(AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"]))
    config = "task: text-classification\nmodel:\n  name_or_path: bert-base-uncased\ndata:\n  train: train.csv\n"
    first = service.workspace.submit(config, name="first")
    newest = service.workspace.submit(config, name="newest")
    # A refresh for the current pick sends no value, so a pick made while it ran is not reverted.
    selector = refresh_view(service, str(first.id), None)[1]
    assert "value" not in selector
    assert [choice[1] for choice in selector["choices"]] == [str(newest.id), str(first.id)]
    # With no pick yet, the newest job is selected.
    assert refresh_view(service, None, None)[1]["value"] == str(newest.id)


def write_png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


IMAGE_CONFIG = "task: image-classification\nmodel:\n  name_or_path: google/vit-base-patch16-224\ndata:\n  train: {}\n"


@pytest.mark.parametrize("listed", ["inside", "outside"])
def test_check_image_csv_paths(tmp_path, listed):
    settings = AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"])
    image = write_png(tmp_path / ("data" if listed == "inside" else "secret") / "a.png")
    table = tmp_path / "data" / "images.csv"
    table.parent.mkdir(exist_ok=True)
    table.write_text(f"image,label\n{image},x\n{image},y\n")
    config, issues = configform.check(IMAGE_CONFIG.format(table), settings)
    if listed == "inside":
        assert issues == []
    else:
        assert config is None
        assert [issue.key for issue in issues] == ["data.train"]
        assert str(image) in issues[0].message


def test_check_image_folder_symlink_out(tmp_path):
    settings = AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"])
    write_png(tmp_path / "data" / "images" / "cat" / "a.png")
    (tmp_path / "data" / "images" / "dog").mkdir()
    (tmp_path / "data" / "images" / "dog" / "b.png").symlink_to(write_png(tmp_path / "secret" / "b.png"))
    config, issues = configform.check(IMAGE_CONFIG.format(tmp_path / "data" / "images"), settings)
    assert config is None
    assert [issue.key for issue in issues] == ["data.train"]


def test_log_record_not_glued_to_progress_bar():
    import subprocess
    import sys

    from finetune.webapp.runs import clean_log_lines

    script = (
        "from tqdm import tqdm\n"
        "from finetune.log import get_logger, setup_logging\n"
        "setup_logging()\n"
        "bar = tqdm(total=4, desc='training')\n"
        "bar.update(2)\n"
        "get_logger('finetune.demo').info('validation done')\n"
        "bar.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = clean_log_lines(result.stderr)
    records = [line for line in lines if "validation done" in line]
    # The job's log tail shows each record on its own line, not after the bar's last redraw.
    assert len(records) == 1
    assert records[0].endswith(" INFO finetune.demo: validation done")
    assert not records[0].startswith("training")


UNKNOWN_JOB = "99"


@pytest.fixture
def empty_service(tmp_path):
    from finetune.webapp.service import JobService

    return JobService(AppSettings(workspace=tmp_path / "ws", data_roots=[tmp_path / "data"]))


def test_zip_unknown_job_names_id(empty_service):
    from finetune.webapp.jobs_tab import zip_job_export

    path, message = zip_job_export(empty_service, empty_service.settings, UNKNOWN_JOB)
    assert path is None
    assert message.startswith(f"**Error:** job {UNKNOWN_JOB} not found")


def test_compare_unknown_job_raises_gradio_error(empty_service):
    import gradio as gr

    from finetune.webapp.compare_tab import compare_runs

    with pytest.raises(gr.Error, match=f"job {UNKNOWN_JOB} not found"):
        compare_runs(empty_service, UNKNOWN_JOB, UNKNOWN_JOB)


def test_analyse_unknown_job_names_id(empty_service):
    from finetune.webapp.try_tab import analyse_job

    *_, message = analyse_job(empty_service, empty_service.settings, f"job:{UNKNOWN_JOB}")
    assert message.startswith(f"**Error:** job {UNKNOWN_JOB} not found")


def test_try_error_names_job_not_value(empty_service):
    from finetune.webapp.try_tab import predict_pair

    *_, notes = predict_pair(empty_service.settings, empty_service, None, f"job:{UNKNOWN_JOB}", None, None, "a text", 1)
    assert notes.startswith(f"**Error:** job {UNKNOWN_JOB}: ")
    assert "job:" not in notes


def test_delete_removes_download_zip(empty_service):
    from finetune.webapp.service import export_zip_path

    config = "task: text-classification\nmodel:\n  name_or_path: bert-base-uncased\ndata:\n  train: train.csv\n"
    job = empty_service.workspace.submit(config, name="zipped")
    empty_service.workspace.cancel(job.id)
    zip_path = export_zip_path(empty_service.settings, str(job.id))
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    zip_path.write_bytes(b"PK")
    empty_service.delete(str(job.id))
    assert not zip_path.exists()
