"""Identity: which customer a Segment call belongs to, and when two customers become one.

The index maps ``(project, "r:" + userId)`` and ``(project, "c:" + anonymousId)``
to a customer key. Resolving a call applies Infinario's rules:

- unknown ids create a customer; a new id of a known customer is linked to it;
- a registered id given to a cookie-only customer joins it;
- a call whose userId and anonymousId belong to two customers merges the
  anonymous one into the registered one (their state, group and session combine);
- two registered customers are never merged: a cookie last seen with another
  registered id (a shared device) moves to the new customer, and an alias whose
  previousId is another customer's registered id is refused.

The rules act on customer records the caller provides (``Customers``); every
change is noted in a ``Changes`` so the caller can persist it with the commands.

The index may be a cache of a larger directory (``Identity(cached=True)``): an
id it lacks, or a customer not in memory, then raises ``NotActive`` before
anything changes, so the caller can load what the call needs and resolve it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

from .customer import CustomerState, merge_into
from .mapping import LimitExceeded

# A customer seen with a new anonymousId on every call must not grow without
# bound: it keeps its most recent cookies, and the index forgets the oldest.
MAX_COOKIES = 100


def lookup_keys(message: dict[str, Any]) -> list[str]:
    """Every index key resolving ``message`` reads: its ids, and for an alias also
    previousId as a userId (another customer's registered id is refused)."""
    if message["type"] == "alias":
        previous = message["previousId"]
        return ["r:" + message["userId"], "c:" + previous, "r:" + previous]
    keys = []
    user = message.get("userId")
    if user is not None:
        keys.append("r:" + user)
    anon = message.get("anonymousId")
    if anon is not None:
        keys.append("c:" + anon)
    return keys


def alias_refused(previous_id: str) -> LimitExceeded:
    """The refusal of an alias whose previousId is another customer's registered id
    (route.lua dead-letters the same text)."""
    return LimitExceeded(
        code="alias_registered",
        reason=f"alias previousId {previous_id!r} is another customer's registered id; "
        "Infinario cannot merge two registered customers",
    )


@dataclass(slots=True)
class Changes:
    """What resolving calls changed, to be committed with their commands."""

    dirty: dict[int, CustomerState] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    ids: dict[tuple[str, str], int | None] = field(default_factory=dict)  # None: unlink
    created: int = 0
    merged: int = 0
    cookies_moved: int = 0
    cookies_dropped: int = 0


class NotActive(RuntimeError):
    """The call needs an id or a customer that is not in memory yet."""


class Customers(Protocol):
    """The customer records resolution reads and creates."""

    def get(self, key: int) -> CustomerState | None: ...

    def create(self, project: str) -> CustomerState: ...

    def drop(self, key: int) -> None: ...


class Identity:
    """The id index and the resolution rules; the index is a bounded cache of the store's."""

    def __init__(self, *, cached: bool = False) -> None:
        self.index: dict[tuple[str, str], int] = {}
        self.cached = cached
        # With a cached index: ids the caller looked up and found nowhere (new ids).
        self.absent: set[tuple[str, str]] = set()

    def _missing(self, pair: tuple[str, str]) -> None:
        """An id the index lacks: new, unless the index is a cache that may not hold it."""
        if self.cached and pair not in self.absent:
            raise NotActive(f"id {pair[1]!r} of {pair[0]!r} is not in memory")

    def _key(self, project: str, id_key: str) -> int | None:
        pair = (project, id_key)
        key = self.index.get(pair)
        if key is None:
            self._missing(pair)
        return key

    def _find(self, customers: Customers, project: str, prefix: str,
              value: str | None) -> CustomerState | None:
        if value is None:
            return None
        return self._state(customers, self._key(project, prefix + value))

    @staticmethod
    def _state(customers: Customers, key: int | None) -> CustomerState | None:
        if key is None:
            return None
        state = customers.get(key)
        if state is None:
            raise NotActive(f"customer {key} is not in memory")
        return state

    def resolve(self, project: str, message: dict[str, Any], customers: Customers,
                changes: Changes, on_merge: Callable[[CustomerState, bool], None]) -> CustomerState:
        """Find, create or merge into the customer ``message`` belongs to.

        ``on_merge(survivor, had_session)`` runs after a merge so the caller can
        arm the survivor's session timer. Raises ``LimitExceeded`` for an alias
        Infinario cannot perform; nothing is changed then.
        """
        if message["type"] == "alias":
            registered: str | None = message["userId"]
            cookie: str | None = message["previousId"]
        else:
            registered = message.get("userId")
            cookie = message.get("anonymousId")
        # ``_key`` inline: this runs for every call.
        index = self.index
        registered_key = cookie_key = None
        if registered is not None:
            pair = (project, "r:" + registered)
            registered_key = index.get(pair)
            if registered_key is None:
                self._missing(pair)
        if cookie is not None:
            pair = (project, "c:" + cookie)
            cookie_key = index.get(pair)
            if cookie_key is None:
                self._missing(pair)
        if registered_key is not None and registered_key == cookie_key:
            # Most calls: a known customer by both ids (see the end of this method).
            state = self._state(customers, registered_key)
            assert state is not None
            return state
        by_registered = self._state(customers, registered_key)
        by_cookie = self._state(customers, cookie_key)

        if message["type"] == "alias" and by_cookie is None and cookie is not None:
            other = self._find(customers, project, "r:", cookie)
            if other is not None and other is not by_registered:
                raise alias_refused(cookie)

        if by_registered is None and by_cookie is None:
            state = customers.create(project)
            changes.created += 1
            changes.dirty[state.key] = state
            if registered is not None:
                state.registered = registered
                self._link(project, "r:" + registered, state, changes)
            if cookie is not None:
                self._add_cookie(project, cookie, state, changes)
            return state

        if by_cookie is None:
            assert by_registered is not None
            if cookie is not None:
                self._add_cookie(project, cookie, by_registered, changes)
            return by_registered

        if by_registered is None:
            if registered is None:
                return by_cookie
            if by_cookie.registered is None:
                by_cookie.registered = registered
                self._link(project, "r:" + registered, by_cookie, changes)
                return by_cookie
            # A shared device: the cookie was last seen with someone else.
            assert cookie is not None
            state = customers.create(project)
            changes.created += 1
            changes.dirty[state.key] = state
            state.registered = registered
            self._link(project, "r:" + registered, state, changes)
            self._move_cookie(project, cookie, by_cookie, state, changes)
            return state

        if by_registered is by_cookie:
            return by_registered
        assert cookie is not None
        if by_cookie.registered is None:
            self._merge(project, by_registered, by_cookie, customers, changes, on_merge)
        else:
            self._move_cookie(project, cookie, by_cookie, by_registered, changes)
        return by_registered

    def _link(self, project: str, id_key: str, state: CustomerState, changes: Changes) -> None:
        pair = (project, id_key)
        self.index[pair] = state.key
        changes.ids[pair] = state.key
        # The state gained this id: persist it with the index row even when the
        # turn that follows is refused, or a hibernated copy would lack an id the
        # index gives it (and e.g. take a second registered id).
        changes.dirty[state.key] = state

    def _unlink(self, project: str, id_key: str, changes: Changes) -> None:
        pair = (project, id_key)
        self.index.pop(pair, None)
        changes.ids[pair] = None

    def _add_cookie(self, project: str, cookie: str, state: CustomerState,
                    changes: Changes) -> None:
        if cookie not in state.cookies:
            state.cookies.append(cookie)
            self._trim_cookies(project, state, changes)
        self._link(project, "c:" + cookie, state, changes)

    def _trim_cookies(self, project: str, state: CustomerState, changes: Changes) -> None:
        excess = len(state.cookies) - MAX_COOKIES
        if excess > 0:
            for old in state.cookies[:excess]:
                self._unlink(project, "c:" + old, changes)
            del state.cookies[:excess]
            changes.cookies_dropped += excess

    def _move_cookie(self, project: str, cookie: str, source: CustomerState,
                     target: CustomerState, changes: Changes) -> None:
        if cookie in source.cookies:
            source.cookies.remove(cookie)
        changes.dirty[source.key] = source
        if cookie not in target.cookies:
            target.cookies.append(cookie)
            self._trim_cookies(project, target, changes)
        self._link(project, "c:" + cookie, target, changes)
        changes.cookies_moved += 1

    def _merge(self, project: str, survivor: CustomerState, merged: CustomerState,
               customers: Customers, changes: Changes,
               on_merge: Callable[[CustomerState, bool], None]) -> None:
        had_session = survivor.session_start is not None
        merge_into(survivor, merged)
        for cookie in merged.cookies:
            self._link(project, "c:" + cookie, survivor, changes)
        if merged.registered is not None:
            self._link(project, "r:" + merged.registered, survivor, changes)
        self._trim_cookies(project, survivor, changes)
        customers.drop(merged.key)
        changes.dirty.pop(merged.key, None)
        changes.deleted.add(merged.key)
        changes.dirty[survivor.key] = survivor
        changes.merged += 1
        on_merge(survivor, had_session)

    def forget(self, excess: int) -> None:
        """Drop the ``excess`` oldest index entries (the store keeps them)."""
        if excess > 0:
            for pair in list(islice(self.index, excess)):
                del self.index[pair]
