"""Past runs, continued: a run's evaluation card (and Evaluate, with progress and Stop), and its merged export
(Export, download as zip, push to the Hub). Every handler checks the admin password itself: the API runs them too."""
from __future__ import annotations

import html
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from qlora import runs
from qlora.data import SUFFIXES, DataError
from qlora.device import BusyError
from qlora.errors import message
from qlora.evaluate import EvalStopped, evaluate_run, load
from qlora.export import ExportError, export_run
from qlora.model import ModelError

from . import hub, render
from .context import LOCKED, AppContext

log = logging.getLogger("qlora.app")


def in_background(work: Callable[[Callable[[str], None]], Any], heartbeat_s: float = 0.5):
    """Run work(report) in a thread; yield ("progress", line) as it reports, then ("done", result) or ("error", e).

    A page that closes (the generator is closed) does not stop the work; callers pass a stop flag for that.
    """
    lines: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def run():
        try:
            outcome["done"] = work(lines.put)
        except BaseException as e:  # surfaced to the caller below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive() or not lines.empty():
        try:
            yield "progress", lines.get(timeout=heartbeat_s)
        except queue.Empty:
            continue
    yield ("error", outcome["error"]) if "error" in outcome else ("done", outcome.get("done"))


def make_handlers(ctx: AppContext):
    evaluating: dict[str, threading.Event] = {}  # "stop" -> the running evaluation's stop flag

    def card(run: str, admin_password: str = "") -> str:
        if not ctx.is_admin(admin_password):
            return LOCKED  # the card quotes rows of the owner's data, as the dataset preview does
        try:
            info = runs.usable_run(ctx.runs_root, run)
        except ValueError as e:
            return f"❌ {html.escape(str(e))}"
        card = load(info.path)
        if card is None and (info.path / runs.EVAL_CARD).exists():
            return f"❌ {runs.EVAL_CARD} of run {html.escape(info.name)} is not an evaluation card; press **Evaluate**"
        return render.eval_card_markdown(card)

    def evaluate(run: str, upload: str | None = None, rows: int = 0, admin_password: str = "", hf_token: str = ""):
        """Compute the card; yields (card, message) with progress while it runs."""
        if not ctx.is_admin(admin_password):
            yield gr.skip(), LOCKED
            return
        token = ctx.token(hf_token)
        try:
            info = runs.usable_run(ctx.runs_root, run)
            if upload and Path(upload).suffix.lower() not in SUFFIXES:
                raise ValueError(f"eval file: {Path(upload).name}: use a .jsonl, .json, .csv or .parquet file")
            rows = int(rows or 0)
            if rows < 0:
                raise ValueError("rows: 0 (all) or more")
        except (TypeError, ValueError) as e:
            yield gr.skip(), f"❌ {html.escape(str(e))}"
            return
        stop = evaluating["stop"] = threading.Event()

        def work(report):
            # a card taken as a run takes its cards (busy at once, saying who holds them); on chat's card (one GPU,
            # the CPU) chat's model is unloaded first, as for a run
            return evaluate_run(info.path, upload or None, rows, token,
                                progress=lambda done, total: report(f"evaluating: {done}/{total}"), stop=stop,
                                cards=ctx.jobs.cards, make_room=ctx.engines.unload_all)

        try:
            yield gr.skip(), "⏳ evaluating: loading the model…"
            for kind, value in in_background(work):
                if kind == "progress":
                    yield gr.skip(), f"⏳ {html.escape(value)} (Stop evaluation ends it; nothing is saved then)"
                elif kind == "done":
                    yield render.eval_card_markdown(value), f"✅ {html.escape(info.name)}: evaluation card saved."
                else:
                    yield gr.skip(), _failure("evaluation", value, token)
        finally:
            stop.set()  # the page went away mid-evaluation: end it too

    def stop_eval(admin_password: str = "") -> str:
        if not ctx.is_admin(admin_password):
            return LOCKED
        flag = evaluating.get("stop")
        if flag is None or flag.is_set():
            return "No evaluation is running."
        flag.set()
        return "⏹️ Stopping the evaluation after the current row; nothing is saved."

    def export(run: str, admin_password: str = "", hf_token: str = ""):
        """Merge the adapter into the base's own weights (runs/<name>/export); yields progress lines."""
        if not ctx.is_admin(admin_password):
            yield LOCKED
            return
        token = ctx.token(hf_token)
        try:
            info = runs.usable_run(ctx.runs_root, run)
        except ValueError as e:
            yield f"❌ {html.escape(str(e))}"
            return
        yield "⏳ exporting…"
        for kind, value in in_background(lambda report: export_run(info.path, token, report)):
            if kind == "progress":
                yield f"⏳ {html.escape(hub.redact(str(value), token))}"
            elif kind == "done":
                yield (f"✅ {html.escape(info.name)}: merged model in `{html.escape(runs.EXPORT)}/` of the run folder; "
                       "download it as a zip or push it below.")
            else:
                yield _failure("export", value, token)

    def download_export(run: str, admin_password: str = ""):
        if not ctx.is_admin(admin_password):
            return None, LOCKED
        try:
            info = runs.usable_run(ctx.runs_root, run)
            path = hub.zip_export(info)
        except ValueError as e:
            return None, f"❌ {html.escape(str(e))}"
        except OSError as e:
            return None, _failure("zip", e, None)
        return str(path), f"📦 {html.escape(info.name)}: merged model zip ready."

    return dict(card=card, evaluate=evaluate, stop_eval=stop_eval, export=export, download_export=download_export,
                push_export=hub.push_handler(ctx, hub.push_export, "the merged model "))


def _failure(what: str, e: BaseException, token: str | None) -> str:
    """One line for the page; the trace goes to the server log only for what we did not foresee."""
    if isinstance(e, EvalStopped):
        return f"⏹️ {html.escape(str(e))}"
    if isinstance(e, BusyError):
        return f"⏳ {html.escape(str(e))}"
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        return f"❌ disk full during the {what}; nothing half-written was kept. Free disk space and try again."
    if isinstance(e, (DataError, ExportError, ModelError, ValueError, OSError)):
        return f"❌ {html.escape(hub.redact(message(e, 500), token))}"
    log.error("%s failed", what, exc_info=e)
    return f"❌ {what} failed ({type(e).__name__}); see the server log"


def build(ctx: AppContext, run_pick, admin, token, repo, private) -> None:
    """Lay out the card and export controls under Past runs (inside its accordion) and wire their events."""
    h = make_handlers(ctx)
    with gr.Row():
        eval_file = gr.File(label="Eval file (optional: default is the run's own held-out rows)",
                            file_types=list(SUFFIXES), type="filepath", height=150, scale=2, elem_id="eval-file",
                            elem_classes=["upload-box"])  # ui/page.py keeps its label off the icon
        with gr.Column(scale=1):
            eval_rows = gr.Number(0, label="Rows (0: all)", precision=0, minimum=0, maximum=1_000_000)
            with gr.Row():
                eval_btn = gr.Button("Evaluate", elem_id="eval-btn")
                stop_btn = gr.Button("Stop evaluation", variant="stop")
    eval_message = gr.Markdown(elem_id="eval-message")
    card = gr.Markdown(elem_id="eval-card")
    with gr.Row():
        export_btn = gr.Button("Export merged model")
        download_btn = gr.Button("Download merged (.zip)")
        push_btn = gr.Button("Push merged model to the Hub repo above")
    with gr.Row():
        export_message = gr.Markdown(elem_id="export-message")
        merged_zip = gr.File(label="Merged model zip", interactive=False, height=100)

    # on the page's load and when the admin password is typed too: the picked run's card, never a blank under its name
    gr.on(None, h["card"], [run_pick, admin], card, api_visibility="private")
    gr.api(h["card"], api_name="eval_card", queue=False)
    eval_btn.click(h["evaluate"], inputs_kwargs=dict(run=run_pick, upload=eval_file, rows=eval_rows,
                                                     admin_password=admin, hf_token=token),
                   outputs=[card, eval_message], api_name="evaluate", concurrency_id="evaluate", concurrency_limit=1)
    stop_btn.click(h["stop_eval"], inputs_kwargs=dict(admin_password=admin), outputs=eval_message,
                   api_name="stop_eval", queue=False)
    export_btn.click(h["export"], inputs_kwargs=dict(run=run_pick, admin_password=admin, hf_token=token),
                     outputs=export_message, api_name="export", concurrency_id="export", concurrency_limit=1)
    download_btn.click(h["download_export"], inputs_kwargs=dict(run=run_pick, admin_password=admin),
                       outputs=[merged_zip, export_message], api_name="download_export", concurrency_id="export",
                       concurrency_limit=1)
    push_btn.click(h["push_export"], inputs_kwargs=dict(run=run_pick, repo_id=repo, private=private, hf_token=token,
                                                        admin_password=admin),
                   outputs=export_message, api_name="push_export")
