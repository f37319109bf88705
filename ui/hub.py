"""Getting an adapter (or a run's merged model, qlora/export.py) out: a zip to download, a push to the Hub, with one
push handler and the same token rules for both. Tokens are passed per call and never kept or shown.

No gradio here. Every message that leaves this module goes through `redact`, so a token that an exception happened
to echo never reaches the page or the log.
"""
from __future__ import annotations

import html
import re
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable

from qlora import prompts, runs
from qlora.config import is_hub_id
from qlora.export import reproducibility

from .context import LOCKED

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")


class PushError(RuntimeError):
    """A push that did not happen; the message is safe to show."""


def redact(text: str, token: str | None = None) -> str:
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def zip_run(info: runs.RunInfo) -> Path:
    """A zip of the adapter plus its config, prompt format, versions, evaluation card, metrics and a model card."""
    files = {path.name: path for path in runs.portable_files(info, history=True)}
    return _zip(f"{info.name}-adapter", info.name, files, {"README.md": model_card(info)}, zipfile.ZIP_DEFLATED)


def zip_export(info: runs.RunInfo) -> Path:
    """A zip of the merged model folder; stored, not deflated (safetensors do not compress), zip64 for a 7B."""
    folder = export_folder(info)
    return _zip(f"{info.name}-merged", f"{info.name}-merged",
                {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}, {}, zipfile.ZIP_STORED)


def export_folder(info: runs.RunInfo) -> Path:
    folder = info.path / runs.EXPORT
    if not folder.is_dir():
        raise ValueError(f"run {info.name} has no merged export yet: press Export merged model first")
    return folder


def _zip(stem: str, inside: str, files: dict[str, Path], texts: dict[str, str], compression: int) -> Path:
    """A zip of files (and texts) in a folder `inside`, in a temp folder; written under a temp name and renamed, so a
    full disk never leaves a zip that looks complete."""
    out_dir = Path(tempfile.gettempdir()) / "qlora-zips"
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.glob("*.zip"):  # Gradio serves its own copy; ours need not outlive an hour
        if time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    target = out_dir / f"{stem}-{uuid.uuid4().hex[:6]}.zip"
    partial = target.with_suffix(".partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=compression, allowZip64=True) as z:
            for name, path in files.items():
                z.write(path, f"{inside}/{name}")
            for name, text in texts.items():
                z.writestr(f"{inside}/{name}", text)
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def model_card(info: runs.RunInfo, repo_id: str = "") -> str:
    loss = info.metrics.get("final_loss")
    lines = [
        "---", f"base_model: {info.base_model}", "library_name: peft", "tags: [qlora, lora]", "---",
        f"# {repo_id or info.name}", "",
        f"A LoRA adapter for `{info.base_model}`, trained on `{info.dataset}` ({info.status} at step {info.step}).",
        f"Final train loss: {loss:.4f}." if isinstance(loss, (int, float)) else "",
        "", _prompt_note(info),
        "", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained({info.base_model!r})",
        f"model = PeftModel.from_pretrained(base, {repo_id or 'path/to/this/folder'!r})", "```",
        "", reproducibility(info.path),
    ]
    return "\n".join(lines) + "\n"


def _prompt_note(info: runs.RunInfo) -> str:
    """How to prompt the adapter: the format it was trained in, as its run folder records it."""
    try:
        fmt = runs.prompt_format(info.path)
    except ValueError:
        return "The prompt format it was trained in is unknown (prompt_format.json is damaged)."
    if fmt.name == prompts.LLAMA2:
        return "Prompt it in the Llama 2 chat format: `<s>[INST] {user} [/INST]` (see prompt_format.json)."
    if fmt.source == "fallback":
        return "Prompt it as `### User:\\n{user}\\n\\n### Assistant:\\n` (the template is in prompt_format.json)."
    return "Prompt it with the base model's own chat template (`apply_chat_template`; a copy is in prompt_format.json)."


def push_run(info: runs.RunInfo, repo_id: str, token: str | None, private: bool = True) -> str:
    """Create (or reuse) a model repo and upload the adapter; returns its URL. PushError says what went wrong."""
    files: dict[str, Path | bytes] = {path.name: path for path in runs.portable_files(info)}
    files["README.md"] = model_card(info, _repo_name(repo_id)).encode("utf-8")
    return _push(repo_id, token, private, files, f"adapter from run {info.name}")


def push_export(info: runs.RunInfo, repo_id: str, token: str | None, private: bool = True) -> str:
    """Upload the merged model folder as a model repo (its card names the repo); the same rules as push_run."""
    from qlora.export import model_card as merged_card

    folder = export_folder(info)
    files: dict[str, Path | bytes] = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
    files["README.md"] = merged_card(info.path, _repo_name(repo_id)).encode("utf-8")
    return _push(repo_id, token, private, files, f"merged model from run {info.name}")


def _repo_name(repo_id) -> str:
    return repo_id.strip() if isinstance(repo_id, str) else ""


def _push(repo_id: str, token: str | None, private: bool, files: dict[str, Path | bytes], what: str) -> str:
    """One commit of exactly `files` (name in the repo -> a path or bytes) to a model repo: nothing else of this
    machine can ride along, and nothing is copied first (a merged 7B is 13.5 GB). Returns the repo's URL."""
    repo_id = (repo_id or "").strip()
    if len(repo_id) > 96 or not is_hub_id(repo_id) or "/" not in repo_id:
        raise PushError("repo id: give owner/name, letters, digits, '-', '_', '.' only (e.g. alice/llama2-guanaco)")
    if not token:
        raise PushError("pushing needs a Hub token with write access: paste one in the token field, "
                        "or set the HF_TOKEN secret of the Space together with an admin password")
    from huggingface_hub import CommitOperationAdd, HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.create_commit(repo_id=repo_id, repo_type="model",
                          operations=[CommitOperationAdd(name, str(v) if isinstance(v, Path) else v)
                                      for name, v in files.items()],
                          commit_message=f"{what} ({time.strftime('%Y-%m-%d %H:%M')})")
    except Exception as e:
        raise PushError(explain_push_error(e, token)) from None
    return f"https://huggingface.co/{repo_id}"


def push_handler(ctx, push: Callable[[runs.RunInfo, str, str | None, bool], str], what: str = ""):
    """The Push button's handler (an API endpoint too): the admin check, the token rules, one line back."""
    def handler(run: str, repo_id: str, private: bool = True, hf_token: str = "", admin_password: str = "") -> str:
        if not ctx.is_admin(admin_password):
            return LOCKED
        token = ctx.token(hf_token)
        try:
            url = push(runs.usable_run(ctx.runs_root, run), str(repo_id or "")[:200], token, bool(private))
        except (ValueError, PushError) as e:
            return f"❌ {html.escape(redact(str(e), token))}"
        return f"✅ pushed {what}to [{html.escape(url)}]({html.escape(url)})"

    return handler


def explain_push_error(e: BaseException, token: str | None) -> str:
    """One readable line per way a push fails; the local adapter is always kept."""
    from huggingface_hub import errors as hub_errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    kept = "; the adapter is kept here, try again"
    if isinstance(e, hub_errors.OfflineModeIsEnabled):
        return "cannot push: this server runs offline (HF_HUB_OFFLINE is set)" + kept
    if status == 401:
        return "the Hub refused the token (401): it is invalid or expired"
    if status == 403:
        return "the token cannot write there (403): it needs write permission for that namespace"
    if status == 409:
        return "the Hub reported a conflict (409) for this repo" + kept
    if "secret" in str(e).lower() and "valid" in str(e).lower():
        return "the Hub rejected the upload because it saw a secret in the files; nothing was published"
    if status is not None:
        return f"the Hub answered {status}" + kept
    return redact(f"cannot reach the Hub ({type(e).__name__})" + kept, token)
