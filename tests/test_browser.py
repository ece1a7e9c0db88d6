"""The app driven in headless Chromium (Debian's /usr/bin/chromium through Playwright): fill the form, launch,
watch progress and curves, stop, resume, then try the model with a typed text and an uploaded image.

Screenshots of each step go to test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from test_webapp import AppServer, make_reviews_csv, make_tiny_bert

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def make_tiny_vit(folder: Path) -> Path:
    """Save a random 1-layer ViT image classifier (32x32 inputs, labels cat/dog/bird) with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["cat", "dog", "bird"]
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37, id2label=dict(enumerate(labels)),
                       label2id={label: index for index, label in enumerate(labels)})
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    make_reviews_csv(root / "data" / "reviews.csv", rows=40)
    make_tiny_bert(root / "models" / "tiny-bert")
    make_tiny_vit(root / "models" / "tiny-vit")
    app = AppServer(root)
    app.wait_ready()
    yield app
    app.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
        context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=True)


def fill_field(page, element_id: str, value: str) -> None:
    field = page.locator(f"#{element_id}").locator("input, textarea").first
    field.fill(value)
    field.press("Tab")  # blur, so Gradio sends the `input` event that syncs the YAML editor


def choose(page, element_id: str, option_text: str) -> None:
    page.locator(f"#{element_id}").locator("input").first.click()
    page.get_by_role("option", name=re.compile(re.escape(option_text))).first.click()


def expect_text(page, element_id: str, pattern: str, timeout_s: float = 60) -> None:
    playwright_api.expect(page.locator(f"#{element_id}")).to_contain_text(re.compile(pattern), timeout=timeout_s * 1000)


def test_train_stop_resume_try(server, page):
    page.goto(server.url)
    fill_field(page, "field-name", "browser-run")
    choose(page, "field-model-name-or-path", "tiny-bert")
    fill_field(page, "field-data-train", str(server.data_root / "reviews.csv"))
    fill_field(page, "field-training-learning-rate", "0.001")
    fill_field(page, "field-training-num-train-epochs", "40")
    fill_field(page, "field-training-per-device-train-batch-size", "4")
    choose(page, "field-training-mixed-precision", "no")
    expect_text(page, "yaml-editor", r"num_train_epochs: 40")
    expect_text(page, "yaml-editor", r"tiny-bert")
    expect_text(page, "yaml-editor", r"mixed_precision: 'no'")
    # Keys without a form field are typed into the YAML editor; `training` is its last section.
    page.locator("#yaml-editor .cm-content").click()
    page.keyboard.press("Control+End")
    page.keyboard.press("Enter")
    page.keyboard.type("logging_steps: 1")
    expect_text(page, "yaml-editor", r"logging_steps: 1")

    page.locator("#validate").click()
    expect_text(page, "train-status", "The config is valid")
    playwright_api.expect(page.locator("#schedule-plot img")).to_be_visible()
    shot(page, "1-train-form")

    # 40 epochs of 8 steps keep the job running long enough to be stopped. A short job could finish
    # between the progress check and the click on Stop.
    page.locator("#launch").click()
    expect_text(page, "train-status", r"Job \*?\*?1")
    page.get_by_role("tab", name="Jobs").click()
    expect_text(page, "job-status", r"running · step [1-9]\d*/\d+", timeout_s=180)
    playwright_api.expect(page.locator("#job-curves img")).to_be_visible(timeout=60_000)
    shot(page, "2-job-running")

    page.locator("#job-stop").click()
    expect_text(page, "job-action-status", "Stop requested")
    expect_text(page, "job-status", "— stopped", timeout_s=120)
    shot(page, "3-job-stopped")

    page.locator("#job-resume").click()
    expect_text(page, "job-action-status", "queued again")
    expect_text(page, "job-status", "— completed", timeout_s=300)
    expect_text(page, "job-log", r"\S")
    shot(page, "4-job-completed")

    page.locator("#job-download").click()
    expect_text(page, "job-export-zip", r"job-1-export\s*\.zip")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-refresh").click()
    expect_text(page, "leaderboard", "browser-run")
    shot(page, "4b-compare")

    page.get_by_role("tab", name="Try").click()
    choose(page, "try-model-a", "job 1")
    fill_field(page, "try-text", "the film was very good")
    page.locator("#try-predict").click()
    expect_text(page, "try-label-a", r"pos|neg")
    shot(page, "5-try-text")

    page.locator("#try-analyse").click()
    playwright_api.expect(page.locator("#try-confusion img")).to_be_visible()
    shot(page, "6-try-confusion")

    model_input = page.locator("#try-model-a input").first
    model_input.fill(str(server.model_root / "tiny-vit"))
    model_input.press("Enter")
    image = ARTIFACTS / "browser-upload.png"
    make_png(image)
    page.locator("#try-image input[type=file]").set_input_files(str(image))
    page.locator("#try-predict").click()
    expect_text(page, "try-label-a", r"cat|dog|bird")
    shot(page, "7-try-image")


def make_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (48, 40), (200, 80, 40)).save(path)
    return path


@pytest.fixture(scope="module")
def finished_job(server) -> str:
    """Launch a tiny job named `to-delete` through the API and return its id once it has ended."""
    from gradio_client import Client

    from test_webapp import job_id_from, tiny_job_yaml

    client = Client(server.url, verbose=False)
    text = tiny_job_yaml(server.model_root / "tiny-bert", server.data_root / "reviews.csv", name="to-delete")
    job_id = job_id_from(client.predict(text, api_name="/launch")[-2])
    # A running job cannot be deleted; job_follow returns once the tiny job has ended.
    client.predict(job_id, api_name="/job_follow")
    return job_id


def test_edit_as_new_fills_train_tab(server, page, finished_job):
    page.goto(server.url)
    page.get_by_role("tab", name="Jobs").click()
    choose(page, "job-select", "to-delete")
    page.locator("#job-edit").click()
    expect_text(page, "yaml-editor", r"name: to-delete")
    playwright_api.expect(page.locator("#field-name").locator("input, textarea").first).to_have_value("to-delete")
    playwright_api.expect(page.locator("#yaml-editor")).not_to_contain_text("run_dir")
    shot(page, "8-edit-as-new")


def test_delete_needs_confirmation(server, page, finished_job):
    job_id = finished_job
    page.goto(server.url)
    page.get_by_role("tab", name="Jobs").click()
    choose(page, "job-select", "to-delete")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator("#job-delete").click()
    expect_text(page, "job-action-status", f"Job {job_id} was not deleted")
    assert (server.workspace / "runs" / job_id).exists()

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#job-delete").click()
    expect_text(page, "job-action-status", f"Job {job_id} and its run folder deleted")
    shot(page, "9-job-deleted")
    assert not (server.workspace / "runs" / job_id).exists()
