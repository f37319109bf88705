"""Getting an adapter out: a zip to download, a push to the Hub. Tokens are passed per call and never kept or shown.

No gradio here. Every message that leaves this module goes through `redact`, so a token that an exception happened
to echo never reaches the page or the log.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

from qlora import prompts, runs
from qlora.config import is_hub_id

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")


class PushError(RuntimeError):
    """A push that did not happen; the message is safe to show."""


def redact(text: str, token: str | None = None) -> str:
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def zip_run(info: runs.RunInfo) -> Path:
    """A zip of the adapter plus its config, prompt format, versions, metrics and a model card, in a temp folder."""
    out_dir = Path(tempfile.gettempdir()) / "qlora-zips"
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.glob("*.zip"):  # Gradio serves its own copy; ours need not outlive an hour
        if time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    target = out_dir / f"{info.name}-adapter-{uuid.uuid4().hex[:6]}.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in runs.portable_files(info, history=True):
            z.write(path, f"{info.name}/{path.name}")
        z.writestr(f"{info.name}/README.md", model_card(info))
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
        "", "The training config is in config.yaml; library versions in versions.json.",
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
    repo_id = (repo_id or "").strip()
    if len(repo_id) > 96 or not is_hub_id(repo_id) or "/" not in repo_id:
        raise PushError("repo id: give owner/name, letters, digits, '-', '_', '.' only (e.g. alice/llama2-guanaco)")
    if not token:
        raise PushError("pushing needs a Hub token with write access: paste one in the token field, "
                        "or set the HF_TOKEN secret of the Space together with an admin password")
    from huggingface_hub import HfApi

    staging = Path(tempfile.mkdtemp(prefix="qlora-push-"))
    try:
        files = runs.portable_files(info)
        for path in files:
            shutil.copy2(path, staging / path.name)
        (staging / "README.md").write_text(model_card(info, repo_id), encoding="utf-8")
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        # only what was staged: nothing else of this machine can ride along
        api.upload_folder(repo_id=repo_id, folder_path=str(staging),
                          allow_patterns=[path.name for path in files] + ["README.md"],
                          commit_message=f"adapter from run {info.name} ({time.strftime('%Y-%m-%d %H:%M')})")
    except PushError:
        raise
    except Exception as e:
        raise PushError(explain_push_error(e, token)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"https://huggingface.co/{repo_id}"


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
