"""Issue 13 through the app: blind votes in Chat, evaluation cards and merged exports under Past runs.

A real Gradio server with an admin password (a shared link) and two finished tiny-Llama runs, driven by real
gradio_client clients and raw HTTP. Anyone may ask blind questions and vote; a vote must count once, for the run its
question was asked of, whatever a script sends to the API. Cards, evaluation and export need the password.
"""
from __future__ import annotations

import json
import threading

import pytest

from apphelpers import free_port, tiny_runs

ADMIN = "adm1n-Blind-Pa55"
GREEDY = (0.0, 0.9, 6, 0, "")  # temperature, top_p, max new tokens, seed, system prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    import app

    root = tmp_path_factory.mktemp("compare")
    # "earlier" holds out two rows, so it ends with an evaluation card; "other" holds out none
    runs_root, _ = tiny_runs(root, tiny_llama_dir, {"earlier": dict(learning_rate=1e-2, eval_fraction=0.25),
                                                    "other": dict(learning_rate=1e-2)})
    demo = app.build_demo(runs_root=runs_root, admin_password=ADMIN)
    kwargs = app.launch_kwargs("127.0.0.1", free_port(), share=False)
    demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    url = f"http://127.0.0.1:{kwargs['server_port']}/"
    yield dict(demo=demo, url=url, runs_root=runs_root, root=root)
    demo.close()


def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def votes(server, run: str) -> list[dict]:
    path = server["runs_root"] / run / "votes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ask(c, question: str, run: str = "earlier"):
    left, right, box, status, prompt = c.predict(question, run, *GREEDY, api_name="/blind_chat")
    return left, right, status


def test_anyone_asks_blind_votes_once_and_the_vote_counts_for_that_run(server):
    c = client(server)  # no admin password anywhere
    sides = []
    for i in range(10):
        left, right, status = ask(c, f"Question {i}?")
        assert status.startswith("Which answer is better?"), status
        assert left[-1]["role"] == right[-1]["role"] == "assistant"
        said = c.predict("left", api_name="/vote")
        assert said.startswith("✅ Counted. The fine-tuned answer was on the **"), said
        sides.append("left" if "**left**" in said else "right")
    assert set(sides) == {"left", "right"}  # the order is drawn per question (all ten alike: p = 2^-9)
    recorded = votes(server, "earlier")
    assert [v["tuned_side"] for v in recorded] == sides
    assert [v["preferred"] for v in recorded] == ["tuned" if s == "left" else "base" for s in sides]
    assert recorded[0]["prompt"] == "Question 0?" and recorded[0]["settings"]["max_new_tokens"] == 6
    tuned = sides.count("left")
    assert f"tuned preferred in {tuned} of 10, 0 ties" in said
    assert votes(server, "other") == []

    # the panes hold the base and the adapter's answers, in the drawn order
    base, tuned_pane, *_ = c.predict("Question 3?", [], [], "earlier", *GREEDY, api_name="/chat")
    left, right, _ = ask(c, "Question 3?")
    shown = sorted(m[-1]["content"][0]["text"] for m in (left, right))
    assert shown == sorted(m[-1]["content"][0]["text"] for m in (base, tuned_pane))


def test_votes_cannot_be_forged_replayed_or_sent_to_another_runs_tally(server):
    import httpx

    a, b = client(server), client(server)
    before_earlier, before_other = len(votes(server, "earlier")), len(votes(server, "other"))

    # no question asked in this session: nothing to vote on
    assert b.predict("right", api_name="/vote").startswith("❌ no blind question is waiting")
    # a asks about "other"; b (another session) cannot cast a's vote
    ask(a, "Which run is this?", run="other")
    assert b.predict("left", api_name="/vote").startswith("❌")
    # a choice outside the four is refused (by the Radio, before our handler) and keeps the question open
    with pytest.raises(Exception):
        a.predict("tuned", api_name="/vote")
    assert a.predict("tie", api_name="/vote").startswith("✅")
    # replay: the same vote again is not counted
    assert a.predict("tie", api_name="/vote").startswith("❌")
    assert a.predict("left", api_name="/vote").startswith("❌")
    # the API takes no run and no side: a raw call naming a run and a mapping is refused outright
    for data in (["left", "earlier"], ["left", {"tuned_side": "left", "run": "earlier"}], ["left"]):
        r = httpx.post(server["url"] + "gradio_api/call/vote", json={"data": data}, timeout=30)
        if r.status_code == 200:  # accepted into the queue: read the result, it must be a refusal
            event = r.json()["event_id"]
            body = httpx.get(server["url"] + f"gradio_api/call/vote/{event}", timeout=30).text
            assert "Counted" not in body, body
    # asking on one run and switching the dropdown before voting changes nothing: the ballot keeps its run
    ask(a, "Question 1?", run="other")
    assert a.predict("both bad", api_name="/vote").startswith("✅")
    assert len(votes(server, "earlier")) == before_earlier
    assert [v["preferred"] for v in votes(server, "other")[before_other:]] == ["tie", "both_bad"]
    # the ballot id never reaches a client: not in the answer, not in the page config
    answer = repr(a.predict("An open question?", "other", *GREEDY, api_name="/blind_chat"))
    config = httpx.get(server["url"] + "config", timeout=30).text
    open_ids = list(server["demo"].ctx.ballots._open)
    assert open_ids
    for ballot_id in open_ids:
        assert ballot_id not in answer and ballot_id not in config


def test_many_visitors_vote_at_once_and_every_vote_is_one_whole_line(server):
    clients = [client(server) for _ in range(6)]
    for i, c in enumerate(clients):
        ask(c, f"Question {i}?", run="other")
    before = len(votes(server, "other"))
    barrier = threading.Barrier(len(clients))
    answers = [""] * len(clients)

    def press(i):
        barrier.wait()
        answers[i] = clients[i].predict("right", api_name="/vote")

    threads = [threading.Thread(target=press, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(a.startswith("✅") for a in answers), answers
    assert len(votes(server, "other")) == before + len(clients)  # every line parses


def test_the_tally_reads_as_the_issue_asks(tmp_path):
    from qlora.votes import Ballots, VoteError, tally

    ballots = Ballots()
    with pytest.raises(VoteError, match="pick one of: left, right, tie, both bad"):
        ballots.cast(ballots.open(tmp_path, "left", "q", "a", "b", {}), "tuned")
    for choice in ["left"] * 14 + ["right"] * 2 + ["tie"] * 3 + ["both bad"]:
        ballot = ballots.open(tmp_path, "left", "q", "a", "b", {})
        ballots.cast(ballot, choice)
    (tmp_path / "votes.jsonl").open("a").write('{"preferred": "tuned", "cut')  # a line a crash cut short
    assert tally(tmp_path).text() == "tuned preferred in 14 of 20, 3 ties (base preferred in 2, both bad in 1)"


# --- evaluation cards and merged exports under Past runs ------------------------------------------------------------
CANARY = "hf_EvalExportEvalExport000000Canary00"


def stream(c, *args, api_name):
    """Every streamed update of a generator endpoint, the last one last."""
    job = c.submit(*args, api_name=api_name)
    return [tuple(x) if isinstance(x, (list, tuple)) else x for x in job]


def test_cards_evaluation_and_export_need_the_admin_password(server):
    from gradio_client import handle_file

    c = client(server)
    for wrong in ("", "nope"):
        assert c.predict("earlier", wrong, api_name="/eval_card") == "🔒 Only the admin can do this: enter the " \
            "admin password at the top of the Training tab."
        assert stream(c, "earlier", None, 0, wrong, "", api_name="/evaluate")[-1][1].startswith("🔒")
        assert c.predict(wrong, api_name="/stop_eval").startswith("🔒")
        assert stream(c, "earlier", wrong, "", api_name="/export")[-1].startswith("🔒")
        assert c.predict("earlier", wrong, api_name="/download_export")[1].startswith("🔒")
        assert c.predict("earlier", "a/b", True, "", wrong, api_name="/push_export").startswith("🔒")
    assert not (server["runs_root"] / "earlier" / "export").exists()
    bad = server["root"] / "bad.jsonl"
    bad.write_text('{"text": "<s>[INST] cut')
    said = stream(c, "earlier", handle_file(str(bad)), 0, "", "", api_name="/evaluate")
    assert said[-1][1].startswith("🔒")  # the upload is never read without the password


def test_the_card_of_a_run_then_evaluate_again_with_progress_and_a_bad_file_refused(server):
    from gradio_client import handle_file

    c = client(server)
    card_path = server["runs_root"] / "earlier" / "eval.json"
    shown = c.predict("earlier", ADMIN, api_name="/eval_card")
    assert shown.startswith("**Evaluation card**") and "base     loss" in shown and "adapter  loss" in shown
    assert "Greedy answers to held-out prompts" in shown
    assert "No evaluation card" in c.predict("other", ADMIN, api_name="/eval_card")
    before = card_path.read_bytes()

    bad = server["root"] / "bad.jsonl"
    bad.write_text('{"text": "<s>[INST] cut')
    said = stream(c, "earlier", handle_file(str(bad)), 0, ADMIN, "", api_name="/evaluate")
    assert said[-1][1] == "❌ bad.jsonl: line 1: truncated line: the file ends mid-record", said
    assert card_path.read_bytes() == before

    memo = server["root"] / "memo.jsonl"
    updates = stream(c, "other", handle_file(str(memo)), 5, ADMIN, "", api_name="/evaluate")
    progress = [m for _, m in updates if "evaluating: " in m]
    assert progress and "evaluating: 5/" in " ".join(progress), updates
    card, message = updates[-1]
    assert message == "✅ other: evaluation card saved." and card.startswith("**Evaluation card**")
    assert "first 5 rows of memo.jsonl" in card
    saved = json.loads((server["runs_root"] / "other" / "eval.json").read_text())
    assert saved["rows"] == 5 and f"{saved['base']['loss']:.4f}" in card
    # chat answers right after (the evaluation gave the GPU back)
    assert c.predict("Question 1?", [], [], "other", *GREEDY, api_name="/chat")[3].startswith("done")


def test_stop_ends_a_long_evaluation_and_saves_nothing(server):
    import time

    from gradio_client import handle_file

    long_file = server["root"] / "long.jsonl"
    long_file.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                                 for i in range(3000)))
    before = (server["runs_root"] / "earlier" / "eval.json").read_bytes()
    c, other = client(server), client(server)
    job = c.submit("earlier", handle_file(str(long_file)), 0, ADMIN, "", api_name="/evaluate")
    t0 = time.monotonic()
    while not any("evaluating: " in str(o) for o in job.outputs()):
        assert time.monotonic() - t0 < 120, job.outputs()
        time.sleep(0.2)
    # meanwhile chat (one device here) says what holds it, at once
    said = other.predict("Question 1?", [], [], "other", *GREEDY, api_name="/chat")[3]
    assert said == "⏳ an evaluation holds the GPU; try again in a moment.", said
    assert other.predict(ADMIN, api_name="/stop_eval").startswith("⏹️ Stopping the evaluation")  # a second browser
    card, message = job.result(timeout=120)
    assert message.startswith("⏹️ evaluation stopped after ") and "of 3000 rows; nothing was saved" in message
    assert (server["runs_root"] / "earlier" / "eval.json").read_bytes() == before
    assert other.predict(ADMIN, api_name="/stop_eval") == "No evaluation is running."


def test_export_download_and_push_of_the_merged_model(server, tmp_path):
    import zipfile

    c = client(server)
    assert c.predict("earlier", ADMIN, api_name="/download_export")[1].startswith("❌ run earlier has no merged "
                                                                                 "export yet")
    updates = stream(c, "earlier", ADMIN, CANARY, api_name="/export")
    assert any("shard" in u for u in updates) and updates[-1].startswith("✅ earlier: merged model"), updates
    path, note = c.predict("earlier", ADMIN, api_name="/download_export")
    names = zipfile.ZipFile(path).namelist()
    assert {"earlier-merged/config.json", "earlier-merged/model.safetensors", "earlier-merged/README.md",
            "earlier-merged/tokenizer_config.json", "earlier-merged/generation_config.json"} <= set(names), names
    pushed = c.predict("earlier", "someone/merged", True, CANARY, ADMIN, api_name="/push_export")
    assert pushed.startswith("❌") and ("offline" in pushed or "reach" in pushed), pushed  # no Hub in the tests
    assert c.predict("earlier", "someone/merged", True, "", ADMIN, api_name="/push_export").startswith(
        "❌ pushing needs a Hub token")
    assert c.predict("earlier", "../../etc", True, CANARY, ADMIN, api_name="/push_export").startswith("❌ repo id")
    for text in updates + [note, pushed]:
        assert CANARY not in text
    for f in (server["runs_root"] / "earlier").rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes(), f
