"""The chat scheduler: visitors' rows join and leave one shared decode batch at token boundaries, each streaming alone.

One thread owns all device work (loading the base, capturing graphs, prefills, steps) and holds chat's card (a lease
of `device.Cards`: the one GPU on a one-GPU host, its own card on a host with several) while it has anything to do;
visitors' threads only submit tickets and read their own event queue. A visitor is a ticket of rows (base pane,
tuned pane); a row that ends frees its slot at once; a ticket that does not fit waits in a FIFO and is told its
place, one that can never fit is told so at once. One visitor's stop, error or disconnect ends that visitor's rows
only. stdlib only: the device work is the backend's (`slots.SlotBackend`, or `rowexact.GenerateBackend` for the eager
fallback).

A backend has `rows` (its capacity), `free_rows()`, `wait_reason(rows)` (None when the rows can join now),
`join(rows)` (prefill: each row gets its first token), `step()` (every active row gets one more token, or ends),
`leave(row)`, `forget(adapter names)` and `close()`. `wait_reason` may answer RELOAD: the backend must be built again
to serve these rows (an adapter on layers the captured step has no adapter columns for); that happens once the rows
being answered have ended.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .device import CHAT, CHAT_CARD, BusyError, Lease
from .device import cards as host_cards

log = logging.getLogger("qlora.chat")

MAX_WAITING = 64  # visitors queued beyond the batch; more are told the chat is full
UNLOADING = "the chat model is being unloaded (a training run starts); try again when it ends"
RELOAD = "reload"  # a backend's wait_reason: serve this ticket after loading the backend again (new adapter layers)


@dataclass(eq=False)
class Row:
    """One pane's answer in the making: its prompt ids, adapter (None: the base), settings, the ids that end it (its
    prompt format's EOS and end-of-turn marker, prompts.stop_ids) and the ids so far."""
    prompt: list[int]
    adapter: Any
    settings: Any  # GenerationSettings
    max_new: int = 0
    stops: frozenset = frozenset()
    ids: list[int] = field(default_factory=list)
    done: bool = False
    sent: int = 0  # ids already handed to the visitor
    joined: bool = False  # in the backend (holding a slot) until it leaves
    slot: Any = None  # the backend's
    rng: Any = None  # the backend's: this row's own random generator, seeded from the visitor's seed

    def add(self, token: int) -> None:
        """One new token: a stop id ends the row (and is not shown), so does the max_new-th token."""
        if token in self.stops:
            self.done = True
            return
        self.ids.append(token)
        if len(self.ids) >= self.max_new:
            self.done = True

    def finish(self) -> None:
        self.done = True


class Ticket:
    """A visitor's request: its rows, its stop flag, and the events the scheduler sends it."""

    def __init__(self, rows: list[Row], stop: threading.Event | None = None):
        self.rows = rows
        self.stop = stop or threading.Event()  # the visitor's Stop button
        self.gone = threading.Event()  # the visitor stopped reading (closed stream, client disconnected)
        self._events: queue.Queue = queue.Queue()
        self.waiting = ""  # the last "you wait because..." message
        self.ended = False

    @property
    def stopped(self) -> bool:
        return self.stop.is_set() or self.gone.is_set()

    def put(self, kind: str, value: Any = None) -> None:
        self._events.put((kind, value))

    def tell(self, message: str) -> None:
        """Why it waits; sent only when it changed (events() repeats the last one while nothing else comes)."""
        if self.waiting != message:
            self.waiting = message
            self.put("wait", message)

    def close(self, kind: str, value: Any) -> None:
        """The last event: ("end", reason) or ("error", exception), once."""
        if not self.ended:
            self.ended = True
            self.put(kind, value)

    def events(self, poll: float = 1.0) -> Iterator[tuple[str, Any]]:
        """("wait", message) while queued or loading (repeated every `poll` s), ("tokens", new ids per row) coalesced
        over whatever arrived since the last read, then ("end", reason); an error in this ticket raises here. Leaving
        the loop early (a closed generator: the client went away) stops the ticket."""
        try:
            while True:
                try:
                    item = self._events.get(timeout=poll)
                except queue.Empty:
                    if self.waiting:
                        yield "wait", self.waiting
                    continue
                items = [item]
                while True:
                    try:
                        items.append(self._events.get_nowait())
                    except queue.Empty:
                        break
                new = [[] for _ in self.rows]
                for kind, value in items:
                    if kind == "tokens":
                        for acc, ids in zip(new, value):
                            acc.extend(ids)
                        continue
                    if any(new):
                        yield "tokens", new
                        new = [[] for _ in self.rows]
                    if kind == "wait":
                        yield "wait", value
                    elif kind == "error":
                        raise value
                    elif kind == "end":
                        return
                if any(new):
                    yield "tokens", new
        finally:
            self.gone.set()


class Scheduler:
    """Admits tickets into the backend's slots, steps the batch, streams each row to its ticket (see the module doc)."""

    def __init__(self, open_backend: Callable[[Callable[[str], None]], Any], lease: Lease | None = None,
                 max_waiting: int = MAX_WAITING):
        self._open_backend = open_backend
        self._lease = lease or host_cards.lease(CHAT, (CHAT_CARD,))  # chat's card, taken while there is work
        self.max_waiting = max_waiting
        self.backend = None
        self._cond = threading.Condition()
        self._waiting: list[Ticket] = []
        self._active: list[Ticket] = []
        self._holding = False  # this scheduler holds its card
        self._closing = False
        self._forget: set[str] = set()
        self._open_waiters: list[tuple[threading.Event, list]] = []  # open() calls waiting for the backend
        self._thread = threading.Thread(target=self._loop, name="qlora-chat", daemon=True)
        self._thread.start()

    # --- visitors' side ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """BusyError now if a submit would be refused because training holds chat's card."""
        with self._cond:
            if not self._holding and self._lease.locked():
                raise BusyError(self._lease.why_busy())

    def _take(self) -> None:
        """Hold chat's card from now until the work runs out (the caller holds self._cond); BusyError if training
        has it."""
        if not self._holding:
            if not self._lease.acquire(blocking=False):
                raise BusyError(self._lease.why_busy())
            self._holding = True

    def submit(self, rows: list[Row], stop: threading.Event | None = None) -> Ticket:
        """Queue a visitor's rows. BusyError at once while training holds chat's card or the queue is full."""
        ticket = Ticket(rows, stop)
        with self._cond:
            if self._closing:
                raise BusyError(UNLOADING)
            if len(self._waiting) >= self.max_waiting:
                n = len(self._waiting)
                raise BusyError(f"the chat is full ({n} visitor{'s' if n != 1 else ''} waiting); try again in a "
                                "minute")
            self._take()
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    def open(self, timeout: float | None = None) -> None:
        """Load the backend now (the model and its graphs) without a visitor waiting; raises what loading raised."""
        done, error = threading.Event(), []
        with self._cond:
            if self._closing:
                raise BusyError(UNLOADING)
            self._take()
            self._open_waiters.append((done, error))
            self._cond.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("the chat model is still loading")
        if error:
            raise error[0]

    def forget(self, names) -> None:
        """Adapters whose folders are gone or changed: the backend drops them once no row uses them."""
        with self._cond:
            self._forget.update(names)
            self._cond.notify_all()

    def close(self, timeout: float = 60) -> None:
        """End the loop: waiting and active visitors are told, the backend frees the device."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- the device thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                try:
                    if not self._next_round():
                        break
                except Exception as e:  # a bug here must not leave visitors waiting forever on a dead thread
                    log.exception("the chat scheduler failed")
                    self._fail_all(e)
        finally:
            gone = BusyError("the chat model was unloaded (a training run started); chat is back when it ends")
            with self._cond:
                tickets, self._waiting, self._active = self._waiting + self._active, [], []
                openers, self._open_waiters = self._open_waiters, []
            for t in tickets:
                t.close("error", gone)
            for done, error in openers:  # an open() that came as the loop ended: told, not left waiting
                error.append(gone)
                done.set()
            self._close_backend()
            self._lease.loaded(False)
            with self._cond:
                if self._holding:
                    self._holding = False
                    self._lease.release()

    def _next_round(self) -> bool:
        with self._cond:
            while not (self._waiting or self._active or self._closing or self._forget or self._open_waiters):
                if self._holding:  # idle: give the card back (training may start), keep the model loaded
                    self._holding = False
                    self._lease.release()
                self._cond.wait()
            if self._closing:
                return False
            forget, self._forget = self._forget, set()
            openers, self._open_waiters = self._open_waiters, []
            busy = bool(self._waiting or self._active)
        if forget and self.backend is not None:
            self.backend.forget(forget)
        if (busy or openers) and self.backend is None:
            self._open(openers)
        for done, _ in openers:
            done.set()
        if not busy or self.backend is None:
            return True
        self._drop_stopped()
        self._admit()
        if self._active:
            self._step()
        else:  # visitors wait for something no active row will free (cannot happen with the backends here): no spin
            with self._cond:
                self._cond.wait(0.05)
        return True

    def _open(self, openers) -> None:
        def progress(message: str) -> None:
            self._tell_waiting(f"loading the chat model: {message}")

        self._lease.loaded(True)  # from now on a training run leaves chat's card alone (several GPUs)
        try:
            self.backend = self._open_backend(progress)
        except Exception as e:
            self._lease.loaded(False)
            log.exception("loading the chat model failed")
            with self._cond:
                tickets, self._waiting = self._waiting, []
            self._fail(tickets, e)
            for _, error in openers:
                error.append(e)

    def _tell_waiting(self, message: str) -> None:
        with self._cond:
            for t in self._waiting:
                t.tell(message)

    def _drop_stopped(self) -> None:
        for t in [t for t in self._active if t.stopped]:
            self._end(t, "stopped")
        with self._cond:
            stopped = [t for t in self._waiting if t.stopped]
            self._waiting = [t for t in self._waiting if not t.stopped]
        self._release_if_idle()
        for t in stopped:
            t.close("end", "stopped")

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting:
                    return
                ticket = self._waiting[0]
            try:
                reason = self.backend.wait_reason(ticket.rows)
            except Exception as e:  # can never be served (too long for a slot, an adapter that does not fit)
                self._pop_waiting(ticket)
                self._release_if_idle()
                ticket.close("error", e)
                continue
            if reason == RELOAD:
                if self._active:
                    reason = "the chat model reloads for an adapter on other layers once the current answers end"
                    break
                self._reload()
                if self.backend is None:
                    return
                continue
            if reason is not None:
                break
            self._pop_waiting(ticket)
            try:
                self.backend.join(ticket.rows)  # on failure the backend has let go of what it took
            except Exception as e:
                if not isinstance(e, ValueError):
                    log.exception("a chat request failed to start")
                self._release_if_idle()
                ticket.close("error", e)
                continue
            for row in ticket.rows:
                row.joined = True
            self._active.append(ticket)
            self._emit(ticket)
        self._refuse_behind()
        with self._cond:  # the rest wait: tell each its place
            for i, t in enumerate(self._waiting):
                ahead = f"{i} visitor{'s' if i != 1 else ''} ahead of you" if i else "you are next"
                t.tell(f"waiting for a free chat slot ({reason}; {ahead})")

    def _reload(self) -> None:
        self._close_backend()
        self._open([])

    def _close_backend(self) -> None:
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:
                log.exception("closing the chat backend failed")
            self.backend = None

    def _refuse_behind(self) -> None:
        """Tickets behind the first that can never be served (longer than a row holds, more KV memory than the card
        has) hear so now, not after waiting their turn."""
        with self._cond:
            behind = self._waiting[1:]
        for ticket in behind:
            try:
                self.backend.wait_reason(ticket.rows)
            except Exception as e:
                self._pop_waiting(ticket)
                ticket.close("error", e)

    def _pop_waiting(self, ticket: Ticket) -> None:
        with self._cond:
            self._waiting.remove(ticket)
        ticket.waiting = ""

    def _step(self) -> None:
        try:
            self.backend.step()
        except Exception as e:  # the whole batch shares the step: every active visitor is told, the engine goes on
            log.exception("a chat decode step failed")
            failed, self._active = self._active, []
            self._fail(failed, e)
            return
        for t in list(self._active):
            self._emit(t)

    def _emit(self, ticket: Ticket) -> None:
        """Send the ticket its rows' new tokens; rows that ended leave the batch; a ticket whose rows all ended ends."""
        new = []
        for row in ticket.rows:
            new.append(row.ids[row.sent:])
            row.sent = len(row.ids)
            if row.done:
                self._leave(row)
        if any(new):
            ticket.put("tokens", new)
        if all(row.done for row in ticket.rows):
            self._end(ticket, "done")

    def _end(self, ticket: Ticket, reason: str) -> None:
        for row in ticket.rows:
            self._leave(row)
        if ticket in self._active:
            self._active.remove(ticket)
        self._release_if_idle()
        ticket.close("end", reason)

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            tickets, self._waiting, self._active = self._waiting + self._active, [], []
        self._fail(tickets, error)

    def _fail(self, tickets: list[Ticket], error: Exception) -> None:
        """These visitors' rows leave the batch; each is told `error` (after the lock is given back if idle)."""
        for t in tickets:
            for row in t.rows:
                self._leave(row)
        self._release_if_idle()
        for t in tickets:
            t.close("error", error)

    def _release_if_idle(self) -> None:
        """Give chat's card back as soon as nothing is answered or waiting, before the last visitor hears the end:
        whoever reads the end of a stream may start a training run at once."""
        with self._cond:
            if self._holding and not self._waiting and not self._active:
                self._holding = False
                self._lease.release()

    def _leave(self, row: Row) -> None:
        row.done = True
        if row.joined:
            row.joined = False
            try:
                self.backend.leave(row)
            except Exception:
                log.exception("freeing a chat slot failed")
