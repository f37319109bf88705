"""Blind votes: which pane held the adapter, kept on the server per question; votes.jsonl per run and its tally.

A question asked in blind mode gets a ballot: an unguessable id, the run, and which side the adapter's answer was
shown on, all kept here and never sent to the page. A vote names only the ballot and left / right / tie / both bad;
the ballot is used up by its vote, so a vote cannot be cast twice, replayed, or sent to another run's tally.
stdlib only.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runs

CHOICES = ("left", "right", "tie", "both bad")
SIDES = ("left", "right")
MAX_OPEN = 10_000  # ballots waiting for a vote; the oldest go first beyond this
TTL_S = 6 * 3600  # a question left unvoted this long can no longer be voted on
MAX_TEXT = 4000  # characters of the prompt and each answer kept with a vote

_append_lock = threading.Lock()


class VoteError(ValueError):
    """A vote that is not counted; the message is safe to show."""


@dataclass(frozen=True)
class Ballot:
    run_dir: Path
    tuned_side: str  # "left" or "right": where the adapter's answer was shown
    prompt: str
    base: str
    tuned: str
    settings: dict[str, Any]
    opened: float


@dataclass(frozen=True)
class Tally:
    tuned: int = 0
    base: int = 0
    tie: int = 0
    both_bad: int = 0

    @property
    def total(self) -> int:
        return self.tuned + self.base + self.tie + self.both_bad

    def text(self) -> str:
        if not self.total:
            return "no blind votes yet"
        return (f"tuned preferred in {self.tuned} of {self.total}, {self.tie} ties "
                f"(base preferred in {self.base}, both bad in {self.both_bad})")


class Ballots:
    """The open ballots of every visitor: id -> Ballot. Thread-safe; bounded in number and age."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, Ballot] = {}

    @staticmethod
    def draw_side() -> str:
        """Where the adapter's answer goes for the next question: a fair coin no client can predict."""
        return secrets.choice(SIDES)

    def open(self, run_dir: Path, tuned_side: str, prompt: str, base: str, tuned: str,
             settings: dict[str, Any]) -> str:
        """Keep a finished blind question; returns its ballot id (the only thing the page's session holds)."""
        if tuned_side not in SIDES:
            raise ValueError(f"tuned_side must be left or right, got {tuned_side!r}")
        ballot_id = secrets.token_urlsafe(24)
        with self._lock:
            self._expire()
            while len(self._open) >= MAX_OPEN:
                self._open.pop(next(iter(self._open)))
            self._open[ballot_id] = Ballot(Path(run_dir), tuned_side, prompt[:MAX_TEXT], base[:MAX_TEXT],
                                           tuned[:MAX_TEXT], dict(settings), time.time())
        return ballot_id

    def cast(self, ballot_id: Any, choice: Any) -> tuple[str, Tally]:
        """Count one vote; returns (which side the adapter was on, the run's tally). VoteError if not counted."""
        if choice not in CHOICES:
            raise VoteError(f"pick one of: {', '.join(CHOICES)}")
        with self._lock:
            self._expire()
            ballot = self._open.pop(ballot_id, None) if isinstance(ballot_id, str) else None
        if ballot is None:
            raise VoteError("no blind question is waiting for your vote (already voted, expired, or none asked): "
                            "ask a question in blind mode first")
        winner = ("tuned" if choice == ballot.tuned_side else "base") if choice in SIDES else choice.replace(" ", "_")
        record = {"time": time.time(), "choice": choice, "preferred": winner, "tuned_side": ballot.tuned_side,
                  "prompt": ballot.prompt, "base": ballot.base, "tuned": ballot.tuned, "settings": ballot.settings}
        with _append_lock:  # whole lines: two votes at once never interleave
            runs.append_jsonl(ballot.run_dir / runs.VOTES, record)
        return ballot.tuned_side, tally(ballot.run_dir)

    def _expire(self) -> None:
        cutoff = time.time() - TTL_S
        for key in [k for k, b in self._open.items() if b.opened < cutoff]:
            del self._open[key]


def tally(run_dir: str | Path) -> Tally:
    """Count a run's votes.jsonl; a line that does not parse (a crash mid-write) is skipped."""
    counts = {"tuned": 0, "base": 0, "tie": 0, "both_bad": 0}
    try:
        with open(Path(run_dir) / runs.VOTES, encoding="utf-8") as f:
            for line in f:
                try:
                    preferred = json.loads(line).get("preferred")
                except (ValueError, AttributeError):
                    continue
                if preferred in counts:
                    counts[preferred] += 1
    except OSError:
        pass
    return Tally(**counts)
