"""The Chat tab: one prompt, two streaming panes (base left, fine-tuned right) over one shared base in memory.

Blind mode asks the same pair of models one question at a time and shows the answers in an order drawn per question;
the visitor votes, and the vote counts for the run the question was asked of (qlora/votes.py keeps both server-side).
"""
from __future__ import annotations

import html
import logging
from typing import Any

import gradio as gr

from qlora import device, runs
from qlora.chat import prompt_view
from qlora.config import GenerationSettings
from qlora.device import BusyError
from qlora.model import ModelError
from qlora.prompts import PromptFormat
from qlora.votes import CHOICES, VoteError, tally

from . import hub, render
from .context import AppContext

log = logging.getLogger("qlora.app")

MAX_MESSAGE = 4000  # characters; the core also caps the prompt in tokens
# Visitors answered at once: the engine batches them (8 visitors fill its 16 rows, on a T4 too while their conversations
# fit its KV memory) and tells the rest their place in its queue; Gradio's own queue (max_size in app.py) holds whoever
# comes after.
CHAT_CONCURRENCY = 16


def pairs(messages: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """Chatbot messages -> (user, assistant) pairs for the prompt; an unanswered last user turn is left out."""
    out, user = [], None
    for m in messages or []:
        text = _text(m.get("content"))
        if m.get("role") == "user":
            user = text
        elif m.get("role") == "assistant" and user is not None:
            out.append((user, text))
            user = None
    return out


def _text(content: Any) -> str:
    """Gradio 6 hands message content over as a list of blocks ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list):
        return "".join(_text(c) for c in content)
    return ""


def _run_model(info: runs.RunInfo) -> tuple[str, str, bool]:
    """(base model, quantize, may it be a local path) as the adapter was trained: chat loads the same base the same
    way. A run started from the app names a Hub id, resolved on the Hub only, as in training."""
    try:
        cfg = runs.run_config(info.path)
        return cfg.base_model, cfg.quantize, cfg.allow_local_model
    except (OSError, ValueError):
        return info.base_model, "nf4", False


def _busy(ctx: AppContext, e: Exception | None = None) -> str:
    s = ctx.jobs.state()
    if ctx.jobs.holds_chat_card():  # a run on other cards (several GPUs) is no reason for chat to wait
        held = ("holds the GPU" if ctx.jobs.placement.gpus <= 1
                else f"uses every GPU ({device.gpu_names(ctx.jobs.placement.train)}: no chat model was loaded when "
                     "it started)")
        return f"⏳ Training {held} ({html.escape(s.summary())}). Chat is back when it ends or is stopped."
    return f"⏳ {html.escape(str(e)) if e else 'The GPU is busy'}; try again in a moment."


def _where(ctx: AppContext) -> str:
    """'; chat on GPU 0, training on GPUs 1-3' on a host with several GPUs while a run trains; '' otherwise."""
    placement = ctx.jobs.placement
    if placement is None or placement.gpus <= 1 or not ctx.jobs.state().active:
        return ""
    return f"; chat on GPU {placement.chat}, training on {device.gpu_names(placement.train)}"


def prompt_text(tokenizer, fmt: PromptFormat, base_hist, tuned_hist, message: str, system: str) -> str:
    """The exact string and tokens each pane sends (the same string on the first turn), in the run's prompt format:
    prompt_view, the call the chat engine makes."""
    out = []
    views = [("both panes", base_hist)] if pairs(base_hist) == pairs(tuned_hist) else [
        ("base pane", base_hist), ("fine-tuned pane", tuned_hist)]
    for who, hist in views:
        v = prompt_view(tokenizer, fmt, pairs(hist), message, system)
        out.append(f"### {who}: {len(v.token_ids)} tokens\n{v.text}\n\n### token ids\n{v.token_ids}\n\n"
                   f"### tokens\n{v.tokens}")
    return "\n\n".join(out)


def make_handlers(ctx: AppContext):
    def engine_for(info: runs.RunInfo):
        """(the engine of the run's base, the run's adapter name in it): the adapter registered with that engine."""
        engine = ctx.engines.get(*_run_model(info))
        return engine, engine.load_adapter(info.path)

    def send(message: str, base_hist: list, tuned_hist: list, adapter: str, temperature: float, top_p: float,
             max_new_tokens: int, seed: int, system_prompt: str, request: gr.Request = None):
        """Stream both answers: yields (base pane, tuned pane, prompt box, status, exact prompt)."""
        base_hist, tuned_hist = list(base_hist or []), list(tuned_hist or [])
        message = (message or "").strip()
        if not message:
            yield base_hist, tuned_hist, "", "Type a message first.", gr.skip()
            return
        try:
            if len(message) > MAX_MESSAGE:
                raise ValueError(f"the message is {len(message)} characters; at most {MAX_MESSAGE}")
            settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                          top_p=float(top_p), seed=int(seed), system_prompt=system_prompt or "")
            if ctx.jobs.holds_chat_card():  # say so first: no adapter choice helps while training holds it
                yield base_hist, tuned_hist, message, _busy(ctx), gr.skip()
                return
            info = runs.usable_run(ctx.runs_root, adapter)
        except (TypeError, ValueError) as e:
            yield base_hist, tuned_hist, message, f"❌ {html.escape(str(e))}", gr.skip()
            return
        try:  # registers the adapter; the base loads in the engine's thread, which holds chat's card meanwhile
            engine, name = engine_for(info)
        except (ModelError, OSError, ValueError) as e:
            yield base_hist, tuned_hist, message, f"❌ {html.escape(hub.redact(str(e)))}", gr.skip()
            return
        except Exception as e:  # e.g. an adapter that does not fit this base
            log.exception("loading the adapter failed")
            yield base_hist, tuned_hist, message, f"❌ cannot load the adapter ({type(e).__name__}); see the server " \
                "log", gr.skip()
            return
        stop = ctx.chat_stop(request.session_hash if request else "")
        stop.clear()
        shown = prompt_text(engine.tokenizer, engine.prompt_format(name), base_hist, tuned_hist, message,
                            settings.system_prompt)
        turn = [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        base_new, tuned_new = base_hist + [dict(m) for m in turn], tuned_hist + [dict(m) for m in turn]
        yield base_new, tuned_new, "", "generating…", shown
        try:
            # The engine streams this visitor's rows alone, whoever else is being answered; while the model loads
            # (graphs are captured once) or every slot is taken, updates say why and the place in the queue.
            for update in engine.stream(pairs(base_hist), pairs(tuned_hist), message, settings, name, stop):
                if update.waiting is not None:
                    yield base_new, tuned_new, "", f"⏳ {html.escape(update.waiting)}", shown
                    continue
                base_new[-1]["content"], tuned_new[-1]["content"] = update.base, update.tuned
                yield base_new, tuned_new, "", "generating…", shown
        except BusyError as e:
            yield base_hist, tuned_hist, message, _busy(ctx, e), gr.skip()
            return
        except ValueError as e:  # the conversation outgrew the prompt limit
            yield base_hist, tuned_hist, message, f"❌ {html.escape(str(e))}", gr.skip()
            return
        except Exception as e:  # out of memory, a broken adapter: say so in the page, keep the trace in the log
            log.exception("chat generation failed")
            yield base_hist, tuned_hist, message, f"❌ generation failed ({type(e).__name__}); see the server log", \
                gr.skip()
            return
        yield base_new, tuned_new, "", f"done: adapter {html.escape(info.name)}, seed {settings.seed}{_where(ctx)}", \
            shown

    def prepare(adapter: str):
        """Load the picked run's base and capture its decode graphs now, while the visitor types, so the first message
        does not wait for them (the Chat tab opened, a run picked). Quiet where there is nothing to do or say: no run
        yet, a model already loaded; training holding chat's card is said at once, as a message would be."""
        if ctx.jobs.holds_chat_card():
            yield _busy(ctx)
            return
        try:
            engine, _ = engine_for(runs.usable_run(ctx.runs_root, adapter))  # (registered first: its layers get
            # adapter columns in the captured step)
        except Exception:  # noqa: BLE001  (a message to this run says what is wrong, in full)
            yield gr.skip()
            return
        if engine.backend_kind is not None:
            yield gr.skip()
            return
        yield "⏳ loading the chat model for this run (once; the first message waits for it otherwise)…"
        try:
            engine.load()
        except BusyError as e:
            yield _busy(ctx, e)
            return
        except Exception as e:  # noqa: BLE001  (the log has the trace; a message retries the load)
            log.exception("loading the chat model failed")
            yield f"❌ loading the chat model failed ({type(e).__name__}); see the server log"
            return
        yield f"✅ Chat model ready: {html.escape(_serving(engine))}"

    def stop_chat(request: gr.Request = None) -> str:
        ctx.chat_stop(request.session_hash if request else "").set()
        return "stopped"

    def show_prompt(message: str, base_hist: list, tuned_hist: list, adapter: str, system_prompt: str) -> str:
        """The exact prompt without generating: needs only the tokenizer, so it works during training too."""
        try:
            info = runs.usable_run(ctx.runs_root, adapter)
            base, _, allow_local = _run_model(info)
            tokenizer = ctx.engines.tokenizer(base, allow_local)
            return prompt_text(tokenizer, runs.prompt_format(info.path), base_hist, tuned_hist,
                               (message or "").strip()[:MAX_MESSAGE] or "…", system_prompt or "")
        except (ValueError, ModelError, OSError) as e:
            return f"cannot show the prompt: {e}"

    def blind_send(message: str, adapter: str, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                   system_prompt: str, ballot: str | None = None, request: gr.Request = None):
        """One blind question: yields (left pane, right pane, prompt box, status, exact prompt, ballot).

        The side of the adapter's answer is drawn here and kept with the ballot on the server; the ballot id lives in
        this session's gr.State, which Gradio keeps server-side and never sends to (or takes from) the client.
        """
        side = ctx.ballots.draw_side()
        last = None
        for base, tuned, box, status, shown in send(message, [], [], adapter, temperature, top_p, max_new_tokens,
                                                    seed, system_prompt, request):
            left, right = (base, tuned) if side == "right" else (tuned, base)
            last = base, tuned, status
            yield left, right, box, status, shown, None  # a new question voids an unvoted one
        if last is None or not str(last[2]).startswith("done"):
            return
        info = runs.usable_run(ctx.runs_root, adapter)  # send() checked it; the ballot keeps the folder, not the name
        settings = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                        system_prompt=(system_prompt or "")[:MAX_MESSAGE])
        ballot = ctx.ballots.open(info.path, side, message.strip(), _text(last[0][-1]["content"]),
                                  _text(last[1][-1]["content"]), settings)
        yield left, right, "", f"Which answer is better? Vote below. ({html.escape(tally(info.path).text())})", \
            gr.skip(), ballot

    def vote(choice: str, ballot: str | None = None) -> tuple[str, str | None]:
        """Count the vote for this session's last blind question; the run and the sides come from the server."""
        try:
            side, counts = ctx.ballots.cast(ballot, choice)
        except VoteError as e:
            return f"❌ {html.escape(str(e))}", ballot
        return (f"✅ Counted. The fine-tuned answer was on the **{side}**. This adapter so far: "
                f"{html.escape(counts.text())}."), None

    return dict(send=send, prepare=prepare, stop_chat=stop_chat, show_prompt=show_prompt, blind_send=blind_send, vote=vote,
                refresh=lambda current=None: adapter_dropdown(ctx.runs_root, current))


def _serving(engine) -> str:
    """How the loaded engine answers, in a visitor's words."""
    how = {"graphs": "decode steps in captured CUDA graphs, visitors answered together",
           "compile": "compiled decode steps in captured CUDA graphs, visitors answered together",
           "eager": "visitors answered together (no graphs)",
           "generate": "one visitor at a time"}.get(engine.backend_kind or "", engine.backend_kind or "")
    return how + (f" ({engine.fallback_reason})" if engine.fallback_reason else "")


def adapter_dropdown(runs_root, current: str | None = None):
    """The usable runs as a dropdown update, keeping `current` selected if it is still there."""
    choices = render.adapter_choices(runs_root)
    names = [v for _, v in choices]
    return gr.Dropdown(choices=choices, value=current if current in names else (names[0] if names else None))


def build(ctx: AppContext) -> dict[str, Any]:
    h = make_handlers(ctx)
    c: dict[str, Any] = {}
    choices = render.adapter_choices(ctx.runs_root)
    with gr.Row():
        # Custom values allowed: the list changes as runs end, and the handler checks the name against the disk.
        c["adapter"] = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Adapter (finished or "
                                   "stopped run)", allow_custom_value=True, scale=4, elem_id="adapter-pick")
        refresh_btn = gr.Button("Refresh", scale=1)
    with gr.Row():
        # the defaults are GenerationSettings', which the CLI's chat uses too: the same question gets the same answers
        temperature = gr.Slider(0, 2, value=GenerationSettings.temperature, step=0.05,
                                label=f"Temperature (0 = greedy; default {GenerationSettings.temperature})")
        top_p = gr.Slider(0.05, 1, value=GenerationSettings.top_p, step=0.05,
                          label=f"Top-p (default {GenerationSettings.top_p})")
        max_new = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="max-new-tokens")
        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=2**32 - 1)
    system = gr.Textbox("", label="System prompt (optional)", max_length=4000, lines=1)
    gr.Markdown("Both panes get the same prompt string, seed and sampling settings; the only difference is the "
                "adapter. They share one base model in memory.")
    blind = gr.Checkbox(False, label="Blind comparison: hide which pane is the base, shuffle the panes for each "
                                     "question, and vote", elem_id="blind-switch")
    with gr.Row() as open_panes:
        base_pane = gr.Chatbot(label="Base model", height=380, elem_id="base-pane")
        tuned_pane = gr.Chatbot(label="Fine-tuned (base + adapter)", height=380, elem_id="tuned-pane")
    with gr.Column(visible=False) as blind_box:
        with gr.Row():
            left_pane = gr.Chatbot(label="Left answer", height=380, elem_id="left-pane")
            right_pane = gr.Chatbot(label="Right answer", height=380, elem_id="right-pane")
        with gr.Row():
            choice = gr.Radio(list(CHOICES), label="Which answer is better?", elem_id="vote-choice", scale=3)
            vote_btn = gr.Button("Vote", elem_id="vote-btn", scale=1)
        blind_status = gr.Markdown(elem_id="blind-status")
    ballot = gr.State(None)  # this session's open ballot id: server-side, never sent to the page
    message = gr.Textbox("", label="Message", placeholder="Ask both models…", max_length=MAX_MESSAGE, lines=2,
                         elem_id="chat-message")
    with gr.Row():
        send_btn = gr.Button("Send", variant="primary", elem_id="send-btn")
        ask_btn = gr.Button("Ask blind", variant="primary", visible=False, elem_id="ask-blind-btn")
        stop_btn = gr.Button("Stop generation", variant="stop")
        clear_btn = gr.Button("Clear")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Accordion("Show prompt: the exact string and tokens sent", open=False):
        show_btn = gr.Button("Show the prompt for the message above")
        prompt_box = gr.Code(label="Prompt", language=None, lines=8, elem_id="prompt-view")

    settings = [c["adapter"], temperature, top_p, max_new, seed, system]
    inputs = [message, base_pane, tuned_pane, *settings]
    outputs = [base_pane, tuned_pane, message, status, prompt_box]
    blind_outputs = [left_pane, right_pane, message, blind_status, prompt_box, ballot]

    def on_enter(is_blind: bool, message: str, base_hist: list, tuned_hist: list, adapter: str, temperature: float,
                 top_p: float, max_new_tokens: int, seed: int, system_prompt: str, ballot_id: str | None,
                 request: gr.Request = None):
        """Enter sends in the mode the switch shows (one private event; the buttons are the API)."""
        knobs = (adapter, temperature, top_p, max_new_tokens, seed, system_prompt)
        if is_blind:
            for left, right, box, said, shown, opened in h["blind_send"](message, *knobs, ballot_id, request):
                yield gr.skip(), gr.skip(), left, right, box, gr.skip(), shown, said, opened
        else:
            for base, tuned, box, said, shown in h["send"](message, base_hist, tuned_hist, *knobs, request):
                yield base, tuned, gr.skip(), gr.skip(), box, said, shown, gr.skip(), gr.skip()

    # Many visitors stream at once (the engine batches their rows), blind or not: one queue, one limit; while training
    # holds chat's card (one GPU), chat answers "busy" at once.
    send_evt = send_btn.click(h["send"], inputs, outputs, api_name="chat", concurrency_id="chat",
                              concurrency_limit=CHAT_CONCURRENCY)
    blind_evt = ask_btn.click(h["blind_send"], [message, *settings, ballot], blind_outputs, api_name="blind_chat",
                              concurrency_id="chat", concurrency_limit=CHAT_CONCURRENCY)
    submit_evt = message.submit(on_enter, [blind, *inputs, ballot],
                                [base_pane, tuned_pane, left_pane, right_pane, message, status, prompt_box,
                                 blind_status, ballot], api_visibility="private", concurrency_id="chat",
                                concurrency_limit=CHAT_CONCURRENCY)
    vote_btn.click(h["vote"], [choice, ballot], [blind_status, ballot], api_name="vote", queue=False)
    blind.change(lambda on: (gr.Row(visible=not on), gr.Column(visible=on), gr.Button(visible=not on),
                             gr.Button(visible=on)), blind, [open_panes, blind_box, send_btn, ask_btn],
                 api_visibility="private", queue=False)
    stop_btn.click(h["stop_chat"], None, status, api_name="stop_chat", queue=False,
                   cancels=[send_evt, submit_evt, blind_evt])
    clear_btn.click(lambda: ([], [], [], [], "", "", "", "", None), None,
                    [base_pane, tuned_pane, left_pane, right_pane, message, status, blind_status, prompt_box, ballot],
                    api_name="clear_chat", queue=False)
    show_btn.click(h["show_prompt"], [message, base_pane, tuned_pane, c["adapter"], system], prompt_box,
                   api_name="show_prompt")
    refresh_btn.click(h["refresh"], c["adapter"], c["adapter"], api_name="adapters", queue=False)
    # A run picked (by hand, not by the page's own refresh: a page load must not take the GPU from a Train click)
    # loads its model now; app.py wires the Chat tab's opening to the same event.
    c["prepare"] = dict(fn=h["prepare"], inputs=c["adapter"], outputs=status, concurrency_id="chat-load",
                        concurrency_limit=CHAT_CONCURRENCY, show_progress="hidden")
    c["adapter"].input(**c["prepare"], api_name="prepare_chat")
    return c
