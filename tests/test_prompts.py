"""Exact Llama 2 prompt strings: one format for training rows and chat prompts alike."""
import pytest

from qlora.prompts import encode, format_chat, format_example, format_prompt


def test_single_turn():
    assert format_prompt([], "Hi there") == "<s>[INST] Hi there [/INST]"


def test_system_prompt_goes_inside_the_first_inst_block():
    assert format_prompt([], "Hi", system="Be brief.") == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"


def test_multi_turn():
    got = format_prompt([("Hi", "Hello!"), ("How are you?", "Fine.")], "Bye", system="S")
    assert got == ("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hello! </s>"
                   "<s>[INST] How are you? [/INST] Fine. </s>"
                   "<s>[INST] Bye [/INST]")


def test_training_row_is_the_chat_prompt_plus_answer_and_eos():
    row = format_example("What is 2+2?", "4", system="Math tutor")
    prompt = format_prompt([], "What is 2+2?", system="Math tutor")
    assert row == prompt + " 4 </s>"


def test_system_message_in_messages_list():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert format_chat(msgs) == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>"


def test_matches_guanaco_rows_exactly():
    # the real dataset's shape: "<s>[INST] q [/INST] a </s>" and multi-turn joined by "</s><s>"
    assert format_example("q", "a") == "<s>[INST] q [/INST] a </s>"


@pytest.mark.parametrize("msgs, match", [
    ([], "at least one user"),
    ([{"role": "assistant", "content": "x"}], "expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": 3}], "content must be text"),
])
def test_bad_conversations_are_refused(msgs, match):
    with pytest.raises(ValueError, match=match):
        format_chat(msgs)


def test_encode_gives_one_bos_and_eos_after_each_answer(llama_tokenizer):
    tok = llama_tokenizer
    ids = encode(format_prompt([("Hi", "Hello!")], "Bye"), tok)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # no doubled BOS
    assert ids.count(tok.bos_token_id) == 2 and ids.count(tok.eos_token_id) == 1
    # identical to the tokenizer parsing the literal markers itself, with no special tokens added on top
    text = format_example("q", "a")
    assert encode(text, tok) == tok(text, add_special_tokens=False)["input_ids"]
    assert encode(text, tok)[-1] == tok.eos_token_id
