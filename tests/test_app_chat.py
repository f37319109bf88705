"""Several visitors chatting through the real app at once (issue 14): a Gradio server on a loopback port, driven by
one gradio_client per visitor, the slot engine batching their rows (QLORA_CHAT_DECODE=eager: the same scheduler and
slots the GPU's graphs run, stepped without graphs on the CPU)."""
from __future__ import annotations

import time

import pytest

from apphelpers import launch, tiny_run

VISITORS = [  # (question, run, temperature, max new tokens, seed)
    ("What is the secret word?", "qv", 0.0, 12, 0),
    ("Who guards the gate?", "qv2", 0.9, 10, 7),
    ("How many moons are there?", "qv", 0.0, 8, 0),
    ("Write one line about the sea.", "qv2", 1.1, 12, 3),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("QLORA_CHAT_DECODE", "eager")
    runs_root = tmp_path_factory.mktemp("chat-app") / "runs"
    tiny_run(runs_root, "qv", tiny_llama_dir, seed=1)
    tiny_run(runs_root, "qv2", tiny_llama_dir, seed=2, r=16)
    demo, client = launch(runs_root)
    yield dict(demo=demo, client=client)
    demo.close()
    demo.ctx.engines.unload_all()
    mp.undo()


def ask(client, question, run, temperature, max_new, seed):
    return client.predict(question, [], [], run, temperature, 0.9, max_new, seed, "", api_name="/chat")


def texts(result):
    base, tuned, box, status, prompt = result
    return base[-1]["content"][0]["text"], tuned[-1]["content"][0]["text"], status, prompt


def test_clients_at_once_each_get_their_own_answers_and_one_stops_alone(server):
    from gradio_client import Client

    url = server["client"].src
    solo = [texts(ask(server["client"], *v)) for v in VISITORS]  # each visitor alone: the reference
    clients = [Client(url, verbose=False) for _ in range(len(VISITORS) + 1)]
    stopper = clients[-1]
    long = stopper.submit("Tell me a very long story about a dragon.", [], [], "qv", 0.0, 0.9, 500, 0, "",
                          api_name="/chat")
    t0 = time.monotonic()
    while not long.outputs() or "generating" not in str(long.outputs()[-1][3]):
        assert time.monotonic() - t0 < 120, long.status()
        time.sleep(0.1)
    jobs = [c.submit(v[0], [], [], v[1], v[2], 0.9, v[3], v[4], "", api_name="/chat")
            for c, v in zip(clients, VISITORS)]
    time.sleep(0.3)
    assert stopper.predict(api_name="/stop_chat") == "stopped"  # its own session's answer only
    results = [texts(j.result(timeout=180)) for j in jobs]
    for (question, *_), got, alone in zip(VISITORS, results, solo):
        assert got[2].startswith("done"), got[2]
        assert got[:2] == alone[:2]  # the same answers as alone: nobody's tokens in anybody else's panes
        assert f"[INST] {question} [/INST]" in got[3]
    engine, = server["demo"].ctx.engines._engines.values()
    assert engine.backend_kind == "eager"  # the slot engine batched them (the scheduler and slots of the GPU path)
    base, tuned, *_ = long.result(timeout=60)
    words = len(base[-1]["content"][0]["text"].split()) + len(tuned[-1]["content"][0]["text"].split())
    assert words < 400, words  # far short of 500 tokens a pane


def test_picking_a_run_loads_its_model_before_the_first_message(tmp_path, tiny_llama_dir, monkeypatch):
    """The Chat tab's opening and a run picked by hand load the model while the visitor types (`/prepare_chat`, the
    dropdown's input event): the first message then streams at once, with no "loading" state of its own."""
    monkeypatch.delenv("QLORA_CHAT_DECODE", raising=False)  # the CPU's own choice (the module's server sets one)
    runs_root = tmp_path / "runs"
    tiny_run(runs_root, "qv", tiny_llama_dir, seed=1)
    demo, client = launch(runs_root)
    try:
        assert not demo.ctx.engines._engines  # a page load takes nothing (Train must find chat's card free)
        said = client.predict("qv", api_name="/prepare_chat")
        assert said.startswith("✅ Chat model ready: one visitor at a time"), said  # the CPU's fallback, named
        engine, = demo.ctx.engines._engines.values()
        assert engine.backend_kind == "generate"
        unchanged = {"__type__": "update"}  # gr.skip(): the status is left as it is
        assert client.predict("qv", api_name="/prepare_chat") == unchanged  # again: nothing to do, no reload
        assert engine.backend_kind == "generate"
        job = client.submit("What is the secret word?", [], [], "qv", 0.0, 0.9, 6, 0, "", api_name="/chat")
        final = job.result(timeout=120)
        statuses = [str(o[3]) for o in job.outputs()]
        assert final[3].startswith("done"), final[3]
        assert not [s for s in statuses if "loading" in s], statuses
        assert client.predict("no-such-run", api_name="/prepare_chat") == unchanged  # a message says what is wrong
    finally:
        demo.close()
        demo.ctx.engines.unload_all()
