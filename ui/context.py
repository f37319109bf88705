"""What the app keeps on the server for everyone: the job manager, the runs folder, the admin check, chat engines.

Module-level state in Gradio is shared by all visitors, which is what a single GPU needs: one job, one base in memory.
No gradio here.
"""
from __future__ import annotations

import hmac
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from qlora.jobs import JobManager
from qlora.votes import Ballots

ADMIN_ENV = "QLORA_ADMIN_PASSWORD"
LOCKED = "🔒 Only the admin can do this: enter the admin password at the top of the Training tab."


class Engines:
    """One ChatEngine for the base model in use; a different base replaces it (two 7Bs never fit one T4). `cards`:
    the host's cards its engines serve on (the job manager's)."""

    def __init__(self, cards=None):
        self.cards = cards
        self._lock = threading.Lock()
        self._engines: dict[tuple[str, str], object] = {}
        self._tokenizers: dict[str, object] = {}

    def get(self, base_model: str, quantize: str, allow_local: bool = True):
        """The engine for a run's base. allow_local is the run's own (False when it was trained from the app): the
        name is then resolved on the Hub, and the engine gets the downloaded folder."""
        from qlora.chat import ChatEngine
        from qlora.model import resolve

        with self._lock:
            key = (base_model, quantize)
            if key not in self._engines:
                for engine in self._engines.values():
                    engine.unload()
                path = base_model if allow_local else resolve(base_model, allow_local=False)
                self._engines = {key: ChatEngine(path, quantize=quantize, cards=self.cards)}
            return self._engines[key]

    def unload_all(self) -> None:
        """Give the memory to a training run."""
        with self._lock:
            for engine in self._engines.values():
                engine.unload()
            self._engines.clear()

    def tokenizer(self, base_model: str, allow_local: bool = True):
        """The tokenizer alone (no weights): 'show prompt' works even while training holds the GPU."""
        from qlora.model import load_tokenizer, resolve

        with self._lock:
            for (base, _), engine in self._engines.items():
                if base == base_model and engine.tokenizer is not None:
                    return engine.tokenizer
            if base_model not in self._tokenizers:
                self._tokenizers[base_model] = load_tokenizer(resolve(base_model, allow_local, weights=False))
            return self._tokenizers[base_model]


@dataclass
class AppContext:
    jobs: JobManager
    runs_root: Path
    admin_password: str | None = None
    engines: Engines = field(default_factory=Engines)
    chat_stops: dict[str, threading.Event] = field(default_factory=dict)  # session hash -> stop flag
    ballots: Ballots = field(default_factory=Ballots)  # blind questions waiting for a vote (server-side only)

    def __post_init__(self):
        if self.engines.cards is None:  # chat and training share one account of the cards
            self.engines.cards = self.jobs.cards

    @property
    def locked(self) -> bool:
        return bool(self.admin_password)

    def is_admin(self, given: str | None) -> bool:
        """True when no password is set, or `given` matches it (constant-time: no timing oracle)."""
        if not self.admin_password:
            return True
        return hmac.compare_digest((given or "").encode("utf-8"), self.admin_password.encode("utf-8"))

    def token(self, given: str | None) -> str | None:
        """The visitor's token if given, else the Space secret. Passed per call; never stored, logged or shown.

        The owner's secret stands in only behind the admin password: on an open app any visitor would otherwise
        push to (or download gated models with) the owner's account.
        """
        return (given or "").strip() or (os.environ.get("HF_TOKEN") if self.locked else None) or None

    def chat_stop(self, session: str) -> threading.Event:
        if len(self.chat_stops) > 1000:  # sessions come and go; never let this grow without bound
            self.chat_stops.clear()
        return self.chat_stops.setdefault(session or "api", threading.Event())
