"""TrainConfig and GenerationSettings: the recipe's knobs, validated on construction; YAML round trip."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import message

EMBEDDED_MODEL = "smollm2-135m"
SAMPLE_DATASET = "sample"
DEFAULT_MODEL = "NousResearch/Llama-2-7b-chat-hf"
DEFAULT_DATASET = "mlabonne/guanaco-llama2-1k"
# auto: Llama 2 for a Llama 2 tokenizer, else the tokenizer's chat template, else a plain fallback (qlora/prompts.py)
PROMPT_FORMATS = ("auto", "llama2", "chat_template")

# A Hub id is "name" or "owner/name"; no "..", no leading/trailing punctuation (huggingface_hub's rule, simplified).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# A run name is a folder name. A file name holds 255 bytes (not characters: a CJK letter is 3 bytes in UTF-8), and the
# name gets suffixes: "-N" from runs.new_run_dir, "-adapter-xxxxxx.zip" for a download.
RUN_NAME_MAX_BYTES = 200
# Folder names Windows cannot create (a downloaded zip is unpacked there too), with or without an extension.
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and ".." not in value and not value.endswith((".", "-"))


def hub_token(token: str | None) -> str | bool:
    """What to hand a Hub library as `token`: the caller's, or False.

    Given None, huggingface_hub, transformers and datasets fall back by themselves to the HF_TOKEN variable or a stored
    login: in an open app that would fetch gated models with the Space owner's account for any visitor. The caller
    (the CLI reading its environment, the app's admin gate) decides which token applies; the libraries never do.
    """
    return token or False


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults are the reference recipe (Llama-2-7B chat on guanaco-1k, QLoRA)."""

    base_model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET  # Hub id, local .jsonl/.json/.csv/.parquet, or "sample"
    # May base_model / dataset name paths on this machine? The CLI: yes, its user owns the machine. The app: never for
    # the model (Hub ids, the embedded model and the owner's QLORA_MODELS_DIR only); for the dataset only an upload.
    # False means a Hub id is resolved on the Hub alone, never as a relative path (qlora.model.resolve, data.load_rows).
    allow_local_model: bool = True
    allow_local_dataset: bool = True
    output_dir: str = "runs"
    run_name: str = ""  # empty: a timestamped name is chosen at start
    # LoRA
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    # quantization: nf4 is QLoRA; "none" keeps the base in its float dtype (small models, CPUs)
    quantize: str = "nf4"
    # optimisation
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    optimizer: str = "paged_adamw_32bit"
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    max_length: int = 1024
    group_by_length: bool = True
    gradient_checkpointing: bool = True
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto picks bf16 where the card has it, fp16 otherwise
    # the fast path (see bench/README.md): padding-free batches of pre-truncated rows
    padding_free: bool = False
    # auto: qlora/speed.py picks fused kernels, flash attention and how many layers checkpoint from the card;
    # off: the recipe exactly as configured (the reference the benchmark compares against)
    speed: str = "auto"
    # data
    eval_fraction: float = 0.0
    max_rows: int = 0  # 0: all rows
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 0  # 0: only the final save; > 0 also writes resumable checkpoints
    sample_every: int = 0  # > 0: answer the sample prompts with the current adapter every N steps
    prompt_format: str = "auto"  # auto | llama2 | chat_template: how rows and chat prompts are written

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {what} (got {getattr(self, name)!r})")

        for f in fields(self):  # YAML's "field:" with no value, or "field: null"
            if getattr(self, f.name) is None:
                raise ValueError(f"{f.name}: has no value (null); give one, or leave the field out for its default")
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        need(isinstance(self.base_model, str) and self.base_model.strip() != "", "base_model", "must not be empty")
        need(isinstance(self.dataset, str) and self.dataset.strip() != "", "dataset", "must not be empty")
        need(isinstance(self.output_dir, str) and self.output_dir.strip() != "", "output_dir", "must not be empty")
        need(isinstance(self.run_name, str), "run_name", "must be text (in YAML, quote a name made of digits)")
        problem = run_name_problem(self.run_name)
        need(problem is None, "run_name", problem or "")
        need(_is_int(self.lora_r) and 1 <= self.lora_r <= 1024, "lora_r", "must be an integer from 1 to 1024")
        need(_is_num(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(_is_num(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(isinstance(self.target_modules, list) and len(self.target_modules) > 0
             and all(isinstance(m, str) and re.fullmatch(r"[\w.-]+", m) for m in self.target_modules),
             "target_modules", "must be a non-empty list of module names, e.g. q_proj,v_proj or all-linear")
        need(self.quantize in ("nf4", "none"), "quantize", "must be nf4 or none")
        need(_is_int(self.batch_size) and 1 <= self.batch_size <= 1024, "batch_size", "must be an integer from 1 to 1024")
        need(_is_int(self.grad_accum) and 1 <= self.grad_accum <= 1024, "grad_accum", "must be an integer from 1 to 1024")
        need(_is_num(self.learning_rate) and 0 < self.learning_rate <= 1, "learning_rate", "must be in (0, 1]")
        need(self.lr_scheduler in ("cosine", "linear", "constant", "constant_with_warmup"),
             "lr_scheduler", "must be cosine, linear, constant or constant_with_warmup")
        need(_is_num(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(_is_num(self.weight_decay) and 0 <= self.weight_decay <= 1, "weight_decay", "must be in [0, 1]")
        need(_is_num(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        need(self.optimizer in ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused"),
             "optimizer", "must be paged_adamw_32bit, paged_adamw_8bit, adamw_torch or adamw_torch_fused")
        need(_is_num(self.epochs) and 0 < self.epochs <= 100, "epochs", "must be in (0, 100]")
        need(_is_int(self.max_steps) and (self.max_steps == -1 or 1 <= self.max_steps <= 1_000_000),
             "max_steps", "must be -1 (use epochs) or from 1 to 1000000")
        need(_is_int(self.max_length) and 16 <= self.max_length <= 32768, "max_length", "must be an integer from 16 to 32768")
        need(self.precision in ("auto", "bf16", "fp16", "fp32"), "precision", "must be auto, bf16, fp16 or fp32")
        need(self.speed in ("auto", "off"), "speed", "must be auto or off")
        need(self.prompt_format in PROMPT_FORMATS, "prompt_format", "must be auto, llama2 or chat_template")
        need(_is_num(self.eval_fraction) and 0 <= self.eval_fraction <= 0.5, "eval_fraction", "must be in [0, 0.5]")
        need(_is_int(self.max_rows) and self.max_rows >= 0, "max_rows", "must be >= 0")
        need(_is_int(self.seed) and 0 <= self.seed < 2**32, "seed", "must be an integer from 0 to 2**32-1")
        for name in ("logging_steps",):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        for name in ("save_steps", "sample_every"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        for name in ("group_by_length", "gradient_checkpointing", "padding_free", "allow_local_model",
                     "allow_local_dataset"):
            need(isinstance(getattr(self, name), bool), name, "must be true or false")

    @property
    def quantize_words(self) -> str:
        """What `quantize` means, as the preflight and the run log say it ("none" alone reads as no setting)."""
        return "4-bit nf4" if self.quantize == "nf4" else "no 4-bit quantization"

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_yaml(self) -> str:
        import yaml  # pyyaml ships with transformers' deps; imported here so config stays stdlib-only at import

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "TrainConfig":
        where, data = read_yaml_fields(text_or_path)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def read_yaml_fields(text_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    """(where, the fields a YAML file or text sets), unvalidated; errors name the file.

    A Path is always a file; a str is a file if it names one (or ends in .yaml/.yml), YAML text otherwise.
    """
    import yaml  # pyyaml ships with transformers' deps; imported here so config stays stdlib-only at import

    if isinstance(text_or_path, str) and ("\n" in text_or_path or not (
            os.path.exists(text_or_path) or text_or_path.endswith((".yaml", ".yml")))):
        where, text = "config", text_or_path
    else:
        where = str(text_or_path)
        try:
            text = Path(text_or_path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"{where}: config file not found") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 (byte at offset {e.start}); save the config as UTF-8") from None
        except OSError as e:
            raise ValueError(f"{where}: cannot read the config file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({message(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of field: value")
    return where, _yaml_floats(data)


def _yaml_floats(data: dict[str, Any]) -> dict[str, Any]:
    """YAML reads 1e-4 (no dot) as the string "1e-4": for a float field, a numeric string is the number it spells."""
    import typing

    hints = typing.get_type_hints(TrainConfig)
    out = dict(data)
    for name, value in data.items():
        if hints.get(name) is float and isinstance(value, str):
            try:
                out[name] = float(value)
            except ValueError:
                pass  # validation names the field
    return out


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run folder (which `runs.list_runs` must list and Windows must unpack), or None."""
    if re.fullmatch(r"[\w.-]{0,100}", name) is None:
        return "letters, digits, '_', '-', '.' only, at most 100"
    if name.startswith("."):
        return "must not start with '.': the folder would be hidden, and hidden folders are never listed"
    if ".." in name:
        return "must not contain '..'"
    if name.endswith(".") or name.split(".")[0].upper() in _RESERVED:
        return "a reserved folder name (Windows cannot create it, nor a name ending in '.')"
    size = len(name.encode("utf-8"))
    if size > RUN_NAME_MAX_BYTES:
        return (f"at most {RUN_NAME_MAX_BYTES} bytes in UTF-8 (this one is {size}, for {len(name)} characters): "
                "a folder name holds 255 bytes, and runs get suffixes")
    return None


def embedded_defaults() -> dict[str, Any]:
    """Overrides that make the embedded model + sample finish in a couple of minutes on 2 CPU cores.

    A 135M model needs a higher learning rate than a 7B one to show a visible change in ~30 steps, and the
    GGUF is already 4-bit (Q4_1): re-quantizing it to nf4 on a CPU costs quality and buys no speed. A tenth of the
    sample is held out, so the run ends with an evaluation card (qlora/evaluate.py) on rows it never trained on.
    """
    return dict(base_model=EMBEDDED_MODEL, dataset=SAMPLE_DATASET, quantize="none", learning_rate=1e-3,
                max_steps=30, max_length=256, batch_size=4, lr_scheduler="constant_with_warmup", warmup_ratio=0.05,
                gradient_checkpointing=False, optimizer="adamw_torch", lora_dropout=0.0,
                target_modules=["all-linear"], group_by_length=False, eval_fraction=0.1)


@dataclass
class GenerationSettings:
    """Sampling settings shared by both chat panes, so the only difference between them is the adapter."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if not (_is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= 4096):
            raise ValueError(f"max_new_tokens: must be an integer from 1 to 4096 (got {self.max_new_tokens!r})")
        if not (_is_num(self.temperature) and 0 <= self.temperature <= 5):
            raise ValueError(f"temperature: must be in [0, 5] (got {self.temperature!r})")
        if not (_is_num(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1] (got {self.top_p!r})")
        if not (_is_int(self.seed) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed: must be an integer from 0 to 2**32-1 (got {self.seed!r})")
        if not isinstance(self.system_prompt, str) or len(self.system_prompt) > 4000:
            raise ValueError("system_prompt: must be text of at most 4000 characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"), float("-inf"))
