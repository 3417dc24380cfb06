"""Pure helpers that turn Segment payload parts into Infinario properties.

Infinario rejects property keys containing ``.`` or ``$`` and caps how many
distinct keys and event types a project may hold, and objects are awkward to
use in its analytics, so the destination unpacks the first level of objects.
This module applies those rules and nothing else: no I/O, no clock, no trio,
so the actors can call it inline for every message.

Payloads come out of a JSON decoder, so a nested object is always exactly a
``dict``: checking ``type(v) is dict`` (rather than ``isinstance(v, Mapping)``,
an ABC check) keeps the per-value test cheap, and anything else is an opaque
value that passes through untouched.

Functions that clean properties return the input dict itself when nothing
needs changing, because that is the overwhelmingly common case and this runs
for every message. Callers own whatever they get back and must not assume a
fresh copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from types import MappingProxyType
from typing import Any

import msgspec

__all__ = [
    "CONTEXT_EXCLUDED",
    "EventPolicy",
    "ExtrasCache",
    "LimitExceeded",
    "Limits",
    "Schema",
    "clean_properties",
    "context_extras",
    "event_properties",
    "flatten",
    "group_properties",
    "sanitize",
]

_decode = msgspec.json.Decoder().decode

# A call's context: decoded, or still the JSON intake left it as
# (``segment.decode_lean``).
Context = Mapping[str, Any] | msgspec.Raw | None

# ``traits`` are the customer's properties, not the event's, and
# ``integrations`` is Segment's routing switchboard: neither describes the event.
CONTEXT_EXCLUDED = frozenset({"traits", "integrations"})

GROUP_PREFIX = "group_"
GROUP_ID = "group_id"
RESERVED_EVENT_TYPE = "campaign"

# How many distinct names the report keeps for refused event types and dropped
# keys. Both are chosen by whoever sends the data, so an unbounded record would
# let a misbehaving source grow memory without limit; counts stay exact.
REPORT_SAMPLES = 50

_NO_SKIP: frozenset[str] = frozenset()


def flatten(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Unpack the first level of nested objects into ``parent_child`` keys.

    ``{"address": {"city": "London"}}`` becomes ``{"address_city": "London"}``.
    Deeper objects and lists stay as values. An empty nested object disappears:
    it has no properties to unpack, and keeping it as a value would reintroduce
    exactly the kind of object property the unpacking exists to avoid.

    A top-level key wins over a flattened key of the same name (the sender set
    it explicitly); between two flattened keys the first in order wins.
    Returns ``obj`` itself when it is a dict with nothing to unpack.
    """
    # The scan runs in C and is cheaper than rebuilding the dict, and most
    # event properties have no nested objects at all.
    if type(obj) is dict and dict not in map(type, obj.values()):
        return obj
    return _flatten(obj, _NO_SKIP)


def _flatten(obj: Mapping[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    """Always build a new dict, so callers may extend it in place."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in skip:
            continue
        if type(value) is dict:
            prefix = key + "_"
            for sub_key, sub_value in value.items():
                flat_key = prefix + sub_key
                # Skipping taken names lets an earlier top-level key (or an
                # earlier flattened one) win; a later top-level key wins by
                # overwriting unconditionally below.
                if flat_key not in out:
                    out[flat_key] = sub_value
        else:
            out[key] = value
    return out


def _needs_sanitizing(props: Mapping[str, Any]) -> bool:
    # One join and two substring searches, all in C, beat a per-key Python
    # loop by about half for typical payloads; keys are always str (JSON).
    joined = "".join(props)
    return "." in joined or "$" in joined


def sanitize(props: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Replace ``.`` and ``$`` in keys with ``_``; values are untouched.

    Returns the cleaned dict and how many keys needed changing. A key that was
    already clean wins over a sanitized key of the same name (its sender meant
    that name); between two sanitized keys the first in order wins, and the
    loser is dropped but still counted. Returns ``props`` itself, with 0, when
    no key needs changing.
    """
    if not _needs_sanitizing(props):
        return props, 0
    out: dict[str, Any] = {}
    changed = 0
    for key, value in props.items():
        if "." in key or "$" in key:
            changed += 1
            new_key = key.replace(".", "_").replace("$", "_")
            if new_key not in out:
                out[new_key] = value
        else:
            # Unconditional, so a clean key also replaces a sanitized key of
            # the same name that came earlier.
            out[key] = value
    return out, changed


def clean_properties(raw: Mapping[str, Any] | None) -> tuple[dict[str, Any], int]:
    """Flatten, then sanitize: ``{"x.y": {"z$": 1}}`` becomes ``{"x_y_z_": 1}``.

    Flattening first means keys of unpacked objects are sanitized too. Anything
    that is not a mapping (a malformed payload) yields no properties.
    """
    # The exact-type test first spares the common case the slower ABC check.
    if type(raw) is not dict and not isinstance(raw, Mapping):
        return {}, 0
    return sanitize(flatten(raw))


def context_extras(context: Context) -> tuple[dict[str, Any], int]:
    """The call's context, minus ``traits`` and ``integrations``, as properties.

    Unpacked one level and sanitized like event properties, so ``os.name``
    becomes ``os_name`` and ``page.url`` becomes ``page_url``. The dict is
    always new, never ``context`` itself. ``context`` may still be the JSON
    intake left it as (``segment.decode_lean``).
    """
    if type(context) is msgspec.Raw:
        context = _decode(context)
    if type(context) is not dict and not isinstance(context, Mapping):
        return {}, 0
    extras, changed = sanitize(_flatten(context, CONTEXT_EXCLUDED))
    return extras, changed


class ExtrasCache:
    """``context_extras`` by the context's JSON bytes (``segment.context_key``).

    A server-side library sends the same context with every message, and a
    device the same one for a whole session: unpacking it once per distinct
    context instead of once per message saves most of that work. Bounded: when
    full, the oldest half is forgotten.

    Entries are keyed by the 64-bit hash of the bytes, not the bytes: a hit then
    reads no stored copy of a context (hundreds of bytes, long out of the CPU's
    caches), and neither the cache nor the messages on their way to it hold
    copies. Two distinct contexts share a hash with probability 2**-64 per pair,
    far below any disk's error rate.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: dict[int, tuple[dict[str, Any], int]] = {}

    def __call__(self, context: Context, key: int | None) -> tuple[dict[str, Any], int]:
        """A fresh dict of ``context``'s extras (``key``: the hash of its JSON bytes, or
        None)."""
        if key is None:
            return context_extras(context)
        entries = self._entries
        hit = entries.get(key)
        if hit is None:
            if len(entries) >= self.size:
                for old in list(islice(entries, self.size // 2)):
                    del entries[old]
            hit = entries[key] = context_extras(context)
        extras, changed = hit
        return dict(extras), changed


def event_properties(
    properties: Mapping[str, Any] | None, context: Context,
    extras_of: Callable[[Context], tuple[dict[str, Any], int]] = context_extras,
) -> tuple[dict[str, Any], int]:
    """Context extras overlaid by the event's own cleaned properties.

    The event's own property wins over a context extra of the same name, since
    it describes this event specifically. The count is the total number of
    sanitized keys from both parts. ``extras_of`` computes (or recalls) the
    context's extras, always as a fresh dict.
    """
    extras, extras_changed = extras_of(context)
    props, props_changed = clean_properties(properties)
    if not extras:
        return props, props_changed
    # ``extras`` is always a fresh dict, so it can absorb ``props`` in place;
    # ``props`` may be the caller's own dict and must not be modified.
    extras.update(props)
    return extras, extras_changed + props_changed


def group_properties(group_id: str, traits: Mapping[str, Any] | None) -> tuple[dict[str, Any], int]:
    """Customer properties for a group assignment.

    The group's traits are prefixed ``group_`` so they cannot overwrite the
    customer's own traits (a group's ``name`` becomes ``group_name``). The
    explicit ``group_id`` wins over a trait named ``id``.
    """
    cleaned, changed = clean_properties(traits)
    out: dict[str, Any] = {GROUP_ID: group_id}
    for key, value in cleaned.items():
        prefixed = GROUP_PREFIX + key
        if prefixed != GROUP_ID:
            out[prefixed] = value
    return out, changed


class LimitExceeded(Exception):
    """A command Infinario would reject, refused before it is sent.

    ``code`` is a stable machine-readable identifier; ``reason`` is a one-line
    explanation for logs and reports.
    """

    def __init__(self, reason: str, code: str) -> None:
        # Both go into ``args`` so the exception survives pickling intact.
        super().__init__(reason, code)
        self.reason = reason
        self.code = code

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Infinario's per-project caps; 255 each unless configured otherwise."""

    customer_keys: int = 255
    event_keys: int = 255  # distinct property keys per event type
    event_types: int = 255

    def __post_init__(self) -> None:
        for name in ("customer_keys", "event_keys", "event_types"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"limit {name} must be a non-negative int, got {value!r}")


class _Dropped:
    """Drop statistics for one event type or for customer properties."""

    __slots__ = ("count", "keys")

    def __init__(self) -> None:
        self.count = 0
        self.keys: set[str] = set()

    def add(self, dropped: list[str]) -> None:
        self.count += len(dropped)
        for key in dropped:
            if len(self.keys) >= REPORT_SAMPLES:
                break
            self.keys.add(key)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "keys": sorted(self.keys)}


class Schema:
    """What Infinario already knows about one project: event types, their
    property keys, customer property keys.

    Keys are counted after sanitizing, and a key whose value is None still
    counts: Infinario registers the key either way. Everything admitted is
    also queued for :meth:`drain_new` so the caller can persist it, because the
    limits are Infinario's and must hold across restarts.
    """

    __slots__ = (
        "_customer_dropped",
        "_customer_keys",
        "_event_dropped",
        "_limits",
        "_new",
        "_refused",
        "_refused_total",
        "_types",
    )

    def __init__(self, limits: Limits = Limits()) -> None:
        self._limits = limits
        self._types: dict[str, set[str]] = {}
        self._customer_keys: set[str] = set()
        self._new: list[tuple[str, str, str]] = []
        self._event_dropped: dict[str, _Dropped] = {}
        self._customer_dropped = _Dropped()
        self._refused: dict[str, int] = {}
        self._refused_total = 0

    @property
    def limits(self) -> Limits:
        return self._limits

    def load(self, kind: str, event_type: str, key: str) -> None:
        """Restore one persisted row, as produced by :meth:`drain_new`.

        ``("type", event_type, "")``, ``("event_key", event_type, key)`` or
        ``("customer_key", "", key)``. Rows are restored even past the current
        limits (they may have been lowered since): Infinario already holds them,
        so they keep being accepted, and nothing new fits until there is room.
        """
        if kind == "type":
            self._types.setdefault(event_type, set())
        elif kind == "event_key":
            self._types.setdefault(event_type, set()).add(key)
        elif kind == "customer_key":
            self._customer_keys.add(key)
        else:
            raise ValueError(f"unknown schema row kind {kind!r}")

    def admit_event(
        self, event_type: str, props: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """Record ``event_type`` and keep the props Infinario will accept.

        Raises :class:`LimitExceeded` (``event_type_limit``) for a new type when
        the project is full, recording nothing. Otherwise keeps the props whose
        keys are already known for the type or still fit under the limit (in
        order), and drops the rest. Returns ``(kept, dropped_keys)``; ``kept``
        is ``props`` itself when nothing is dropped.
        """
        known = self._types.get(event_type)
        if known is None:
            if len(self._types) >= self._limits.event_types:
                self._refused_total += 1
                if event_type in self._refused or len(self._refused) < REPORT_SAMPLES:
                    self._refused[event_type] = self._refused.get(event_type, 0) + 1
                raise LimitExceeded(
                    f"event type {event_type!r} refused: the project already has "
                    f"{len(self._types)} event types (limit {self._limits.event_types})",
                    "event_type_limit",
                )
            known = self._types[event_type] = set()
            self._new.append(("type", event_type, ""))
        # ``issuperset`` takes the dict as it is, in C: cheaper than a keys view's ``<=``.
        if known.issuperset(props):
            return props, []
        kept, dropped = self._admit(known, self._limits.event_keys, props, "event_key", event_type)
        if dropped:
            stats = self._event_dropped.get(event_type)
            if stats is None:
                stats = self._event_dropped[event_type] = _Dropped()
            stats.add(dropped)
        return kept, dropped

    def admit_customer(self, props: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Keep the customer props whose keys are known or still fit under the
        limit; same contract as :meth:`admit_event` minus the type check."""
        known = self._customer_keys
        if known.issuperset(props):
            return props, []
        kept, dropped = self._admit(known, self._limits.customer_keys, props, "customer_key", "")
        if dropped:
            self._customer_dropped.add(dropped)
        return kept, dropped

    def _admit(
        self,
        known: set[str],
        limit: int,
        props: dict[str, Any],
        kind: str,
        event_type: str,
    ) -> tuple[dict[str, Any], list[str]]:
        # Negative when limits were lowered below what was loaded: nothing fits.
        room = limit - len(known)
        dropped: list[str] = []
        for key in props:
            if key in known:
                continue
            if room > 0:
                known.add(key)
                self._new.append((kind, event_type, key))
                room -= 1
            else:
                dropped.append(key)
        if not dropped:
            return props, dropped
        dropped_set = set(dropped)
        kept = {k: v for k, v in props.items() if k not in dropped_set}
        return kept, dropped

    def drain_new(self) -> list[tuple[str, str, str]]:
        """Rows recorded since the last drain, in :meth:`load` order and format."""
        rows = self._new
        self._new = []
        return rows

    def report(self) -> dict[str, Any]:
        """Counts for a human-readable report; JSON-serializable.

        Dropped key names and refused type names are samples (at most
        ``REPORT_SAMPLES`` each); the counts are exact.
        """
        limits = self._limits
        return {
            "limits": {
                "customer_keys": limits.customer_keys,
                "event_keys": limits.event_keys,
                "event_types": limits.event_types,
            },
            "event_types": len(self._types),
            "customer_keys": len(self._customer_keys),
            "event_keys": {t: len(keys) for t, keys in sorted(self._types.items())},
            "dropped_event_keys": {
                t: stats.as_dict() for t, stats in sorted(self._event_dropped.items())
            },
            "dropped_customer_keys": self._customer_dropped.as_dict(),
            "refused_event_types": dict(sorted(self._refused.items())),
            "refused_total": self._refused_total,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class EventPolicy:
    """How Segment event names become Infinario event types.

    ``renames`` maps a Segment event name to an Infinario type (a shop's
    ``Order Completed`` to ``hard_purchase``, the type Infinario's payment
    validation reads). ``campaign`` is reserved for Infinario's campaign module
    and is refused unless ``allow_campaign`` is set.
    """

    # Stored as a read-only copy so the policy cannot change under the actors
    # that share it; excluded from the hash because a mapping is unhashable.
    renames: Mapping[str, str] = field(default_factory=dict, hash=False)
    allow_campaign: bool = False

    def __post_init__(self) -> None:
        renames = dict(self.renames)
        for source, target in renames.items():
            if not isinstance(source, str) or not isinstance(target, str) or not target:
                raise ValueError(f"invalid event rename {source!r} -> {target!r}")
        object.__setattr__(self, "renames", MappingProxyType(renames))

    def event_type(self, segment_event: str) -> str:
        """The Infinario type for ``segment_event``; raises
        :class:`LimitExceeded` (``reserved_event_type``) for ``campaign``."""
        event_type = self.renames.get(segment_event, segment_event)
        if event_type == RESERVED_EVENT_TYPE and not self.allow_campaign:
            raise LimitExceeded(
                "event type 'campaign' is reserved for Infinario's campaign module; "
                "rename it or set allow_campaign",
                "reserved_event_type",
            )
        return event_type
