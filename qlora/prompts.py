"""The Llama 2 chat format, the one source of truth for training rows and chat prompts alike.

    <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user 1} [/INST] {answer 1} </s><s>[INST] {user 2} [/INST]

A training row is the chat prompt followed by " {answer} </s>", so what the model learns to continue is exactly what
it is later asked to continue. `<s>`/`</s>` are written as literal markers (guanaco's rows carry them too) and become
the tokenizer's BOS/EOS ids in `encode`, never a second BOS added on top. stdlib only.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

BOS, EOS = "<s>", "</s>"
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
FORMAT_NAME = "llama2"

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


def format_chat(messages: Sequence[Message], system: str = "") -> str:
    """Render a conversation in the Llama 2 format.

    If the last message is from the user, the result ends with "[/INST]" (a prompt to continue); if it is from the
    assistant, it ends with "</s>" (a complete training row). A leading system message, or `system`, goes inside
    the first [INST] block.
    """
    msgs = list(messages)
    if msgs and msgs[0].get("role") == "system":
        system = system or msgs[0].get("content", "")
        msgs = msgs[1:]
    if not msgs:
        raise ValueError("a conversation needs at least one user message")
    out: list[str] = []
    expect = "user"
    for i, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        if role != expect:
            raise ValueError(f"message {i}: expected role {expect!r}, got {role!r} (turns must alternate user/assistant)")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be text, got {type(content).__name__}")
        if role == "user":
            if i == 0 and system.strip():
                content = f"{B_SYS}{system.strip()}{E_SYS}{content.strip()}"
            out.append(f"{BOS}{B_INST} {content.strip()} {E_INST}")
            expect = "assistant"
        else:
            out.append(f" {content.strip()} {EOS}")
            expect = "user"
    return "".join(out)


def format_prompt(history: Iterable[tuple[str, str]], user: str, system: str = "") -> str:
    """Chat prompt from (user, assistant) pairs already exchanged plus the new user turn."""
    msgs: list[dict[str, str]] = []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": user})
    return format_chat(msgs, system)


def format_example(instruction: str, answer: str, system: str = "") -> str:
    """One training row: the single-turn chat prompt plus the answer and EOS."""
    return format_chat([{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}], system)


_MARKERS = re.compile(f"({re.escape(BOS)}|{re.escape(EOS)})")


def encode(text: str, tokenizer) -> list[int]:
    """Token ids for a Llama 2 formatted string: literal <s>/</s> become the tokenizer's own BOS/EOS ids.

    Works for any tokenizer (SmolLM2's BOS is not spelled "<s>"), never adds a special token of its own, so a row
    that starts with "<s>" gets exactly one BOS.
    """
    ids: list[int] = []
    for piece in _MARKERS.split(text):
        if piece == BOS:
            if tokenizer.bos_token_id is not None:
                ids.append(tokenizer.bos_token_id)
        elif piece == EOS:
            ids.append(tokenizer.eos_token_id)
        elif piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids
