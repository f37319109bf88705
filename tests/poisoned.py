"""Run folders broken in each way a copied, truncated or hand-made folder can be, for the listing, chat and the app.

Each is a copy of one good run folder with one thing wrong, made with the real file formats (the safetensors
library rewrites the adapters that lose tensors). `poison(good, root)` returns each folder's name and what the
listing must say about it ("damaged: <that>").
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

LFS = ("version https://git-lfs.github.com/spec/v1\n"
       "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 4242\n")


def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


def keep_tensors(adapter: Path, keep) -> None:
    """Rewrite the adapter's safetensors with only the tensors `keep(name)` accepts."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if keep(k)}, path)


def _weights(run: Path, content: bytes) -> None:
    (run / "adapter" / "adapter_model.safetensors").write_bytes(content)


def _sparse_header(run: Path) -> None:
    """A 150 MB file (sparse: it takes no disk) whose header claims 120 MB: within the file, over the cap."""
    path = run / "adapter" / "adapter_model.safetensors"
    with open(path, "wb") as f:
        f.write((120_000_000).to_bytes(8, "little"))
        f.truncate(150_000_000)


def _run_json_dir(run: Path) -> None:
    (run / "run.json").unlink()
    (run / "run.json").mkdir()


def _run_json_odd_types(run: Path) -> None:
    meta = json.loads((run / "run.json").read_text())
    meta.update(status=5, created="yesterday", step="many", base_model=["x"], final_loss="low", metrics=[1],
                pid="me")
    (run / "run.json").write_text(json.dumps(meta))


TENSOR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CASES = {
    # name: (what breaks it, what the listing says)
    "lfs-pointer": (lambda r: _weights(r, LFS.encode()), "adapter_model.safetensors is a Git LFS pointer"),
    "huge-header": (lambda r: _weights(r, safetensors_bytes(b"{}", length=2**40)),
                    "its header claims 1,099,511,627,776 bytes but the file has"),
    "header-over-cap": (_sparse_header, "a header of 120,000,000 bytes is over the 100,000,000-byte limit"),
    "no-offsets": (lambda r: _weights(r, safetensors_bytes({"m.lora_A.weight": {"dtype": "F32", "shape": [2]}},
                                                           b"\0" * 8)),
                   "tensor 'm.lora_A.weight': no valid data_offsets"),
    "header-list": (lambda r: _weights(r, safetensors_bytes([1, 2])), "its header: expected a JSON object, got list"),
    "header-garbage": (lambda r: _weights(r, safetensors_bytes(b"\xff\xfe{not json")), "its header is not valid JSON"),
    "shape-mismatch": (lambda r: _weights(r, safetensors_bytes({"m.lora_A.weight": dict(TENSOR, shape=[9])},
                                                               b"\0" * 8)),
                       "its shape and dtype do not match its data_offsets"),
    "trailing-bytes": (lambda r: _weights(r, safetensors_bytes({"m.lora_A.weight": TENSOR}, b"\0" * 12)),
                       "is truncated or has trailing bytes"),
    "config-list": (lambda r: (r / "adapter" / "adapter_config.json").write_text("[1]"),
                    "adapter_config.json: expected a JSON object, got list"),
    "config-garbage": (lambda r: (r / "adapter" / "adapter_config.json").write_text("{not json"),
                       "adapter_config.json is not valid JSON"),
    "half-no-v-proj": (lambda r: keep_tensors(r / "adapter", lambda k: "v_proj" not in k),
                       "half-complete adapter: adapter_model.safetensors has no LoRA tensors for v_proj"),
    "half-one-layer": (lambda r: keep_tensors(r / "adapter", lambda k: not ("layers.1." in k and "v_proj" in k)),
                       "has no LoRA tensors for v_proj in layer 1"),
    "half-no-lora-b": (lambda r: keep_tensors(r / "adapter", lambda k: not ("layers.0." in k and "q_proj.lora_B" in k)),
                       "no LoRA tensors for the other half (lora_A or lora_B) of"),
    "run-json-list": (lambda r: (r / "run.json").write_text("[]"), "run.json: expected a JSON object, got list"),
    "run-json-dir": (_run_json_dir, "cannot be read (IsADirectoryError)"),
    # the prompt format chat would prompt the adapter in (issue 19): unreadable, so the run is not offered
    "format-lfs": (lambda r: (r / "prompt_format.json").write_text(LFS), "prompt_format.json is a Git LFS pointer"),
    "format-unknown": (lambda r: (r / "prompt_format.json").write_text('{"name": "chat_template"}'),
                       "prompt_format.json: unknown prompt format 'chat_template'"),
}
ODD_TYPES = "run-json-odd-types"  # listed, not damaged: its fields are ignored where they are not what they should be


def poison(good: Path, root: Path) -> dict[str, str]:
    """A copy of the run folder `good` under root for each case; name -> what its "damaged: ..." must contain."""
    for name, (breaks, _) in CASES.items():
        shutil.copytree(good, root / name)
        breaks(root / name)
    shutil.copytree(good, root / ODD_TYPES)
    _run_json_odd_types(root / ODD_TYPES)
    return {name: said for name, (_, said) in CASES.items()}
