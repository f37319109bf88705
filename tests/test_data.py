"""Loading each dataset shape into conversations (shown here as Llama 2 text), and one clear error per kind of bad
file."""
import json

import pytest

from qlora.data import DataError, keep_answered, prepare, preview, to_conversations, tokenize
from qlora.prompts import LLAMA2, PromptFormat, choose, format_llama2


def texts(convs):
    return [format_llama2(c) for c in convs]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_text_shape_keeps_guanaco_rows_as_they_are(tmp_path):
    from conftest import GUANACO

    data = prepare(str(GUANACO))
    # three multi-turn rows hold an empty turn (rows 435 and 511: an empty user turn; row 900: an empty answer)
    assert data.shape == "text" and len(data.train) == 997
    assert data.dropped_by == {"empty user turn": 2, "empty answer": 1}
    import pyarrow.parquet as pq

    raw = pq.read_table(GUANACO).column("text").to_pylist()
    assert texts(data.train)[0] == raw[0].strip()  # already "<s>... </s>": nothing added, nothing doubled


def test_text_rows_get_bos_and_eos_when_missing_and_lose_a_doubled_bos(tmp_path):
    convs, shape, _ = to_conversations([{"text": "[INST] q [/INST] a"}, {"text": "<s><s>[INST] q [/INST] a </s>"}],
                                       "t")
    assert texts(convs) == ["<s>[INST] q [/INST] a </s>", "<s>[INST] q [/INST] a </s>"] and shape == "text"


def test_messages_shape_with_system_and_multi_turn(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}])
    data = prepare(path)
    assert data.shape == "messages"
    assert texts(data.train) == ["<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST] a2 </s>"]


def test_alpaca_shape_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("instruction,input,output\nTranslate,bonjour,hello\nSay hi,,hi\n", encoding="utf-8")
    data = prepare(str(csv_path))
    assert data.shape == "alpaca"
    assert texts(data.train) == ["<s>[INST] Translate\n\nbonjour [/INST] hello </s>", "<s>[INST] Say hi [/INST] hi </s>"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["q"], "output": ["a"]}), tmp_path / "a.parquet")
    assert texts(prepare(str(tmp_path / "a.parquet")).train) == ["<s>[INST] q [/INST] a </s>"]


def test_json_array_and_sample(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "<s>[INST] q [/INST] a </s>"}]), encoding="utf-8")
    assert texts(prepare(str(tmp_path / "a.json")).train) == ["<s>[INST] q [/INST] a </s>"]
    sample = prepare("sample")
    assert sample.shape == "messages" and len(sample.train) >= 40


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    a, b = prepare(path, eval_fraction=0.2, seed=1), prepare(path, eval_fraction=0.2, seed=1)
    assert len(a.eval) == 4 and len(a.train) == 16 and a.eval == b.eval and not set(texts(a.eval)) & set(texts(a.train))


@pytest.mark.parametrize("name, content, match", [
    ("empty.jsonl", b"", r"empty.jsonl: the file is empty"),
    ("blank.jsonl", b"\n\n  \n", r"blank.jsonl: the file is empty"),
    ("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), r"latin1.jsonl: line 1: not UTF-8"),
    ("cut.jsonl", b'{"text": "<s>[INST] a [/INST] b </s>"}\n{"text": "<s>[INST] c', r"cut.jsonl: line 2: truncated"),
    ("mid.jsonl", b'{"text": "x"}\n{oops}\n{"text": "y"}\n', r"mid.jsonl: line 2: not valid JSON"),
    ("cols.jsonl", b'{"prompt": "a", "completion": "b"}\n', r"cols.jsonl: no usable column.*found columns: completion, prompt"),
    ("nums.jsonl", b'{"text": "[INST] ok [/INST] ok"}\n{"text": 42}\n',
     r"nums.jsonl: line 2: column 'text' must be a string, got int 42"),
    ("plain.jsonl", b'{"text": "[INST] ok [/INST] ok"}\n\n{"text": "just some prose"}\n',
     r"plain.jsonl: line 3: column 'text': not a Llama 2 chat row: expected '<s>\[INST\] question \[/INST\] answer"),
    ("turns.jsonl", b'{"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "a"}]}\n',
     r"turns.jsonl: line 1: column 'messages': message 2: expected role 'user', got 'assistant'"),
    ("nulls.jsonl", b'{"text": null}\n{"text": ""}\n', r"nulls.jsonl: all 2 rows are empty"),
    ("list.jsonl", b'[1, 2]\n', r"list.jsonl: line 1: expected a JSON object"),
    ("bad.parquet", b"not parquet at all", r"bad.parquet: not a readable parquet file"),
    ("data.txt", b"hello", r"data.txt: unsupported file type .txt"),
    ("msgs.jsonl", b'{"messages": [{"role": "user", "content": "q"}]}\n', r"msgs.jsonl: line 1: the last message must be"),
])
def test_bad_files_get_one_clear_error(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        prepare(str(path))


def test_missing_file_and_invalid_hub_id(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: cannot read the file"):
        prepare(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"not a local file and not a valid Hub dataset id"):
        prepare("../../no/such thing")


def test_empty_rows_are_dropped_and_counted(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", [{"text": "<s>[INST] q [/INST] a </s>"}, {"text": "  "}, {"text": None}])
    data = prepare(path)
    assert len(data.train) == 1 and data.dropped == 2
    assert data.dropped_by == {"empty text": 1, "null": 1} and data.skipped() == "2 rows skipped (1 empty text, 1 null)"


def test_preview_flags(llama_tokenizer):
    """Flags for the format's special tokens where they belong, truncation, and marker-like text in the content."""
    convs = to_conversations([{"text": "<s>[INST] q [/INST] a </s>"}, {"text": "<s>[INST] q [/INST] " + "word " * 50},
                              {"text": "<s>[INST] " + "word " * 50 + "[/INST] a"},
                              {"text": "<s>[INST] what is <s> in HTML? [/INST] strike-through: <s>old</s> </s>"}],
                             "t")[0]
    rows = preview(convs, llama_tokenizer, max_length=20)
    assert rows[0]["flags"] == "ok" and rows[0]["tokens"] == len(llama_tokenizer("<s>[INST] q [/INST] a </s>",
                                                                              add_special_tokens=False)["input_ids"])
    assert rows[1]["flags"] == "no </s> after the last answer, truncated to 20 tokens"
    assert rows[2]["flags"] == "truncation to 20 tokens removes the whole answer, truncated to 20 tokens"
    assert preview(convs[3:], llama_tokenizer)[0]["flags"] == ("content contains '<s>' (kept as plain text), "
                                                               "content contains '</s>' (kept as plain text)")
    # a template that writes its BOS twice is caught as the old doubled-BOS check caught guanaco rows
    from conftest import CHATML_TEMPLATE, chatml_tokenizer

    tok = chatml_tokenizer()
    tok.chat_template = "{{ bos_token + bos_token }}" + CHATML_TEMPLATE
    assert preview(convs[:1], tok)[0]["flags"] == "doubled <s>"


def test_each_kind_of_empty_row_is_dropped_and_named(tmp_path):
    rows = [{"text": "<s>[INST] q [/INST] a </s>"},
            {"text": "<s>[INST]  [/INST] a </s>"}, {"text": "<s>[INST] q [/INST]  </s>"}, {"text": "[INST] q [/INST]"},
            {"text": "  "}, {"text": None},
            {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, {"messages": []},
            {"instruction": "", "output": "a"}, {"instruction": "q", "output": "  "}, {"unrelated": 1}]
    convs, shape, dropped = to_conversations(rows, "e.jsonl")
    assert texts(convs) == ["<s>[INST] q [/INST] a </s>"] and shape == "text"
    assert dropped == {"empty user turn": 2, "empty answer": 3, "empty text": 1, "null": 1, "no messages": 1,
                       "empty instruction": 1, "empty output": 1, "no usable column": 1}
    with pytest.raises(DataError, match=r"e.jsonl: all 2 rows are empty \(1 empty answer, 1 null\)"):
        to_conversations([{"text": "<s>[INST] q [/INST] </s>"}, {"text": None}], "e.jsonl")


def test_a_file_mixing_shapes_reads_each_row_by_its_own_shape(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [
        {"text": "<s>[INST] q1 [/INST] a1 </s>"},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
        {"instruction": "q3", "output": "a3"}, {"text": "<s>[INST] q4 [/INST] a4 </s>"}])
    data = prepare(path)
    assert texts(data.train) == [f"<s>[INST] q{i} [/INST] a{i} </s>" for i in (1, 2, 3, 4)]
    assert data.shape == "mixed (2 text, 1 messages, 1 alpaca)" and data.dropped == 0


def test_labels_follow_the_formats_loss(llama_tokenizer):
    from conftest import chatml_tokenizer

    convs = to_conversations([{"instruction": "q", "output": "a"}], "t")[0]
    whole = tokenize(convs, llama_tokenizer, 64)[0]  # Llama 2: the whole text, as the reference recipe
    assert whole.labels == whole.ids and whole.answer_tokens == 3
    tok = chatml_tokenizer()
    row = tokenize(convs, tok, 64, choose(tok))[0]  # a chat template: the answer and its <|im_end|> only
    trained = [i for i in row.labels if i != -100]
    assert tok.decode(trained[:-1]) == "a" and trained[-1] == 32001 and row.answer_tokens == len(trained)
    first = next(k for k, lab in enumerate(row.labels) if lab != -100)  # one run: the header and the last "\n" out
    assert row.labels == [-100] * first + trained + [-100] * (len(row.ids) - first - len(trained))


def test_truncation_that_removes_every_answer_refuses_and_some_warns(llama_tokenizer):
    long_q = "word " * 40
    convs = to_conversations([{"instruction": long_q, "output": "a"}, {"instruction": "q", "output": "a"}], "t")[0]
    rows = tokenize(convs, llama_tokenizer, 20, PromptFormat(LLAMA2))
    kept, warning = keep_answered(rows, 20)
    assert len(kept) == 1 and warning == ("1 of 2 train rows dropped: truncation to max_length=20 tokens removes "
                                          "their whole answer")
    with pytest.raises(DataError, match=r"no train row keeps any answer token within max_length=20.*raise max_length"):
        keep_answered(rows[:1], 20)
    assert keep_answered(rows[:1], 20, "eval", required=False)[0] == []


def test_a_row_the_chat_template_refuses_is_named():
    from conftest import CHATML_TEMPLATE, chatml_tokenizer

    tok = chatml_tokenizer()  # like Gemma 1's template: no system role
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + CHATML_TEMPLATE)
    convs = to_conversations([{"messages": [{"role": "system", "content": "Be a pirate"},
                                            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
                             "t")[0]
    with pytest.raises(DataError, match=r"^t: row 1: the chat template refused this conversation \(.*System role "
                                        r"not supported\)"):
        tokenize(convs, tok, 64, choose(tok))
    with pytest.raises(DataError, match=r"^the row that begins 'Be a pirate': the chat template refused"):
        tokenize([list(convs[0])], tok, 64, choose(tok))  # messages that carry no place
