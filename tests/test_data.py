"""Loading each dataset shape into Llama 2 text, and one clear error per kind of bad file."""
import json

import pytest

from qlora.data import DataError, prepare, preview, to_texts


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_text_shape_keeps_guanaco_rows_as_they_are(tmp_path):
    from conftest import GUANACO

    data = prepare(str(GUANACO))
    assert data.shape == "text" and len(data.train) == 1000 and data.dropped == 0
    import pyarrow.parquet as pq

    raw = pq.read_table(GUANACO).column("text").to_pylist()
    assert data.train[0] == raw[0].strip()  # already "<s>... </s>": nothing added, nothing doubled


def test_text_rows_get_bos_and_eos_when_missing_and_lose_a_doubled_bos(tmp_path):
    texts, shape, _ = to_texts([{"text": "[INST] q [/INST] a"}, {"text": "<s><s>[INST] q [/INST] a </s>"}], "t")
    assert texts == ["<s>[INST] q [/INST] a </s>", "<s>[INST] q [/INST] a </s>"]


def test_messages_shape_with_system_and_multi_turn(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}])
    data = prepare(path)
    assert data.shape == "messages"
    assert data.train == ["<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST] a2 </s>"]


def test_alpaca_shape_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("instruction,input,output\nTranslate,bonjour,hello\nSay hi,,hi\n", encoding="utf-8")
    data = prepare(str(csv_path))
    assert data.shape == "alpaca"
    assert data.train == ["<s>[INST] Translate\n\nbonjour [/INST] hello </s>", "<s>[INST] Say hi [/INST] hi </s>"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["q"], "output": ["a"]}), tmp_path / "a.parquet")
    assert prepare(str(tmp_path / "a.parquet")).train == ["<s>[INST] q [/INST] a </s>"]


def test_json_array_and_sample(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "<s>[INST] q [/INST] a </s>"}]), encoding="utf-8")
    assert prepare(str(tmp_path / "a.json")).train == ["<s>[INST] q [/INST] a </s>"]
    sample = prepare("sample")
    assert sample.shape == "messages" and len(sample.train) >= 40


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    a, b = prepare(path, eval_fraction=0.2, seed=1), prepare(path, eval_fraction=0.2, seed=1)
    assert len(a.eval) == 4 and len(a.train) == 16 and a.eval == b.eval and not set(a.eval) & set(a.train)


@pytest.mark.parametrize("name, content, match", [
    ("empty.jsonl", b"", r"empty.jsonl: the file is empty"),
    ("blank.jsonl", b"\n\n  \n", r"blank.jsonl: the file is empty"),
    ("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), r"latin1.jsonl: line 1: not UTF-8"),
    ("cut.jsonl", b'{"text": "<s>[INST] a [/INST] b </s>"}\n{"text": "<s>[INST] c', r"cut.jsonl: line 2: truncated"),
    ("mid.jsonl", b'{"text": "x"}\n{oops}\n{"text": "y"}\n', r"mid.jsonl: line 2: not valid JSON"),
    ("cols.jsonl", b'{"prompt": "a", "completion": "b"}\n', r"cols.jsonl: no usable column.*found columns: completion, prompt"),
    ("nums.jsonl", b'{"text": "ok"}\n{"text": 42}\n', r"nums.jsonl: line 2: column 'text' must be a string, got int 42"),
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


def test_preview_flags(llama_tokenizer):
    rows = preview(["<s>[INST] q [/INST] a </s>", "<s><s>[INST] q [/INST] a", "<s>" + "word " * 50 + "</s>"],
                   llama_tokenizer, max_length=20)
    assert rows[0]["flags"] == "ok" and rows[0]["tokens"] == len(llama_tokenizer("<s>[INST] q [/INST] a </s>",
                                                                              add_special_tokens=False)["input_ids"])
    assert "doubled BOS" in rows[1]["flags"] and "no EOS" in rows[1]["flags"]
    assert "truncated to 20" in rows[2]["flags"]
