"""One customer's turn: pure state transitions from Segment messages to commands.

This is the body of a per-customer actor with the I/O taken out: given a
customer's state and one of its messages, update the state and return the
Infinario commands the message produces. No clock, no store, no trio; the
directory in ``actors.py`` owns identity resolution, merges and timers and
calls into here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from .commands import Command
from .mapping import (
    Context,
    EventPolicy,
    ExtrasCache,
    LimitExceeded,
    Schema,
    clean_properties,
    context_extras,
    event_properties,
    group_properties,
)
from .segment import TIME_KEY, context_of

SESSION_START = "session_start"
SESSION_END = "session_end"
# The message types whose turn may change the customer's record (sessions,
# group); the others only read it.
CHANGES_STATE = frozenset({"page", "screen", "group"})
# Calls whose turns add the context's extras to an event (``TurnContext.extras_of``).
USES_EXTRAS = frozenset({"track", "page", "screen"})


class CustomerState(msgspec.Struct, array_like=True, gc=False):
    """A customer's compact record: what an idle actor hibernates to."""

    key: int
    project: str
    registered: str | None = None
    cookies: list[str] = msgspec.field(default_factory=list)
    group_id: str | None = None
    group_keys: list[str] = msgspec.field(default_factory=list)
    session_start: float | None = None
    session_last: float | None = None
    # The ids of the call that last touched the session; session_end goes to them.
    session_ids: dict[str, str] | None = None
    # Wall time the session last saw activity. The timer runs from here, not from
    # the event time: a backfill of old events keeps its session open while more
    # of it may arrive, and event-time gaps still close sessions in ``turn``.
    session_seen: float | None = None

    def deadline(self, timeout: float) -> float | None:
        """Wall time at which the open session ends for lack of activity."""
        if self.session_last is None:
            return None
        seen = self.session_seen if self.session_seen is not None else self.session_last
        return seen + timeout

    def ids(self) -> dict[str, str]:
        ids: dict[str, str] = {}
        if self.registered is not None:
            ids["registered"] = self.registered
        if self.cookies:
            ids["cookie"] = self.cookies[-1]
        return ids


state_encoder = msgspec.msgpack.Encoder()
state_decoder = msgspec.msgpack.Decoder(CustomerState)


@dataclass(slots=True)
class TurnContext:
    """What a turn needs besides the customer: the project's rules."""

    project: str
    schema: Schema
    policy: EventPolicy
    session_timeout: float
    # Wall time of the turn. Without one (a pure caller), the session deadline
    # follows event time; 0.0 would put it at the epoch and expire it at once.
    now: float | None = None
    # Context extras remembered by the hash of the context's JSON bytes (``context_key``).
    cache: ExtrasCache | None = None
    context_key: int | None = None
    sanitized: int = 0
    dropped: int = 0

    def extras_of(self, context: Context) -> tuple[dict[str, Any], int]:
        """The call's context extras, as a dict the caller owns."""
        if self.cache is None:
            return context_extras(context)
        return self.cache(context, self.context_key)


def call_ids(message: dict[str, Any]) -> dict[str, str]:
    """The Infinario ids a call carries: userId -> registered, anonymousId -> cookie."""
    ids: dict[str, str] = {}
    if message["type"] == "alias":
        ids["registered"] = message["userId"]
        ids["cookie"] = message["previousId"]
        return ids
    user = message.get("userId")
    if user is not None:
        ids["registered"] = user
    anon = message.get("anonymousId")
    if anon is not None:
        ids["cookie"] = anon
    return ids


def turn(state: CustomerState, message: dict[str, Any], ctx: TurnContext) -> list[Command]:
    """Apply one validated message to ``state``; return its commands in order.

    Raises ``mapping.LimitExceeded`` for a message the project's rules refuse;
    the state is then unchanged.
    """
    kind = message["type"]
    ids = call_ids(message)
    at: float = message[TIME_KEY]
    if kind == "track":
        return [_track(message, ids, at, ctx)]
    if kind in ("page", "screen"):
        return _visit(state, message, ids, at, ctx)
    if kind == "identify":
        traits = message.get("traits")
        if not traits:
            context = context_of(message)
            traits = context.get("traits") if isinstance(context, dict) else None
        props, sanitized = clean_properties(traits)
        ctx.sanitized += sanitized
        return [_customer(ids, props, at, ctx)]
    if kind == "group":
        return [_group(state, message, ids, at, ctx)]
    if kind == "alias":
        return [_customer(ids, {}, at, ctx)]
    raise AssertionError(kind)


def _customer(
    ids: dict[str, str], props: dict[str, Any], at: float, ctx: TurnContext
) -> Command:
    kept, dropped = ctx.schema.admit_customer(props)
    ctx.dropped += len(dropped)
    return Command("customer", ctx.project, ids, kept, at)


def _event(
    event_type: str, ids: dict[str, str], props: dict[str, Any], at: float, ctx: TurnContext
) -> Command:
    kept, dropped = ctx.schema.admit_event(event_type, props)
    ctx.dropped += len(dropped)
    return Command("event", ctx.project, ids, kept, at, event_type)


def _track(message: dict[str, Any], ids: dict[str, str], at: float, ctx: TurnContext) -> Command:
    event_type = ctx.policy.event_type(message["event"])
    props, sanitized = event_properties(message.get("properties"), message.get("context"),
                                        ctx.extras_of)
    ctx.sanitized += sanitized
    return _event(event_type, ids, props, at, ctx)


def _visit(
    state: CustomerState,
    message: dict[str, Any],
    ids: dict[str, str],
    at: float,
    ctx: TurnContext,
) -> list[Command]:
    props, sanitized = event_properties(message.get("properties"), message.get("context"),
                                        ctx.extras_of)
    ctx.sanitized += sanitized
    if props is message.get("properties"):
        props = dict(props)  # it is the message's own dict; name/category go on a copy
    for field in ("name", "category"):
        value = message.get(field)
        if value is not None and field not in props:
            props[field] = value
    visit_type = "page_visit" if message["type"] == "page" else "screen_visit"
    # Admit the visit first: if the project refuses it, the session must not move.
    visit = _event(visit_type, ids, props, at, ctx)

    # Every command is built before the state changes: a refusal (LimitExceeded
    # from session_end or session_start) must leave the customer as it was, or
    # the state would claim a session Infinario never heard of.
    commands: list[Command] = []
    # Event time, not wall time: a replayed backlog with a long gap closes
    # the old session here instead of waiting for a timer.
    gap = state.session_last is not None and at - state.session_last > ctx.session_timeout
    if gap:
        commands.append(_session_end(state, ctx))
    opens = gap or state.session_start is None
    if opens:
        extras, _ = ctx.extras_of(message.get("context"))
        own = message.get("properties") or {}
        context = context_of(message)
        page = context.get("page") if isinstance(context, dict) else None
        for field in ("url", "referrer"):
            value = own.get(field) if isinstance(own, dict) else None
            if value is None and isinstance(page, dict):
                value = page.get(field)
            if value is not None:
                extras[field] = value
        commands.append(_event(SESSION_START, ids, extras, at, ctx))
    commands.append(visit)

    if opens:
        state.session_start = at
        state.session_last = at
    elif state.session_last is not None and at > state.session_last:
        state.session_last = at
    state.session_ids = ids
    state.session_seen = ctx.now
    return commands


def end_session(state: CustomerState, ctx: TurnContext) -> Command:
    """Close the open session: ``session_end`` at the last activity, with its duration.

    Raises ``mapping.LimitExceeded``, leaving the session open, when the project
    cannot take a ``session_end``.
    """
    command = _session_end(state, ctx)
    close_session(state)
    return command


def session_due(state: CustomerState, ctx: TurnContext) -> Command | float | None:
    """A session timer fired: the ``session_end`` if the session is over, the new
    deadline if activity moved it (re-arm), or None when no session is open.

    A ``session_end`` the project refuses still ends the session (or its timer
    would fire forever): ``LimitExceeded`` is raised after closing it.
    """
    deadline = state.deadline(ctx.session_timeout)
    if deadline is None:
        return None
    assert ctx.now is not None, "a timer fires at a known time"
    if deadline > ctx.now:
        return deadline
    try:
        return end_session(state, ctx)
    except LimitExceeded:
        close_session(state)
        raise


def close_session(state: CustomerState) -> None:
    """Forget the open session without a ``session_end`` (one the project refuses)."""
    state.session_start = None
    state.session_last = None
    state.session_ids = None
    state.session_seen = None


def _session_end(state: CustomerState, ctx: TurnContext) -> Command:
    assert state.session_start is not None and state.session_last is not None
    props: dict[str, Any] = {"duration": round(state.session_last - state.session_start, 3)}
    return _event(SESSION_END, state.session_ids or state.ids(), props, state.session_last, ctx)


def _group(
    state: CustomerState,
    message: dict[str, Any],
    ids: dict[str, str],
    at: float,
    ctx: TurnContext,
) -> Command:
    group_id: str = message["groupId"]
    props, sanitized = group_properties(group_id, message.get("traits"))
    ctx.sanitized += sanitized
    if state.group_id is not None and state.group_id != group_id:
        # One group per customer: the old group's traits must not linger as if
        # they described the new one.
        for key in state.group_keys:
            if key not in props:
                props[key] = None
    command = _customer(ids, props, at, ctx)
    # Remember every key this group has set, not only this call's: a later call
    # for the same group may update some traits, and a move must still clear
    # the ones it did not repeat.
    keys = dict.fromkeys(state.group_keys) if state.group_id == group_id else {}
    for key, value in command.properties.items():
        if key == "group_id":
            continue
        if value is None:
            keys.pop(key, None)
        else:
            keys[key] = None
    state.group_id = group_id
    state.group_keys = list(keys)
    return command


def merge_into(survivor: CustomerState, merged: CustomerState) -> None:
    """Combine ``merged`` into ``survivor``: ids, group, and one session."""
    for cookie in merged.cookies:
        if cookie not in survivor.cookies:
            survivor.cookies.append(cookie)
    if survivor.registered is None:
        survivor.registered = merged.registered
    if survivor.group_id is None and merged.group_id is not None:
        survivor.group_id = merged.group_id
        survivor.group_keys = merged.group_keys
    if merged.session_start is not None and merged.session_last is not None:
        if survivor.session_start is None or survivor.session_last is None:
            survivor.session_start = merged.session_start
            survivor.session_last = merged.session_last
            survivor.session_ids = merged.session_ids
            survivor.session_seen = merged.session_seen
        else:
            survivor.session_start = min(survivor.session_start, merged.session_start)
            if merged.session_last > survivor.session_last:
                survivor.session_last = merged.session_last
                survivor.session_ids = merged.session_ids
        if merged.session_seen is not None:
            survivor.session_seen = max(survivor.session_seen or 0.0, merged.session_seen)
