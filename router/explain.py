"""``infinario-router explain``: what Segment messages would become in Infinario.

Runs the relay's own pure mapping (``segment``, ``customer``, ``mapping``) over
messages read from a file or stdin and says, for each, which commands it would
produce and why its keys or event type changed. Nothing is sent and no data
dir is touched, so it is safe to run anywhere against real payloads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .commands import Command
from .config import Config
from .customer import CustomerState, TurnContext, call_ids, turn
from .errors import Rejected, RouterError
from .journal import merge_shared, shared_part
from .mapping import CONTEXT_EXCLUDED, EventPolicy, LimitExceeded, Limits, Schema, sanitize
from .segment import Envelope, decode_envelope, decode_item, decode_json, validate

DESCRIPTION = (
    "Show the Infinario commands Segment messages would become, and why keys were renamed, "
    "unpacked or dropped and why messages were refused. Reads one message, a JSON array of "
    "messages or a batch body {\"batch\": [...]} from FILE or stdin. Nothing is sent and no "
    "data dir is used. Sessions and groups carry across the messages of one input, per userId "
    "(anonymousId when there is none); identity merges (alias, or a call joining two "
    "customers) are not simulated. Input that is not JSON, or not messages, exits with "
    "status 2; in an array or batch, an invalid message is explained as refused."
)
PROJECT = "explain"


class BadInput(RouterError):
    """The input is not something ``explain`` can read as Segment messages."""


@dataclass(slots=True)
class Note:
    """Why one key, or the event type, is not what the message said."""

    key: str
    change: str  # renamed, unpacked, dropped, event_renamed
    detail: str


@dataclass(slots=True)
class Explained:
    index: int
    message: Any
    commands: list[Command] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    refused: tuple[str, str] | None = None  # (code, reason)
    # Refused as not a valid Segment message, rather than by the project's rules.
    invalid: bool = False


class _RecordingSchema(Schema):
    """A schema that remembers which keys each admission dropped, for the notes."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self.dropped: list[tuple[str | None, list[str]]] = []

    def admit_event(
        self, event_type: str, props: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        kept, dropped = super().admit_event(event_type, props)
        if dropped:
            self.dropped.append((event_type, dropped))
        return kept, dropped

    def admit_customer(self, props: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        kept, dropped = super().admit_customer(props)
        if dropped:
            self.dropped.append((None, dropped))
        return kept, dropped


class Explainer:
    """Explains messages in order, keeping one customer state per customer."""

    def __init__(self, config: Config, now: float | None = None) -> None:
        self.config = config
        self.limits = Limits(customer_keys=config.max_customer_keys,
                             event_keys=config.max_event_keys,
                             event_types=config.max_event_types)
        self.schema = _RecordingSchema(self.limits)
        self.policy = EventPolicy(renames=config.renames, allow_campaign=config.allow_campaign)
        self.states: dict[str, CustomerState] = {}
        self.now = dt.datetime.now(dt.UTC).timestamp() if now is None else now

    def explain(self, index: int, item: Any, sent_at: Any = None) -> Explained:
        result = Explained(index, item)
        try:
            message = validate(item, type_=None, received_at=self.now, sent_at=sent_at)
        except Rejected as exc:
            result.refused = (exc.code, exc.message)
            result.invalid = True
            return result
        result.message = message
        ids = call_ids(message)
        customer = ids.get("registered") or ids["cookie"]
        state = self.states.get(customer)
        if state is None:
            state = self.states[customer] = CustomerState(len(self.states), PROJECT)
        ctx = TurnContext(project=PROJECT, schema=self.schema, policy=self.policy,
                          session_timeout=self.config.session_timeout)
        self.schema.dropped.clear()
        try:
            result.commands = turn(state, message, ctx)
        except LimitExceeded as exc:
            result.refused = (exc.code, exc.reason)
            return result
        result.notes = self._notes(message)
        return result

    def _notes(self, message: dict[str, Any]) -> list[Note]:
        notes: list[Note] = []
        kind = message["type"]
        if kind == "track":
            event = message["event"]
            renamed = self.policy.renames.get(event)
            if renamed is not None and renamed != event:
                notes.append(Note("event", "event_renamed",
                                  f"{event!r} becomes event type {renamed!r} (rename)"))
        sources: list[tuple[str, Any, frozenset[str]]] = []
        if kind in ("track", "page", "screen"):
            sources.append(("properties", message.get("properties"), frozenset()))
            sources.append(("context", message.get("context"), CONTEXT_EXCLUDED))
        elif kind == "identify":
            if message.get("traits"):
                sources.append(("traits", message.get("traits"), frozenset()))
            else:
                context = message.get("context") or {}
                sources.append(("context.traits", context.get("traits"), frozenset()))
        elif kind == "group":
            sources.append(("traits", message.get("traits"), frozenset()))
        finals: dict[str, list[str]] = {}
        for label, mapping, skip in sources:
            if not isinstance(mapping, dict):
                continue
            for path, name in _key_notes(label, mapping, skip, notes):
                if kind == "group":
                    name = "group_" + name
                finals.setdefault(name, []).append(path)
        for name, paths in finals.items():
            own = [p for p in paths if not p.startswith("context.")]
            if own and len(paths) > len(own):
                for path in paths:
                    if path.startswith("context."):
                        notes.append(Note(path, "dropped",
                                          f"the event's own {name!r} wins over the context's"))
                paths = own
            if len(paths) > 1:
                notes.append(Note(", ".join(paths), "dropped",
                                  f"all become {name!r}; only one value is kept"))
        for event_type, dropped in self.schema.dropped:
            if event_type is None:
                why = (f"the project already has {self.limits.customer_keys} customer property "
                       "keys (max-customer-keys)")
            else:
                why = (f"event type {event_type!r} already has {self.limits.event_keys} property "
                       "keys (max-event-keys)")
            notes.extend(Note(key, "dropped", why) for key in dropped)
        return notes


def _key_notes(
    label: str, mapping: dict[str, Any], skip: frozenset[str], notes: list[Note]
) -> list[tuple[str, str]]:
    """Note unpacked and renamed keys; return each resulting (source path, key name)."""
    out: list[tuple[str, str]] = []
    for key, value in mapping.items():
        if key in skip:
            continue
        path = f"{label}.{key}"
        if type(value) is dict:
            if not value:
                notes.append(Note(path, "dropped", "an empty object has nothing to unpack"))
                continue
            names = []
            for sub in value:
                flat = f"{key}_{sub}"
                final = _sanitized(flat)
                names.append(final)
                out.append((f"{path}.{sub}", final))
                if final != flat:
                    notes.append(Note(f"{path}.{sub}", "renamed",
                                      f"{flat!r} becomes {final!r}: Infinario keys may not "
                                      "contain '.' or '$'"))
            notes.append(Note(path, "unpacked", "into " + ", ".join(names)))
        else:
            final = _sanitized(key)
            out.append((path, final))
            if final != key:
                notes.append(Note(path, "renamed", f"{key!r} becomes {final!r}: Infinario keys "
                                  "may not contain '.' or '$'"))
    return out


def _sanitized(key: str) -> str:
    return next(iter(sanitize({key: None})[0]))


# --- input -----------------------------------------------------------------------------------

# Deeper than this, input is refused before the JSON decoder sees it. msgspec
# guards its recursion with the interpreter's C stack limit, which differs
# between Python versions (3.13 raised it), so whether it fails on a deep
# document depends on the interpreter; this bound is far below all of them.
PARSE_DEPTH = 500
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth_exceeds(data: bytes, limit: int = PARSE_DEPTH) -> bool:
    """True when arrays and objects in ``data`` nest deeper than ``limit``.

    A scan of the bytes, without recursion: brackets inside strings do not
    count. Counting brackets first (in C) spares ordinary payloads the scan.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False



def _merged(item: Any, envelope: Envelope) -> Any:
    """A batch item with the envelope's context and integrations, as intake merges them."""
    shared = shared_part(envelope.context, envelope.integrations)
    return merge_shared(item, shared) if shared and isinstance(item, dict) else item


def read_input(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise BadInput(f"explain: cannot read {source!r}: {exc.strerror or exc}") from None


def parse_input(data: bytes) -> tuple[list[tuple[Any, Any]], bool]:
    """``[(message, sent_at)]`` and whether the input was a single message."""
    if not data.strip():
        raise BadInput("explain: the input is empty; give a message, an array or a batch body")
    if json_depth_exceeds(data):
        raise BadInput(f"explain: JSON nests deeper than {PARSE_DEPTH} levels")
    try:
        value = decode_json(data)
    except Rejected as exc:
        raise BadInput("explain: " + exc.message.replace("request body", "the input")) from None
    if isinstance(value, list):
        return [(item, None) for item in value], False
    if isinstance(value, dict) and "batch" in value:
        try:
            envelope = decode_envelope(data)
            items = []
            for raw in envelope.batch:
                items.append((_merged(decode_item(bytes(raw)), envelope), envelope.sentAt))
        except Rejected as exc:
            raise BadInput(f"explain: {exc.message}") from None
        return items, False
    if isinstance(value, dict):
        return [(value, None)], True
    raise BadInput("explain: expected a Segment message, an array of messages or a batch "
                   f"body, got a JSON {type(value).__name__}")


# --- output ----------------------------------------------------------------------------------


def _when(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat().replace("+00:00", "Z")


def _command_dict(command: Command) -> dict[str, Any]:
    return {"kind": command.kind, "event_type": command.event_type, "ids": command.ids,
            "properties": command.properties, "timestamp": _when(command.timestamp)}


def as_json(result: Explained) -> dict[str, Any]:
    message = result.message if isinstance(result.message, dict) else {}
    return {
        "index": result.index,
        "type": message.get("type"),
        "refused": None if result.refused is None else
        {"code": result.refused[0], "reason": result.refused[1]},
        "commands": [_command_dict(c) for c in result.commands],
        "notes": [{"key": n.key, "change": n.change, "detail": n.detail} for n in result.notes],
    }


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=False, default=str)


def as_text(result: Explained) -> list[str]:
    message = result.message if isinstance(result.message, dict) else {}
    head = f"message {result.index}"
    if message.get("type"):
        head += f": {message['type']}"
        if message.get("event"):
            head += f" {message['event']!r}"
    lines = [head]
    if result.refused is not None:
        code, reason = result.refused
        lines.append(f"  refused ({code}): {reason}")
    for command in result.commands:
        what = f"event {command.event_type}" if command.kind == "event" else "customer update"
        lines.append(f"  {what}  ids {_compact(command.ids)}  at {_when(command.timestamp)}")
        lines.append(f"    properties {_compact(command.properties)}")
    for note in result.notes:
        lines.append(f"  {note.change}: {note.key}: {note.detail}")
    return lines


def run(args: argparse.Namespace, config: Config) -> int:
    items, single = parse_input(read_input(args.file))
    explainer = Explainer(config)
    results = [explainer.explain(i, item, sent_at) for i, (item, sent_at) in enumerate(items, 1)]
    if single and results[0].invalid and results[0].refused is not None:
        raise BadInput(f"explain: not a Segment message: {results[0].refused[1]}")
    for result in results:
        if args.json:
            print(json.dumps(as_json(result), ensure_ascii=False))
        else:
            print("\n".join(as_text(result)))
    return 0

