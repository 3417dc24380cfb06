"""One partition's customers in the Redis Streams mode: their turns, in stream order.

``route.lua`` has already resolved every message's customer and appended it to
the customer's partition stream with what it did to the customer's ids (see
``route.py`` for the entry format). The partition's owner replays those id
changes on its ``CustomerState`` and runs the same ``customer.turn`` as the
embedded relay, so both modes produce the same commands and the same states.

A merge across partitions is a hand-off through the streams (the way a
sharded actor system moves an entity): the merged customer's partition reaches
the ``handoff`` marker after all that customer's earlier messages and forwards
its state as an ``absorb`` entry to the survivor's partition; the survivor
holds back (stashes) its messages from the merging one onwards until the
absorb arrives, then runs them in order. A stash waits only for an anonymous
customer, and anonymous customers never wait, so no two stashes wait on each
other.

This module is the pure core: it turns entries into a ``Round`` of effects.
Reading, loading and the fenced commit are the worker's (``worker.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..commands import Command, decode_command
from ..customer import (
    CHANGES_STATE,
    CustomerState,
    TurnContext,
    merge_into,
    session_due,
    state_decoder,
    state_encoder,
    turn,
)
from ..mapping import EventPolicy, ExtrasCache, LimitExceeded, Schema
from ..partition import SessionTimers
from ..segment import context_key

_decode_message = msgspec.json.Decoder().decode


@dataclass(slots=True)
class Entry:
    """One entry of a partition's input stream."""

    id: str
    key: int
    control: str | None  # None for a message; "handoff", "absorb", "drop" or "replay"
    fields: Mapping[str, bytes]

    @classmethod
    def parse(cls, entry_id: bytes | str, raw: Mapping[Any, bytes | str]) -> Entry:
        fields = {_text(name): _bytes(value) for name, value in raw.items()}
        control = fields.get("c")
        try:
            key = int(fields["k"])
        except (KeyError, ValueError):
            key = 0  # apply() sets it aside: no customer can take it
        return cls(_text(entry_id), key, control.decode() if control else None, fields)

    def text(self, name: str) -> str | None:
        value = self.fields.get(name)
        return None if value is None else value.decode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


@dataclass(slots=True)
class Round:
    """What one round of entries did, to be committed in one fenced step."""

    acked: list[str] = field(default_factory=list)  # entry ids now done with
    dirty: dict[int, CustomerState] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    commands: list[tuple[int, str, bytes]] = field(default_factory=list)  # customer, project, wire
    # Absorbs for other customers: (survivor key, merged key, merged state or b"").
    absorbs: list[tuple[int, int, bytes]] = field(default_factory=list)
    refused: list[tuple[int, bytes, str, str]] = field(default_factory=list)  # key, body, code, why
    processed: dict[str, int] = field(default_factory=dict)

    def states(self, timeout: float) -> list[tuple[int, bytes, float | None]]:
        """Each changed customer's record and session deadline, as the commit writes them."""
        return [(key, state_encoder.encode(state), state.deadline(timeout))
                for key, state in self.dirty.items()]


@dataclass(slots=True)
class _Waiting:
    """A survivor's stash: its entries held back until the merged customer's state comes."""

    merged: int
    entries: list[Entry]


class PartitionActors:
    """The customers of one partition of one project, their timers and stashes.

    ``states`` must hold every customer an entry names before ``apply`` sees it
    (the worker loads them); a customer missing there is new.
    """

    def __init__(self, *, project: str, schema: Schema, policy: EventPolicy,
                 session_timeout: float, encode: Callable[[Command], bytes]) -> None:
        self.project = project
        self.schema = schema
        self.policy = policy
        self.session_timeout = session_timeout
        self.encode = encode
        self.extras = ExtrasCache()
        self.states: dict[int, CustomerState] = {}
        self.timers = SessionTimers()
        self.waiting: dict[int, _Waiting] = {}  # survivor key -> its stash
        self.early: dict[int, Entry] = {}  # merged key -> its absorb, come before the merge

    def held(self) -> int:
        """Entries held in memory and not yet acknowledged (stashed or early)."""
        return sum(len(w.entries) for w in self.waiting.values()) + len(self.early)

    # --- one entry -----------------------------------------------------------------------------

    def apply(self, entry: Entry, round_: Round, now: float) -> None:
        """Run ``entry`` now, or hold it back behind its customer's pending merge."""
        if entry.key <= 0:
            raise ValueError(f"entry {entry.id} names no customer")
        waiting = self.waiting.get(entry.key)
        if waiting is not None and entry.control != "absorb":
            waiting.entries.append(entry)
            return
        if entry.control is None:
            merged = entry.fields.get("m")
            if merged is not None:
                absorb = self.early.pop(int(merged), None)
                if absorb is None:
                    self.waiting[entry.key] = _Waiting(int(merged), [entry])
                    return
                self._absorb(entry.key, absorb, round_)
            self._message(entry, round_, now)
        elif entry.control == "drop":
            self._drop(entry, round_)
        elif entry.control == "handoff":
            self._handoff(entry, round_)
        elif entry.control == "absorb":
            self._absorb_arrived(entry, round_, now)
        elif entry.control == "replay":
            # A dead letter sent again (``dead-letters replay``): in this customer's
            # order, encoded in today's dialect.
            command = decode_command(entry.fields["command"])
            round_.commands.append((entry.key, self.project, self.encode(command)))
            round_.acked.append(entry.id)
        else:
            raise ValueError(f"unknown control entry {entry.control!r} in {entry.id}")

    def _state(self, key: int) -> CustomerState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = CustomerState(key, self.project)
        return state

    def _message(self, entry: Entry, round_: Round, now: float) -> None:
        state = self._state(entry.key)
        self._ids_changed(state, entry, round_)
        body = entry.fields["b"]
        message: dict[str, Any] = _decode_message(body)
        # Extras are remembered by the context's bytes, as in the embedded relay: a
        # library sends the same context with every message.
        ctx = TurnContext(self.project, self.schema, self.policy, self.session_timeout, now,
                          self.extras, context_key(body) if "context" in message else None)
        had_session = state.session_start is not None
        try:
            commands = turn(state, message, ctx)
        except LimitExceeded as exc:
            round_.refused.append((entry.key, body, exc.code, exc.reason))
            round_.acked.append(entry.id)
            return
        self._arm(state, had_session)
        kind = message["type"]
        if kind in CHANGES_STATE:
            round_.dirty[state.key] = state
        encode = self.encode
        round_.commands.extend((state.key, self.project, encode(c)) for c in commands)
        round_.processed[kind] = round_.processed.get(kind, 0) + 1
        round_.acked.append(entry.id)

    def _ids_changed(self, state: CustomerState, entry: Entry, round_: Round) -> None:
        """Replay what routing did to the customer's ids (``Identity.resolve``'s effects)."""
        fields = entry.fields
        registered = fields.get("r")
        if registered is not None:
            state.registered = registered.decode()
            round_.dirty[state.key] = state
        cookie = fields.get("a")
        if cookie is not None:
            text = cookie.decode()
            if text not in state.cookies:
                state.cookies.append(text)
            round_.dirty[state.key] = state
        trimmed = fields.get("t")
        if trimmed is not None:
            del state.cookies[:int(trimmed)]
            round_.dirty[state.key] = state

    def _drop(self, entry: Entry, round_: Round) -> None:
        """A cookie left this customer for another (a shared device)."""
        state = self._state(entry.key)
        cookie = entry.text("v")
        if cookie in state.cookies:
            state.cookies.remove(cookie)
        round_.dirty[entry.key] = state
        round_.acked.append(entry.id)

    def _handoff(self, entry: Entry, round_: Round) -> None:
        """This customer was merged into another: send its state on and forget it."""
        survivor = int(entry.fields["v"])
        state = self.states.pop(entry.key, None)
        blob = state_encoder.encode(state) if state is not None else b""
        round_.absorbs.append((survivor, entry.key, blob))
        round_.dirty.pop(entry.key, None)
        round_.deleted.add(entry.key)
        round_.acked.append(entry.id)

    def _absorb_arrived(self, entry: Entry, round_: Round, now: float) -> None:
        merged = int(entry.fields["v"])
        waiting = self.waiting.get(entry.key)
        if waiting is None or waiting.merged != merged:
            # Before the merging message: keep it (unacknowledged) until that comes.
            self.early[merged] = entry
            return
        del self.waiting[entry.key]
        self._absorb(entry.key, entry, round_)
        # The merging message first (its merge is now done), then everything
        # held behind it; a later merge among them stashes again.
        merging, *rest = waiting.entries
        self._message(merging, round_, now)
        for held in rest:
            self.apply(held, round_, now)

    def _absorb(self, key: int, absorb: Entry, round_: Round) -> None:
        """Merge the state carried by ``absorb`` into customer ``key``."""
        survivor = self._state(key)
        blob = absorb.fields.get("s") or b""
        if blob:
            had_session = survivor.session_start is not None
            # Cookies past the bound are trimmed by the merging message's ``t``,
            # as routing trimmed the directory's list.
            merge_into(survivor, state_decoder.decode(blob))
            self._arm(survivor, had_session)
        round_.dirty[key] = survivor
        round_.acked.append(absorb.id)

    def _arm(self, state: CustomerState, had_session: bool) -> None:
        if not had_session and state.session_start is not None:
            deadline = state.deadline(self.session_timeout)
            assert deadline is not None
            self.timers.arm(deadline, state.key)

    # --- session timers ------------------------------------------------------------------------

    def expire(self, key: int, now: float, round_: Round) -> None:
        """A session deadline fell due: close it, or re-arm if activity moved it."""
        state = self.states.get(key)
        if state is None or key in self.waiting:
            return  # merged away, or its merge is pending: the survivor's timer decides
        ctx = TurnContext(self.project, self.schema, self.policy, self.session_timeout, now)
        try:
            due = session_due(state, ctx)
        except LimitExceeded:
            round_.dirty[key] = state  # ended unreported, as in the embedded relay
            return
        if isinstance(due, float):
            self.timers.arm(due, key)
        elif due is not None:
            round_.dirty[key] = state
            round_.commands.append((key, self.project, self.encode(due)))
