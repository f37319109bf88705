"""Chat while training on a host with several GPUs (issue 15 item 2), on the CPU: pretend GPU counts are given to
`device.Cards` as a parameter; the policy, the job manager's child runs (their command and CUDA_VISIBLE_DEVICES read
from the live process), the chat engine answering while a run trains, and the app's page, all for real."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from apphelpers import launch, tiny_form, tiny_run, wait_for
from qlora.chat import ChatEngine
from qlora.config import GenerationSettings
from qlora.device import CHAT, CHAT_CARD, TRAIN, BusyError, Cards, gpu_names, place, visible_devices
from qlora.jobs import JobManager
from qlora.launch import TOKEN_VAR, accelerate_command, child_env

QUESTION = "Who guards the gate?"


def greedy(n=12):
    return GenerationSettings(temperature=0, max_new_tokens=n)


# --- the policy: which cards a run takes -------------------------------------------------------------------
@pytest.mark.parametrize("gpus, chat_loaded, train, shared", [
    (0, False, (0,), True), (0, True, (0,), True),  # the CPU: one device, training and chat take turns
    (1, False, (0,), True), (1, True, (0,), True),  # one GPU: the same, as today
    (2, False, (0, 1), True), (2, True, (1,), False),
    (4, False, (0, 1, 2, 3), True), (4, True, (1, 2, 3), False),
])
def test_a_run_takes_every_card_but_a_loaded_chats(gpus, chat_loaded, train, shared):
    p = place(gpus, chat_loaded)
    assert (p.gpus, p.train, p.chat, p.shared) == (gpus, train, CHAT_CARD, shared)


def test_the_words_for_which_cards_each_job_uses():
    assert place(4, True).describe() == "training on GPUs 1-3, chat on GPU 0"
    assert place(2, True).describe() == "training on GPU 1, chat on GPU 0"
    assert place(4, False).describe() == ("training on GPUs 0-3 (every GPU: no chat model is loaded, so chat waits "
                                          "until the run ends)")
    assert place(1, True).describe() == "training and chat on the one GPU, one at a time"
    assert place(0, True).describe() == "training and chat on the CPU, one at a time"
    assert gpu_names((2, 0)) == "GPUs 0, 2" and gpu_names((3,)) == "GPU 3"


@pytest.mark.parametrize("gpus", [0, 1])
def test_on_one_gpu_or_the_cpu_training_and_chat_take_turns_as_before(gpus):
    cards = Cards(gpus)
    chat = cards.lease(CHAT, (CHAT_CARD,))
    assert chat.acquire(blocking=False)  # a chat is being answered
    with pytest.raises(BusyError, match="the GPU is busy answering a chat"):
        cards.take_training()
    chat.release()
    chat.loaded(True)  # loaded but idle: the run takes the card (the app then unloads the chat model)
    run = cards.take_training()
    assert run.train == (0,) and run.shared
    assert not chat.acquire(blocking=False) and chat.locked()
    assert chat.why_busy() == "the GPU is busy (a training run holds it); chat is back when it ends"
    cards.give_back(TRAIN, run.train)
    assert chat.acquire(blocking=False)
    chat.release()
    assert cards.held() == {}


@pytest.mark.parametrize("gpus", [2, 4])
def test_on_several_gpus_chat_keeps_its_card_unless_nobody_chats(gpus):
    cards = Cards(gpus)
    chat = cards.lease(CHAT, (CHAT_CARD,))
    others = tuple(range(1, gpus))
    # a visitor is being answered (the model is loading or loaded): the run trains on the other cards
    assert chat.acquire(blocking=False)
    run = cards.take_training()
    assert run.train == others and not run.shared
    assert cards.held() == {0: CHAT, **{c: TRAIN for c in others}}
    chat.release()
    assert not chat.locked() and chat.acquire(blocking=False)  # chat comes and goes while the run trains
    chat.release()
    cards.give_back(TRAIN, run.train)
    # the chat model is loaded but nobody is being answered: still the other cards, so a visitor never waits
    chat.loaded(True)
    assert cards.placement().train == others
    run = cards.take_training()
    assert run.train == others and chat.acquire(blocking=False)
    chat.release()
    cards.give_back(TRAIN, run.train)
    # two chat engines loaded (a base replaced by another): one unloading leaves the other's card alone
    other = cards.lease(CHAT, (CHAT_CARD,))
    other.loaded(True)
    chat.loaded(True)  # the same engine saying so twice (a reload) counts once
    chat.loaded(False)
    assert cards.placement().train == others
    other.loaded(False)
    # no chat model: the run takes every card, and a visitor is told why, at once
    run = cards.take_training()
    assert run.train == tuple(range(gpus)) and run.shared
    assert not chat.acquire(blocking=False)
    assert chat.why_busy() == (f"every GPU is busy: the training run uses GPUs 0-{gpus - 1} (it started while no "
                               "chat model was loaded); chat is back when it ends")
    # the run's state says it ended, but its processes still hold the cards: a new start says so
    with pytest.raises(BusyError, match="the last run's processes are still exiting"):
        cards.take_training()
    cards.give_back(TRAIN, run.train)
    assert cards.held() == {}


def test_a_lease_of_every_card_is_one_lock_over_them_all():
    cards = Cards(4)
    every = cards.lease(TRAIN)  # what device.gpu_lock is for the host's cards
    chat = cards.lease(CHAT, (CHAT_CARD,))
    assert not every.locked()
    with every:
        assert cards.held() == {c: TRAIN for c in range(4)} and every.locked() and chat.locked()
        assert not chat.acquire(blocking=False)
    assert chat.acquire(blocking=False) and every.locked()  # any card held by anyone
    assert not every.acquire(blocking=False)  # all or nothing
    assert cards.held() == {0: CHAT}
    chat.release()
    with pytest.raises(RuntimeError, match="does not hold"):
        cards.give_back(CHAT, (0,))


# --- the child run: its cards and its process count -------------------------------------------------------
def test_the_child_run_sees_only_its_cards_in_the_parents_terms():
    assert visible_devices((1, 2, 3), "") == "1,2,3"
    assert visible_devices((1, 2, 3), "4,5,6,7") == "5,6,7"  # this process itself sees a subset of the host
    assert visible_devices((1,), "GPU-aaaa, GPU-bbbb") == "GPU-bbbb"
    with pytest.raises(ValueError, match="names no GPU 2"):
        visible_devices((2,), "0,1")
    env = child_env((1, 2, 3), "hf_secret", {"PATH": "/bin", TOKEN_VAR: "stale"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1,2,3", TOKEN_VAR: "hf_secret"}
    assert child_env(None, None, {"CUDA_VISIBLE_DEVICES": "3", TOKEN_VAR: "x"}) == {"CUDA_VISIBLE_DEVICES": "3"}
    three = accelerate_command(3, ["--config", "c.yaml"])
    assert three[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--multi_gpu" in three
    assert three[three.index("--num_processes") + 1] == "3" and three[-4:] == ["qlora", "train", "--config", "c.yaml"]
    # one card: the plain CLI (accelerate's multi-GPU launcher refuses a single process)
    assert accelerate_command(1, ["--config", "c.yaml"]) == [sys.executable, "-m", "qlora", "train", "--config",
                                                             "c.yaml"]


def _training_child(timeout: float = 120) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of this process's live training child, read from /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
                raw = (proc / "environ").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == os.getpid() and "train" in argv and any("qlora" in a or "accelerate" in a for a in argv):
                env = dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)
                return argv, env
        time.sleep(0.2)
    raise AssertionError("no training child started")


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("multigpu-runs")
    tiny_run(root, "qv", tiny_llama_dir, seed=1)
    return root


def test_the_chat_engine_answers_beside_a_run_on_other_cards_and_says_why_when_a_run_holds_them_all(
        tiny_llama_dir, chat_runs):
    cards = Cards(4)
    engine = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2, cards=cards)
    name = engine.load_adapter(chat_runs / "qv")
    run = cards.take_training()  # no chat model loaded yet: the run takes every card
    t0 = time.perf_counter()
    with pytest.raises(BusyError, match=r"^every GPU is busy: the training run uses GPUs 0-3 \(it started while no "
                                        r"chat model was loaded\); chat is back when it ends$"):
        next(engine.stream_pair([], [], QUESTION, greedy(), name))
    assert time.perf_counter() - t0 < 1 and engine.model is None  # said at once, nothing loaded
    cards.give_back(TRAIN, run.train)
    alone = list(engine.stream_pair([], [], QUESTION, greedy(), name))[-1]  # loads on GPU 0, then idles
    run = cards.take_training()
    assert run.train == (1, 2, 3)
    assert list(engine.stream_pair([], [], QUESTION, greedy(), name))[-1] == alone  # no "busy", the same answer
    cards.give_back(TRAIN, run.train)
    engine.unload()
    assert cards.placement().train == (0, 1, 2, 3)  # no chat model: the next run may take every card


@pytest.mark.parametrize("gpus", [2, 3])
def test_a_run_trains_on_the_other_cards_while_chat_answers_exactly(gpus, tiny_cfg, tiny_llama_dir, chat_runs):
    """2 pretend GPUs: the run is one plain child on GPU 1; 3: two data-parallel processes (accelerate) on GPUs 1-2.
    Chat, loaded on GPU 0 first, answers during the run exactly as it did alone."""
    cards = Cards(gpus)
    engine = ChatEngine(str(tiny_llama_dir), "nf4", "fp32", decode="eager", max_rows=2, cards=cards)
    name = engine.load_adapter(chat_runs / "qv")
    alone = list(engine.stream_pair([], [], QUESTION, greedy(), name))[-1]
    assert cards.held() == {}  # idle: chat's card is free, its model stays loaded
    jobs = JobManager(cards=cards)
    jobs.start(tiny_cfg(max_steps=400, optimizer="adamw_torch"))
    others = tuple(range(1, gpus))
    assert jobs.placement.train == others and not jobs.holds_chat_card()
    argv, env = _training_child()
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, others))
    if gpus == 2:
        assert argv[1:4] == ["-m", "qlora", "train"]
    else:
        assert "accelerate.commands.launch" in argv and argv[argv.index("--num_processes") + 1] == "2"
    for _ in range(1200):
        if jobs.state().step >= 1 or not jobs.state().active:
            break
        time.sleep(0.1)
    assert jobs.state().status == "running", jobs.state().summary()
    during = list(engine.stream_pair([], [], QUESTION, greedy(), name))[-1]  # no BusyError
    assert during == alone
    assert jobs.state().status == "running"  # the answer came while the run trained
    assert cards.held() == {c: TRAIN for c in others}
    jobs.stop()
    state = jobs.wait(300)
    assert state.status == "stopped" and state.step >= 1, state.summary()
    assert f"GPUs: training on {gpu_names(others)}, chat on GPU 0" in state.logs
    assert cards.held() == {}
    engine.unload()


# --- the app: which cards each job uses, and no "busy" for a run elsewhere -----------------------------------
def test_the_app_says_where_each_job_runs_and_chats_during_a_run_on_other_cards(tmp_path, tiny_llama_dir,
                                                                                 memo_jsonl, monkeypatch):
    """Two pretend GPUs. With no chat model loaded a run takes both and a visitor is told so, truthfully; once
    someone has chatted, a run trains on GPU 1 and chat answers on GPU 0 meanwhile."""
    monkeypatch.setenv("QLORA_CHAT_DECODE", "eager")
    tiny = tmp_path / "models" / "tiny-llama"  # the app trains only on the server's models folder or Hub ids
    shutil.copytree(tiny_llama_dir, tiny)
    monkeypatch.setenv("QLORA_MODELS_DIR", str(tiny.parent))
    runs_root = tmp_path / "runs"
    tiny_run(runs_root, "qv", tiny, seed=1)
    cards = Cards(2)
    demo, client = launch(runs_root, jobs=JobManager(cards=cards))
    try:
        form = tiny_form(str(tiny), memo_jsonl, "", max_steps=400)

        def ask():
            return client.predict(QUESTION, [], [], "qv", 0.0, 0.9, 8, 0, "", api_name="/chat")

        def running():
            return wait_for(client, lambda s: s["status"] == "running" and s["step"] >= 1)

        def stop():
            assert "Stopping" in client.predict(api_name="/stop")
            state = wait_for(client, lambda s: s["status"] not in ("starting", "running", "stopping"))
            demo.ctx.jobs.wait(60)  # the child's processes exit after their last event: then the cards are free
            assert cards.held() == {}
            return state

        # nobody has chatted: the run takes every card, and the page says what that means for chat
        checked = client.predict(**form, api_name="/preflight")
        assert "⚠ GPUs: training on GPUs 0-1 (every GPU: no chat model is loaded, so chat waits until the run " \
               "ends); 2 processes, data parallel" in checked, checked
        started = client.predict(**form, api_name="/start")
        assert started.startswith("▶️ Started") and "training on GPUs 0-1 (every GPU" in started, started
        assert running()["gpus"].startswith("training on GPUs 0-1")
        status = ask()[3]
        assert status.startswith("⏳ Training uses every GPU (GPUs 0-1: no chat model was loaded when it started)"), \
            status
        assert stop()["status"] == "stopped"

        # a visitor chats (the model loads on GPU 0); the next run leaves GPU 0 to chat
        alone = ask()
        assert alone[3].startswith("done: adapter qv"), alone[3]
        checked = client.predict(**form, api_name="/preflight")
        assert "✓ GPUs: training on GPU 1, chat on GPU 0; one process" in checked, checked
        started = client.predict(**form, api_name="/start")
        assert started.startswith("▶️ Started") and "training on GPU 1, chat on GPU 0" in started, started
        assert running()["gpus"] == "training on GPU 1, chat on GPU 0"
        during = ask()
        assert during[3] == f"{alone[3]}; chat on GPU 0, training on GPU 1", during[3]
        assert during[:2] == alone[:2]  # the same answers, while the run trains
        assert client.predict(api_name="/job_status")["status"] == "running"
        assert stop()["status"] == "stopped"
        assert cards.held() == {}
    finally:
        demo.ctx.jobs.stop()
        demo.ctx.jobs.wait(120)
        demo.close()
        demo.ctx.engines.unload_all()
