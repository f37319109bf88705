"""Chat while training on a host with several GPUs (issue 15): training tokens/s on N-1 cards while visitors stream a
steady flow of chat requests on GPU 0, the chat's tokens/s a pane at the same time, and data-parallel scaling.

    python -m bench.multi_gpu                                  # every GPU here (2 or 4), the 7B-shaped random model
    python -m bench.multi_gpu --tiny --gpus 2 --steps 4        # CPU smoke test: 2-layer model, pretend GPU count

Everything goes through the product's own path: `device.Cards(N)` -> `jobs.JobManager` (a child run that sees only its
cards, data parallel under `accelerate launch` when they are several) and `chat.ChatEngine` on GPU 0 (the slot engine
with CUDA graphs), exactly as the app wires them. Arms, each a training run of the whole guanaco-1k epoch (or --steps):

  chat       the visitors alone, no training: chat tokens/s a pane with the host to itself
  rest+chat  training on GPUs 1..N-1 while the visitors stream on GPU 0: both figures at the same time
  one        training on one card (GPU 1), nobody chatting: the baseline T1
  rest       training on GPUs 1..N-1, chat loaded but idle (N > 2 only; at N = 2 it is `one`)
  all        training on every card, no chat model loaded: TN

Training tokens/s is the steady rate of the run's own Progress events (tokens counted over all ranks, from the end of
step --warm to the last step); scaling efficiency is T(k cards) / (k x T1). A visitor is a thread that sends a
request (both panes, greedy, --new-tokens), reads it to the end, waits --think seconds and sends the next; its
tokens/s a pane count from the click. Results go to bench/results/<tag>/multi-gpu.{json,md}, written after each arm.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from bench.chat_bench import PROMPTS, random_adapter, run_request, visitor_prompts
from bench.common import DATA, TINY, build_random_model, card, versions, write_json

RESULTS = Path(__file__).resolve().parent / "results"


# --- training: one run through the job manager -------------------------------------------------------------------
def train_run(cards, model_dir: Path, out: Path, steps: int, max_length: int, warm: int) -> dict:
    """One run on the cards `cards.placement()` gives it now; its steady tokens/s from its Progress events."""
    from qlora.config import TrainConfig
    from qlora.events import Progress
    from qlora.jobs import JobManager

    jobs = JobManager(cards=cards)
    # (step, seconds since train begin, tokens seen on all ranks, when the event reached this process)
    progress: list[tuple[int, float, float, float]] = []
    jobs.subscribe(lambda e: progress.append((e.step, e.elapsed_s, e.tokens_per_s * e.elapsed_s, time.perf_counter()))
                   if isinstance(e, Progress) else None)
    cfg = TrainConfig(base_model=str(model_dir), dataset=str(DATA / "guanaco-llama2-1k.parquet"),
                      output_dir=str(out / "runs"), max_steps=steps or -1, max_length=max_length, logging_steps=1,
                      seed=42)
    t0 = time.perf_counter()
    jobs.start(cfg)
    placement = jobs.placement
    state = jobs.wait()
    wall = time.perf_counter() - t0
    if state.status != "finished" or not progress:
        raise RuntimeError(f"the run on {placement.train} ended {state.status}: {state.summary()}\n"
                           + "\n".join(state.logs[-10:]))
    first = next((p for p in progress if p[0] >= warm), progress[0])
    last = progress[-1]
    steady = (last[2] - first[2]) / (last[1] - first[1]) if last[1] > first[1] else last[2] / last[1]
    return dict(gpus=list(placement.train), processes=len(placement.train), steps=last[0],
                tokens=round(last[2]), train_s=round(last[1], 1), wall_s=round(wall, 1),
                tokens_per_s=round(steady), tokens_per_s_whole_run=round(last[2] / last[1]),
                steady_window_s=[round(first[1], 2), round(last[1], 2)],
                steady_clock=[first[3], last[3]])  # perf_counter seconds here: the chat figures' window


# --- chat: visitors sending one request after another -----------------------------------------------------------
class Visitors:
    """K threads, each sending its requests one after another (a steady stream), until stopped."""

    def __init__(self, engine, adapter: str, k: int, new_tokens: int, think: float, prompts: list[str]):
        from qlora.config import GenerationSettings

        self.engine, self.adapter, self.think = engine, adapter, think
        self.settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
        self.ids = [engine.prompt_ids([], p, "", adapter) for p in prompts]  # both panes: the adapter's format
        self.done: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._visit, args=(i,), daemon=True) for i in range(k)]

    def start(self) -> "Visitors":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(600)

    def _visit(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            ids = self.ids[(i + n * len(self._threads)) % len(self.ids)]
            n += 1
            start = time.perf_counter()
            r = run_request(self.engine, [(ids, None, self.settings), (ids, self.adapter, self.settings)], start)
            self.done.append(dict(start=start, end=start + max(r["end"]), prompt_tokens=len(ids),
                                  tokens=[len(x) for x in r["ids"]], first=r["first"], ends=r["end"]))
            self._stop.wait(self.think)

    def figures(self, since: float = 0.0, until: float = float("inf")) -> dict:
        """The requests sent and finished between `since` and `until` (perf_counter seconds)."""
        reqs = [r for r in self.done if r["start"] >= since and r["end"] <= until]
        if not reqs:
            return dict(requests=0)
        per_pane = [n / e for r in reqs for n, e in zip(r["tokens"], r["ends"]) if e > 0]
        decode = [(n - 1) / (e - f) for r in reqs for n, f, e in zip(r["tokens"], r["first"], r["ends"])
                  if n > 1 and e > f]
        span = max(r["end"] for r in reqs) - min(r["start"] for r in reqs)
        return dict(requests=len(reqs), tokens_per_s_per_pane_median=round(statistics.median(per_pane), 1),
                    tokens_per_s_per_pane_mean=round(statistics.fmean(per_pane), 1),
                    decode_tokens_per_s_per_pane_median=round(statistics.median(decode), 1) if decode else None,
                    ttft_s_median=round(statistics.median(min(r["first"]) for r in reqs), 3),
                    ttft_s_max=round(max(min(r["first"]) for r in reqs), 3),
                    aggregate_tokens_per_s=round(sum(sum(r["tokens"]) for r in reqs) / span, 1) if span > 0 else None)


# --- the arms ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llama7b-random")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke test of the script)")
    ap.add_argument("--gpus", type=int, default=0, help="pretend this many GPUs (default: torch's count)")
    ap.add_argument("--arms", default="chat,rest+chat,one,rest,all")
    ap.add_argument("--steps", type=int, default=0, help="steps a run (0: the whole epoch)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--warm", type=int, default=5, help="steps left out of the steady training rate")
    ap.add_argument("--visitors", type=int, default=4, help="visitors streaming requests (2 rows each)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--think", type=float, default=0.2, help="seconds a visitor waits between requests")
    ap.add_argument("--chat-s", type=float, default=30, help="seconds of the chat-alone arm")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="multi-gpu")
    a = ap.parse_args(argv)

    from qlora.chat import ChatEngine
    from qlora.config import GenerationSettings
    from qlora.device import CHAT, CHAT_CARD, Cards, gpu_count

    n = a.gpus or gpu_count()
    if n < 2:
        raise SystemExit(f"{n} GPU(s) here: this bench needs 2 or more (--gpus N pretends, for a CPU smoke test)")
    shape = TINY if a.tiny else None
    model_dir = build_random_model(Path(a.model), shape)
    work = Path(a.model).parent / (Path(a.model).name + "-multi-gpu")  # runs and the adapter: not in the results
    run_dir = random_adapter(model_dir, work / "adapter-run", seed=1)
    out = Path(a.out) / a.tag
    arms = [x for x in a.arms.split(",") if x and not (x == "rest" and n == 2)]
    report = dict(card=card(), gpus=n, versions=versions(), arms={}, when=time.strftime("%Y-%m-%d %H:%M UTC",
                  time.gmtime()), command="python -m bench.multi_gpu " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:]),
                  settings=dict(steps=a.steps, max_length=a.max_length, warm=a.warm, visitors=a.visitors,
                                new_tokens=a.new_tokens, think_s=a.think))

    def save(name: str, result: dict) -> None:
        report["arms"][name] = result
        print(f"{name}: {json.dumps(result)}", flush=True)
        report["summary"] = summary(report)
        write_json(out / "multi-gpu.json", report)
        (out / "multi-gpu.md").write_text(markdown(report), encoding="utf-8")

    def idle_chat(cards):
        """A chat model marked loaded on GPU 0 without loading one: the placement of a run beside an idle chat."""
        lease = cards.lease(CHAT, (CHAT_CARD,))
        lease.loaded(True)
        return cards

    if "chat" in arms or "rest+chat" in arms:
        cards = Cards(n)
        engine = ChatEngine(str(model_dir), "nf4", "auto", cards=cards)
        name = engine.load_adapter(run_dir)
        t = time.perf_counter()
        engine.load()
        load = dict(backend=engine.backend_kind, load_s=round(time.perf_counter() - t, 1),
                    capture_s=round(engine.capture_s, 1) if engine.capture_s else None)
        prompts = PROMPTS + visitor_prompts(engine, 8, 1024)[1::2]
        run_request(engine, [([1, 2, 3], None, GenerationSettings(max_new_tokens=4, temperature=0.0))])  # warm
        if "chat" in arms:
            visitors = Visitors(engine, name, a.visitors, a.new_tokens, a.think, prompts).start()
            t0 = time.perf_counter()
            time.sleep(a.chat_s)
            visitors.stop()
            save("chat", dict(load, chat=visitors.figures(t0)))
        if "rest+chat" in arms:
            visitors = Visitors(engine, name, a.visitors, a.new_tokens, a.think, prompts).start()
            time.sleep(min(5.0, a.chat_s))  # the stream is steady before the run starts
            run = train_run(cards, model_dir, work, a.steps, a.max_length, a.warm)
            visitors.stop()
            begin, end = run.pop("steady_clock")  # the chat's figures over the run's steady training window
            save("rest+chat", dict(load, train=run, chat=visitors.figures(begin, end)))
        engine.unload()
    for arm, cards in (("one", lambda: idle_chat(Cards(2))), ("rest", lambda: idle_chat(Cards(n))),
                       ("all", lambda: Cards(n))):
        if arm in arms:
            run = train_run(cards(), model_dir, work, a.steps, a.max_length, a.warm)
            run.pop("steady_clock")
            save(arm, dict(train=run))
    print(markdown(report))
    return 0


def summary(rep: dict) -> dict:
    """Scaling efficiencies against one card, and what chat and training cost each other."""
    arms = rep["arms"]
    t = {k: v["train"]["tokens_per_s"] for k, v in arms.items() if "train" in v}
    out = {}
    if "one" in t:
        for k in ("all", "rest", "rest+chat"):
            if k in t:
                cards = len(arms[k]["train"]["gpus"])
                out[f"efficiency_{k}"] = round(t[k] / (cards * t["one"]), 3)
    rest = t.get("rest", t.get("one") if rep["gpus"] == 2 else None)
    if rest and "rest+chat" in t:
        out["training_kept_beside_chat"] = round(t["rest+chat"] / rest, 3)
    alone, beside = arms.get("chat", {}).get("chat", {}), arms.get("rest+chat", {}).get("chat", {})
    if alone.get("requests") and beside.get("requests"):
        out["chat_kept_beside_training"] = round(beside["tokens_per_s_per_pane_median"]
                                                 / alone["tokens_per_s_per_pane_median"], 3)
    return out


def markdown(rep: dict) -> str:
    c, arms = rep["card"], rep["arms"]
    lines = [f"{rep['gpus']} x {c['name']}; {rep['when']}; `{rep['command']}`", "",
             "| arm | training GPUs | training tok/s (steady) | run s | efficiency vs 1 card | chat requests | "
             "chat tok/s a pane (median) | chat TTFT median / max s |", "|---|---|---|---|---|---|---|---|"]
    eff = rep.get("summary", {})
    for name, v in arms.items():
        tr, ch = v.get("train"), v.get("chat", {})
        lines.append("| " + " | ".join([
            name, ",".join(map(str, tr["gpus"])) if tr else "-", f"{tr['tokens_per_s']:,}" if tr else "-",
            str(tr["train_s"]) if tr else "-", str(eff.get(f"efficiency_{name}", "1.0" if name == "one" else "-")),
            str(ch.get("requests", "-")), str(ch.get("tokens_per_s_per_pane_median", "-")),
            f"{ch['ttft_s_median']} / {ch['ttft_s_max']}" if ch.get("requests") else "-"]) + " |")
    lines += ["", "summary: " + json.dumps(eff)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
