"""The repository carries what its tests and benchmarks read: a fresh clone needs nothing beside it."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from conftest import DATA, GUANACO, ROOT, TOKENIZER_DIR

# Spelled in pieces so that this file does not match its own check.
OUTSIDE = ("../" + "shared", "shared" + "/data")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # an export without .git: every file but the venv's
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]


def test_the_data_files_are_the_ones_the_notice_describes():
    notice = (DATA / "NOTICE").read_text(encoding="utf-8")
    for path in (GUANACO, TOKENIZER_DIR / "tokenizer.model"):
        assert path.name in notice
        assert _sha256(path) in notice, f"{path} changed: update its checksum (and source) in tests/data/NOTICE"
    assert "Llama 2 is licensed under the LLAMA 2 Community License" in notice
    assert (TOKENIZER_DIR / "LICENSE").read_text(encoding="utf-8").startswith("LLAMA 2 COMMUNITY LICENSE AGREEMENT")


def test_the_carried_tokenizer_and_dataset_load(llama_tokenizer):
    from qlora.data import prepare

    assert llama_tokenizer.vocab_size == 32000
    assert llama_tokenizer("Hello", add_special_tokens=False)["input_ids"] == [15043]
    data = prepare(str(GUANACO))  # all 1000 rows read; the 3 with an empty turn are skipped (issue 12.7)
    assert len(data.train) + data.dropped == 1000 and data.dropped == 3


def test_no_tracked_file_reads_a_folder_beside_the_checkout():
    offenders = []
    for path in _tracked_files():
        if not path.is_file() or path.suffix in (".parquet", ".model", ".safetensors", ".png"):
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        for n, line in enumerate(text.splitlines(), start=1):
            if any(word in line for word in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not offenders, "files that refer to data outside the repository:\n" + "\n".join(offenders)
