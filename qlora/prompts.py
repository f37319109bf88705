"""The prompt format of a model: the one place where a conversation becomes a prompt string and its token ids.

Every prompt is made by `build`: training rows, the dataset preview, both chat panes, the "show prompt" inspector and
the sample answers during training. A conversation (role/content messages) is rendered in the run's format and
tokenized by its structure. The formats (`choose` picks one from the tokenizer; TrainConfig.prompt_format overrides;
the run folder keeps it (`PromptFormat.to_json`, read back by runs.prompt_format), so an adapter is always prompted
the way it was trained):

  llama2         <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user 1} [/INST] {answer 1} </s><s>[INST] {user 2} [/INST]
                 for Llama 2 (a tokenizer whose template is Llama 2's, or that has none and spells BOS/EOS <s>/</s>);
                 written here, as Meta's reference code does. Loss on the whole text, as the reference recipe.
  chat_template  the tokenizer's own Jinja chat template (apply_chat_template), with the BOS/EOS it writes and nothing
                 added; a tokenizer with no template and no Llama 2 markers gets FALLBACK_TEMPLATE, a plain
                 "### User: / ### Assistant:" layout. Loss on the answers only, each through its end-of-turn token.

Text is never structure. Only the markers the format writes itself become special tokens: message content (user,
assistant, system) is tokenized as plain text, so a typed "</s>" or "<|im_end|>" stays those characters, never an
EOS or a turn boundary. stdlib only: the tokenizer is passed in.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .config import PROMPT_FORMATS

BOS, EOS = "<s>", "</s>"
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2, CHAT_TEMPLATE = "llama2", "chat_template"

# For a model with neither a chat template nor Llama 2's markers (a base model): plain headers, the tokenizer's EOS
# after each answer (it is what generation stops on), and its BOS first when it has one of its own.
FALLBACK_TEMPLATE = (
    "{% if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + m['content'] + (eos_token or '') + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}")

# Text in a message that looks like a format's marker; kept as plain text, and flagged by the dataset preview.
MARKER_LIKE = (BOS, EOS, B_INST, E_INST, "<<SYS>>", "<</SYS>>")
_CHATML_LIKE = re.compile(r"<\|[^|<>\s]{1,40}\|>")

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
SCAFFOLD, CONTENT, ANSWER = "scaffold", "content", "answer"  # what a piece of a rendered prompt is


# --- the format --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptFormat:
    """How a run writes prompts: llama2, or chat_template with the Jinja template itself (it outlives the tokenizer)."""

    name: str
    template: str = ""
    source: str = ""  # chat_template: "tokenizer" (the model's own) or "fallback" (FALLBACK_TEMPLATE)

    @property
    def loss(self) -> str:
        """What training computes the loss on: "all" tokens for Llama 2, as the reference recipe trains guanaco;
        "answers" for a chat template, whose headers and default system prompt repeat in every row."""
        return "all" if self.name == LLAMA2 else "answers"

    def describe(self) -> str:
        what = {LLAMA2: "Llama 2 ([INST])", CHAT_TEMPLATE: "the model's own chat template"}[self.name]
        if self.source == "fallback":
            what = "a plain fallback (### User / ### Assistant; the model has no chat template)"
        loss = "the whole text" if self.loss == "all" else "the answers only (through their end-of-turn token)"
        return f"prompt format: {what}; loss on {loss}"

    def to_json(self) -> dict[str, Any]:
        if self.name == LLAMA2:  # the keys runs have always carried, plus the loss
            return {"name": LLAMA2, "bos": BOS, "eos": EOS, "inst": [B_INST, E_INST], "sys": [B_SYS, E_SYS],
                    "template": "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>",
                    "loss": self.loss}
        return {"name": CHAT_TEMPLATE, "source": self.source, "chat_template": self.template, "loss": self.loss}

    @classmethod
    def from_json(cls, data: Any) -> "PromptFormat":
        name = data.get("name") if isinstance(data, dict) else None
        if name == LLAMA2:
            return cls(LLAMA2)
        template = data.get("chat_template") if isinstance(data, dict) else None
        if name == CHAT_TEMPLATE and isinstance(template, str) and template.strip():
            return cls(CHAT_TEMPLATE, template, str(data.get("source") or "tokenizer"))
        raise ValueError(f"unknown prompt format {str(name)[:40]!r}")


def choose(tokenizer, requested: str = "auto") -> PromptFormat:
    """The format for a tokenizer: Llama 2 for Llama 2, else its chat template, else the fallback (`requested` wins)."""
    if requested not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: must be {', '.join(PROMPT_FORMATS)} (got {requested!r})")
    template = _template_of(tokenizer)
    if requested == LLAMA2 or (requested == "auto" and _is_llama2(tokenizer, template)):
        return PromptFormat(LLAMA2)
    if template:
        return PromptFormat(CHAT_TEMPLATE, template, "tokenizer")
    return PromptFormat(CHAT_TEMPLATE, FALLBACK_TEMPLATE, "fallback")


def _template_of(tokenizer) -> str | None:
    try:
        return tokenizer.get_chat_template() if getattr(tokenizer, "chat_template", None) else None
    except ValueError:  # several named templates and no default
        return None


def _is_llama2(tokenizer, template: str | None) -> bool:
    if template:
        return B_INST in template and "<<SYS>>" in template  # Meta's Llama 2 chat template
    return getattr(tokenizer, "bos_token", None) == BOS and getattr(tokenizer, "eos_token", None) == EOS


# --- conversations -----------------------------------------------------------------------------------------
def conversation(messages: Sequence[Any], system: str = "") -> list[dict[str, str]]:
    """A checked conversation: an optional system message, then user and assistant turns in turn, content stripped.

    `system`, if given, replaces a leading system message; a blank system is left out. ValueError names the message
    by its number in `messages`, counting from 1 and counting a leading system message.
    """
    msgs = list(messages)
    start = 0
    if msgs and isinstance(msgs[0], Mapping) and msgs[0].get("role") == "system":
        content = msgs[0].get("content")
        if not isinstance(content, str):
            raise ValueError(f"message 1: content must be text, got {type(content).__name__}")
        system = system or content
        start = 1
    if len(msgs) == start:
        raise ValueError("a conversation needs at least one user message")
    out = [{"role": "system", "content": system.strip()}] if system.strip() else []
    expect = "user"
    for n, m in enumerate(msgs[start:], start=start + 1):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {n}: expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role != expect:
            raise ValueError(f"message {n}: expected role {expect!r}, got {role!r} "
                             "(turns must alternate user/assistant)")
        if not isinstance(content, str):
            raise ValueError(f"message {n}: content must be text, got {type(content).__name__}")
        out.append({"role": role, "content": content.strip()})
        expect = "assistant" if role == "user" else "user"
    return out


def chat_conversation(history: Iterable[tuple[str, str]], user: str, system: str = "") -> list[dict[str, str]]:
    """A chat's conversation: (user, assistant) pairs already exchanged, then the new user turn."""
    msgs: list[dict[str, str]] = []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": user})
    return conversation(msgs, system)


# --- Llama 2 strings ---------------------------------------------------------------------------------------
def format_llama2(messages: Sequence[Message]) -> str:
    """A conversation in the Llama 2 format, content exactly as given (a checked conversation has it stripped)."""
    return "".join(text for _, text in _llama2_pieces(messages))


def format_chat(messages: Sequence[Message], system: str = "") -> str:
    """Render a conversation in the Llama 2 format.

    If the last message is from the user, the result ends with "[/INST]" (a prompt to continue); if it is from the
    assistant, it ends with "</s>" (a complete training row). A leading system message, or `system`, goes inside
    the first [INST] block.
    """
    return format_llama2(conversation(messages, system))


def format_prompt(history: Iterable[tuple[str, str]], user: str, system: str = "") -> str:
    """Chat prompt from (user, assistant) pairs already exchanged plus the new user turn."""
    return format_llama2(chat_conversation(history, user, system))


def format_example(instruction: str, answer: str, system: str = "") -> str:
    """One training row: the single-turn chat prompt plus the answer and EOS."""
    return format_chat([{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}], system)


_NEXT_TURN = re.compile(f"{re.escape(EOS)}\\s*{re.escape(BOS)}\\s*(?={re.escape(B_INST)})")
_LOOSE_SYS = re.compile(r"<<SYS>>\s*(.*?)\s*<</SYS>>\s*", re.S)


def parse_llama2(text: str) -> list[dict[str, str]]:
    """The messages of a Llama 2 formatted row (guanaco's rows), read by the format's structure.

    A turn is "[INST] user [/INST] answer", turns are joined by "</s><s>", a first turn may open with a <<SYS>> block.
    A leading <s> (or a doubled one) and a last </s> may be missing. Anything else, "<s>" or "</s>" inside an answer
    included, is content. Content is kept as written (the one space each side of it is the format's), so
    `format_llama2(parse_llama2(row)) == row` for a well-formed row. ValueError says what is wrong.
    """
    body = text.strip()
    while body.startswith(BOS):
        body = body[len(BOS):].lstrip()
    if body.endswith(EOS):
        body = body[:-len(EOS)]
    if not body.startswith(B_INST):
        raise ValueError(f"not a Llama 2 chat row: expected '<s>[INST] question [/INST] answer </s>', "
                         f"got {text.strip()[:40]!r}")
    messages: list[dict[str, str]] = []
    for n, turn in enumerate(_NEXT_TURN.split(body), start=1):
        user, sep, answer = turn[len(B_INST):].partition(E_INST)
        if not sep:
            raise ValueError(f"not a Llama 2 chat row: turn {n} has no '[/INST]' after '[INST]'")
        user = _unpad(user)
        if n == 1 and user.startswith("<<SYS>>"):
            if user.startswith(B_SYS) and E_SYS in user:
                system, _, user = user[len(B_SYS):].partition(E_SYS)
            elif m := _LOOSE_SYS.match(user):
                system, user = m.group(1), user[m.end():]
            else:
                raise ValueError("not a Llama 2 chat row: '<<SYS>>' without '<</SYS>>'")
            messages.append({"role": "system", "content": system})
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _unpad(answer)}]
    return messages


def _unpad(s: str) -> str:
    """Drop the format's one separator space on each side."""
    s = s[1:] if s.startswith(" ") else s
    return s[:-1] if s.endswith(" ") else s


# --- prompts: rendered and tokenized by their structure ----------------------------------------------------
@dataclass
class Prompt:
    """A conversation in a format: the string, its token ids, which ids are answer, which are the format's markers."""

    text: str
    ids: list[int]
    answer: list[bool]  # per id: inside an assistant answer, through the end-of-turn marker that closes it
    marker: list[bool]  # per id: a special token the format wrote (never one typed in a message)
    content_markers: list[str]  # marker-like text found in the messages, kept as plain text


def build(fmt: PromptFormat, tokenizer, messages: Sequence[Message]) -> Prompt:
    """THE prompt builder. A conversation ending with the user's turn is a prompt to answer (the generation prompt
    follows); one ending with an assistant answer is a training row. `messages` is a checked conversation
    (`conversation`, `chat_conversation`, or `parse_llama2`)."""
    if fmt.name == LLAMA2:
        pieces = _llama2_pieces(messages)
        markers = {BOS: tokenizer.bos_token_id, EOS: tokenizer.eos_token_id}  # a tokenizer without BOS gets none
    else:
        pieces = _template_pieces(fmt, tokenizer, messages)
        markers = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.content.strip()}
    return _tokenize(pieces, tokenizer, markers)


def chat_prompt(fmt: PromptFormat, tokenizer, history: Iterable[tuple[str, str]], user: str,
                system: str = "") -> Prompt:
    """What a chat pane sends: earlier (user, answer) pairs, the new user turn and an optional system prompt."""
    return build(fmt, tokenizer, chat_conversation(history, user, system))


def stop_ids(fmt: PromptFormat, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the end-of-turn marker the format writes after an answer."""
    probe = build(fmt, tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    ends = [i for i, a, m in zip(probe.ids, probe.answer, probe.marker) if a and m]
    return list(dict.fromkeys(([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []) + ends[-1:]))


def _llama2_pieces(messages: Sequence[Message]) -> list[tuple[str, str]]:
    pieces: list[tuple[str, str]] = []
    system, first = "", True
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            system = content
        elif role == "user":
            pieces.append((SCAFFOLD, f"{BOS}{B_INST} "))
            if first and system.strip():
                pieces += [(SCAFFOLD, B_SYS), (CONTENT, system), (SCAFFOLD, E_SYS)]
            pieces += [(CONTENT, content), (SCAFFOLD, f" {E_INST}")]
            first = False
        else:
            pieces += [(SCAFFOLD, " "), (ANSWER, content), (SCAFFOLD, f" {EOS}")]
    return pieces


# The sentinels' secret, once per process: one compiled pattern serves every prompt (a pattern made per prompt missed
# re's cache and took a fifth of tokenizing). Text can't forge a sentinel without the nonce, and a template that
# repeats or drops one is caught by the count check below.
_NONCE = uuid.uuid4().hex[:12]
_MARK = re.compile(f"(\ue000{_NONCE}:\\d+\ue001)")


def _template_pieces(fmt: PromptFormat, tokenizer, messages: Sequence[Message]) -> list[tuple[str, str]]:
    """Render the template with a unique sentinel in place of each message's content, then put the content back as
    pieces of its own: what is not a sentinel is the template's scaffold."""
    marks = [f"\ue000{_NONCE}:{i}\ue001" for i in range(len(messages))]
    sentinel_msgs = [{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)]
    try:
        rendered = tokenizer.apply_chat_template(sentinel_msgs, chat_template=fmt.template, tokenize=False,
                                                 add_generation_prompt=messages[-1]["role"] != "assistant")
    except Exception as e:  # jinja2's TemplateError, or the template's own raise_exception()
        raise ValueError(f"the chat template refused this conversation ({type(e).__name__}: {str(e)[:200]})") from None
    parts = _MARK.split(rendered)
    if sorted(parts[1::2]) != sorted(marks):
        raise ValueError("the chat template rewrites, repeats or drops message text, so it cannot be kept apart from "
                         "the template's markers; use prompt_format: llama2")
    pieces: list[tuple[str, str]] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pieces.append((SCAFFOLD, part))
        else:
            m = messages[marks.index(part)]
            pieces.append((ANSWER if m["role"] == "assistant" else CONTENT, m["content"]))
    return pieces


def _tokenize(pieces: list[tuple[str, str]], tokenizer, markers: Mapping[str, int | None]) -> Prompt:
    """Token ids by structure: marker strings in the scaffold become their ids; everything between is tokenized with
    special-token parsing off, so content can never produce one. Between two markers, scaffold and content are
    tokenized together, as the tokenizer would tokenize the whole string (on Llama 2 the ids are exactly those of
    tokenizing the rendered text with its <s>/</s> read as BOS/EOS)."""
    text = "".join(t for _, t in pieces)
    spans: list[tuple[int, int, str]] = []  # (start, end, kind) of each piece in `text`
    pos = 0
    for kind, t in pieces:
        if t:
            spans.append((pos, pos + len(t), kind))
            pos += len(t)
    marker_re = re.compile("|".join(map(re.escape, sorted(markers, key=len, reverse=True))) or "(?!)")
    plain_re = _non_special_added(tokenizer)
    fast = getattr(tokenizer, "is_fast", False)
    tokens: list[tuple[int, int, int, bool]] = []  # (id, start, end, is marker)
    cut = 0

    def encode_to(end: int) -> None:
        nonlocal cut
        if end > cut:
            tokens.extend((i, s, e, False) for i, s, e in _encode_text(tokenizer, text, cut, end, fast))
        cut = end

    for start, end, kind in spans:
        if kind == SCAFFOLD:
            for m in marker_re.finditer(text, start, end):
                encode_to(m.start())
                if markers[m.group()] is not None:
                    tokens.append((markers[m.group()], m.start(), m.end(), True))
                cut = m.end()
        elif plain_re is not None:  # a non-special added token typed in a message: plain text too
            for m in plain_re.finditer(text, start, end):
                encode_to(m.start())
                tokens.extend((i, m.start(), m.end(), False) for i in _encode_plain(tokenizer, m.group()))
                cut = m.end()
        if not fast:  # no offsets: cut at every piece, so each token's piece is known
            encode_to(end)
    encode_to(len(text))

    kinds = _token_kinds(tokens, spans)
    answer = [ANSWER in k for k in kinds]
    for i in range(len(tokens) - 1):  # an answer runs through the end-of-turn marker that closes it, if one does
        if answer[i] and not answer[i + 1]:
            j = i + 1
            while j < len(tokens) and not tokens[j][3] and kinds[j] == {SCAFFOLD}:
                j += 1
            if j < len(tokens) and tokens[j][3]:
                answer[i + 1:j + 1] = [True] * (j - i)
    in_messages = "\n".join(text[s:e] for s, e, kind in spans if kind != SCAFFOLD)
    return Prompt(text, [t[0] for t in tokens], answer, [t[3] for t in tokens], _markers_in(in_messages, tokenizer))


def _token_kinds(tokens: list[tuple[int, int, int, bool]], spans: list[tuple[int, int, str]]) -> list[set[str]]:
    """Per token, the kinds of the pieces its characters come from (tokens and pieces are both in text order)."""
    out, k = [], 0
    for _, start, end, _ in tokens:
        while k < len(spans) - 1 and spans[k][1] <= start:
            k += 1
        found, j = set(), k
        while j < len(spans) and spans[j][0] < max(end, start + 1):
            found.add(spans[j][2])
            j += 1
        out.append(found)
    return out


def _encode_text(tokenizer, text: str, start: int, end: int, fast: bool) -> list[tuple[int, int, int]]:
    """(id, start, end) for text[start:end], special-token parsing off."""
    chunk = text[start:end]
    if fast:
        enc = tokenizer(chunk, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return [(i, start + s, start + e) for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    ids = tokenizer(chunk, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [(i, start, end) for i in ids]


def _non_special_added(tokenizer) -> re.Pattern | None:
    """Added tokens that are not special (a Qwen3 "<think>"): split_special_tokens still parses them, so content
    containing one is cut there and encoded without the added vocabulary. Whitespace ones (Gemma's) are just text."""
    found = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
             if not t.special and t.content.strip()]
    return re.compile("|".join(map(re.escape, sorted(found, key=len, reverse=True)))) if found else None


def _encode_plain(tokenizer, text: str) -> list[int]:
    """`text` through the tokenizer's own pipeline (normalizer, pre-tokenizer, model), without its added tokens."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [t.id for s in splits for t in backend.model.tokenize(s)]


def _markers_in(text: str, tokenizer) -> list[str]:
    """Marker-like strings in message text: the Llama 2 markers, the tokenizer's special tokens, any <|...|>."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t.strip()]
    found = [m for m in dict.fromkeys([*MARKER_LIKE, *specials]) if m in text]
    return list(dict.fromkeys(found + _CHATML_LIKE.findall(text)))
