"""The Gradio app: train a QLoRA adapter, then chat with the base and the fine-tuned model side by side.

    python app.py                  # offline, CPU: the embedded smollm2-135m on the built-in sample
    python app.py --share          # a public link (set QLORA_ADMIN_PASSWORD first: only the admin may train)
    python app.py --host 0.0.0.0 --port 7860 --runs-dir /data/runs

Thin on purpose: widgets -> TrainConfig -> qlora.jobs / qlora.chat -> widgets. The job lives on the server, so a
reloaded page or a second browser sees the same run. The pieces are in ui/.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import gradio as gr

from qlora import device, runs
from qlora.events import JobState
from qlora.jobs import JobManager
from ui import chat, page, render, training
from ui.chat import adapter_dropdown
from ui.context import ADMIN_ENV, AppContext
from ui.hub import redact

log = logging.getLogger("qlora.app")

MAX_FILE_SIZE = "100mb"  # uploads; the data loader has its own 200 MB cap for files on disk
TICK_S = 1.0


def default_runs_root() -> Path:
    """/data/runs on a Space with persistent storage, ./runs elsewhere."""
    data = Path("/data")
    return data / "runs" if data.is_dir() and os.access(data, os.W_OK) else Path("runs")


def build_demo(jobs: JobManager | None = None, runs_root: str | Path | None = None,
               admin_password: str | None = None, defaults: dict[str, Any] | None = None) -> gr.Blocks:
    """The whole app. Tests pass their own JobManager and runs folder; the admin password defaults to the env."""
    runs_root = Path(runs_root) if runs_root else default_runs_root()
    for done in runs.recover_all(runs_root):  # start-up: what a killed earlier process left in the runs folder
        log.info("recovered run %s", done)
    cuda = device.cuda_available()
    gpu_problem = device.unusable_gpu(cuda)
    if gpu_problem:
        log.warning("%s", gpu_problem)
    ctx = AppContext(jobs=jobs or JobManager(), runs_root=runs_root,
                     admin_password=admin_password if admin_password is not None else os.environ.get(ADMIN_ENV))
    defaults = defaults or training.form_defaults(cuda)
    # delete_cache: uploaded files are served to anyone holding their URL, so they do not outlive a few hours.
    with gr.Blocks(title="QLoRA fine-tune and chat", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown("# QLoRA fine-tune & compare\nTrain a LoRA adapter on a 4-bit base, then ask the base and the "
                    "fine-tuned model the same question side by side.")
        banner = page_banner(runs_root, ctx.locked, gpu_problem)
        if banner:
            gr.Markdown(banner, elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Training", id="training"):
                t = training.build(ctx, defaults)
            with gr.Tab("Chat", id="chat") as chat_tab:
                c = chat.build(ctx)
        chat_tab.select(**c["prepare"], api_visibility="private")  # the model loads while the visitor types

        # The page polls the server-side job: a reload or a second browser re-attaches to the same run.
        last = gr.State("")  # this page's last rendered version, so unchanged ticks send nothing

        def tick(seen: str, current_adapter: str | None, answer: str | None = None):
            """The job as it is now; `answer`: Train's or Resume's reply, shown in the same update as the job."""
            s = ctx.jobs.state()
            version = f"{s.status}:{s.step}:{len(s.logs)}:{len(s.samples)}:{len(s.eval_losses)}"
            # The message under the buttons answers the last click ("Started", "Stopping", "Busy"); once the job it
            # spoke of has ended it is stale, and the status line says how it ended.
            if answer is None:
                message = "" if not s.active and version != seen else gr.skip()
            else:  # a start whose job has already ended (it failed at once) is not announced
                message = "" if answer.startswith(training.STARTED) and not s.active else answer
            if version == seen:
                return (gr.skip(),) * 8 + (message, seen)
            finished = seen.split(":")[0] in ("", "starting", "running", "stopping") and not s.active
            # Past runs and adapter lists change only when a run ends (or on this page's first render).
            lists = ((render.runs_frame(runs_root), adapter_dropdown(runs_root, _newest(s, current_adapter)),
                      adapter_dropdown(runs_root, _newest(s, None)))
                     if finished or not seen else (gr.skip(),) * 3)
            return (render.progress_html(s), render.status_markdown(s), render.loss_frame(s), render.log_tail(s),
                    render.samples_markdown(s), *lists, message, version)

        outputs = [t["progress"], t["status"], t["plot"], t["logs"], t["samples"], t["runs"], c["adapter"],
                   t["run_pick"], t["message"], last]
        timer = gr.Timer(TICK_S)
        timer.tick(tick, [last, c["adapter"]], outputs, queue=False, api_visibility="private", show_progress="hidden")
        demo.load(tick, [gr.State(""), c["adapter"]], outputs, queue=False, api_visibility="private")
        for started in (t["start_event"], t["resume_event"]):  # the answer and the new job at once, in one update
            started.then(lambda answer, seen, adapter: tick(seen, adapter, answer), [t["answer"], last, c["adapter"]],
                         outputs, queue=False, api_visibility="private", show_progress="hidden")
        t["refresh"].click(lambda cur: (render.runs_frame(runs_root), adapter_dropdown(runs_root, cur)),
                           t["run_pick"], [t["runs"], t["run_pick"]], queue=False, api_visibility="private")
    # One GPU: one training start at a time; chat has its own, higher limit (ui/chat.py: the engine batches visitors).
    # A bounded queue answers "full" instead of piling up.
    demo.queue(default_concurrency_limit=1, max_size=20)
    demo.ctx = ctx  # tests reach the server-side state through this
    return demo


def _newest(s: JobState, current: str | None) -> str | None:
    """After a run ends, offer its adapter in Chat; otherwise keep what the user picked."""
    return Path(s.run_dir).name if s.status in ("finished", "stopped") and s.run_dir else current


def page_banner(runs_root: Path, locked: bool, gpu_problem: str = "") -> str:
    """What the page header warns about: a GPU torch cannot use, storage that does not last, an open app."""
    lines = [f"⚠️ {gpu_problem}"] if gpu_problem else []
    on_space = bool(os.environ.get("SPACE_ID"))
    if on_space and not str(runs_root.absolute()).startswith("/data"):
        lines.append("⚠️ No persistent storage: runs and adapters are lost when the Space restarts. Download or "
                     "push adapters you want to keep.")
    if on_space and not locked:
        lines.append(f"⚠️ No admin password ({ADMIN_ENV}): anyone with this page can start training.")
    return "\n\n".join(lines)


def launch_kwargs(host: str | None, port: int | None, share: bool) -> dict[str, Any]:
    """The launch settings that keep a shared app safe (see the reliability notes)."""
    return dict(
        server_name=host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        server_port=port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
        share=share, max_file_size=MAX_FILE_SIZE, show_error=False, ssr_mode=False, strict_cors=True,
        enable_monitoring=False, allowed_paths=[], run_history=False,  # no token or password kept in the browser
        blocked_paths=["/data", str(Path.home() / ".cache" / "huggingface")],
        css=page.CSS, js=page.JS,  # the page's own layout fixes and log pinning (ui/page.py)
    )


class RedactTokens(logging.Filter):
    """Belt and braces: whatever a library logs, an hf_ token is masked before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="QLoRA fine-tune and side-by-side chat (Gradio app).")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 for the network; a Space sets it)")
    p.add_argument("--port", type=int, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.add_argument("--runs-dir", help="where runs are saved (default /data/runs if writable, else ./runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactTokens())
    if args.share and not os.environ.get(ADMIN_ENV):
        print("\n" + "!" * 78 + f"\n  WARNING: --share without {ADMIN_ENV}: ANYONE with the link can start "
              "training,\n  upload files and push to the Hub with this server's token. Set the variable first.\n"
              + "!" * 78 + "\n", file=sys.stderr)
    demo = build_demo(runs_root=args.runs_dir)
    log.info("runs are saved in %s", demo.ctx.runs_root.absolute())
    # quiet: Gradio's own start-up lines tell the user to "set share=True in launch()"; this app's flag is --share
    demo.launch(**launch_kwargs(args.host, args.port, args.share), quiet=True, prevent_thread_lock=True)
    print(f"* Running on local URL:  {demo.local_url}", flush=True)
    if not args.share and not os.environ.get("SPACE_ID"):
        print("* For a public link, start it with: python app.py --share (set QLORA_ADMIN_PASSWORD first)", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
