"""``infinario-router dead-letters`` with ``--redis``: list, show, replay and purge the
dead letters kept in Redis (``letters.py``), with the data dir path's words.

Ids are ``<project>/<stream id>``. Replay moves each failed command into its
customer's partition input (``replay.lua``), where the running workers turn it into
an outbox command; the partition is the customer key modulo ``--partitions``, which
must be the relay's (a mismatch the input streams show is refused before anything moves).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Iterable
from functools import partial
from typing import Any

import coredis
import trio
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError

from .. import outbox
from ..config import fingerprint, redact_url
from ..deadletters import REFUSED_NOT_REPLAYED, command_json, header, line, message_json, when
from ..errors import ConfigError, RouterError, StartupError
from .keys import Keys
from .letters import DeadId, DeadLetters, Letter

CONNECT_TIMEOUT = 5.0  # seconds; an address that drops packets fails instead of hanging
REPLY_TIMEOUT = 30.0  # seconds per command; a page of XRANGE or one script run is quick


def run(args: argparse.Namespace, url: str, partitions: int) -> int:
    """Run the action; Redis failures become one line (``RouterError``, exit 2)."""
    ids = _ids(args)
    if args.action in ("replay", "purge") and not ids and not args.all:
        print("infinario-router: name dead letter ids or pass --all", file=sys.stderr)
        return 2
    try:
        return trio.run(partial(_run, args, ids, url, partitions))
    except (RouterError, RedisError, OSError, BaseExceptionGroup) as exc:
        error = _one_line(exc, url)
        if error is None:
            raise
        raise error from None


def _ids(args: argparse.Namespace) -> list[DeadId]:
    given = [args.id] if args.action == "show" else list(getattr(args, "ids", []))
    try:
        return [DeadId.parse(str(dead_id)) for dead_id in given]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def _run(args: argparse.Namespace, ids: list[DeadId], url: str, partitions: int) -> int:
    async with coredis.Redis.from_url(url, connect_timeout=CONNECT_TIMEOUT,
                                      stream_timeout=REPLY_TIMEOUT) as client:
        letters = DeadLetters(client, partitions)
        if args.action == "list":
            return await _list(letters, args.limit)
        if args.action == "show":
            return await _show(letters, ids[0])
        if args.action == "purge":
            return await _purge(letters, ids, every=args.all)
        return await _replay(letters, ids, every=args.all)


# --- list and show -----------------------------------------------------------------------------


async def _list(letters: DeadLetters, limit: int) -> int:
    # A negative limit shows every dead letter, as SQLite's LIMIT does.
    count = None if limit < 0 else limit
    shown: list[Letter] = []
    total = 0
    for project in await letters.projects():
        total += await letters.count(project)
        if count != 0:
            shown += await letters.first(project, count)
    shown.sort(key=lambda letter: letter.id.order())
    shown = shown[:count]
    if not shown:
        print("no dead letters")
        return 0
    column = f"<{max(len(str(letter.id)) for letter in shown)}"
    print(header(column))
    for letter in shown:
        status, tries, reason = _summary(letter)
        print(line(letter.id, letter.created_at, letter.id.project, status, tries, reason[:80],
                   id_column=column))
    if total > len(shown):
        print(f"... {total - len(shown)} more (use --limit)")
    return 0


def _summary(letter: Letter) -> tuple[str, object, str]:
    """Status, tries and reason, the columns ``list`` shows after the project."""
    kind = letter.kind
    if kind == "failed":
        attempts = letter.number("attempts")
        return (letter.text("status") or "failed", "?" if attempts is None else int(attempts),
                "; ".join(_errors(letter)))
    if kind == "refused":
        return "refused", 0, _refusal(letter)
    if kind == "expired":
        return "expired", "-", letter.text("reason") or ""
    return "unknown", "-", "fields " + ", ".join(sorted(_texts(letter.fields)))


def _refusal(letter: Letter) -> str:
    # The data dir's words for a refusal: "code: reason".
    return f"{letter.text('code')}: {letter.text('reason') or ''}"


def _errors(letter: Letter) -> list[str]:
    raw = letter.text("errors")
    try:
        errors = json.loads(raw or "[]")
    except ValueError:
        return [raw or ""]
    return [str(e) for e in errors] if isinstance(errors, list) else [str(errors)]


def _texts(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {name.decode("utf-8", errors="replace"): value.decode("utf-8", errors="replace")
            for name, value in fields.items()}


async def _show(letters: DeadLetters, dead_id: DeadId) -> int:
    letter = await letters.get(dead_id)
    if letter is None:
        print(f"infinario-router: no dead letter {dead_id}", file=sys.stderr)
        return 1
    print(json.dumps(details(letter), indent=2, sort_keys=True))
    return 0


def details(letter: Letter) -> dict[str, Any]:
    """Everything about one dead letter, in the data dir path's names where they fit."""
    out: dict[str, Any] = {"id": str(letter.id), "project": letter.id.project,
                           "created_at": when(letter.created_at), "kind": letter.kind,
                           "replayable": letter.replayable() is None}
    customer = letter.text("k")
    if customer is not None:
        out["customer"] = int(customer) if customer.isdigit() else customer
    kind = letter.kind
    if kind == "failed":
        out.update(status=letter.text("status"), errors=_errors(letter),
                   attempts=_int(letter.number("attempts")))
        _times(out, letter, first_attempt="first_at", last_attempt="last_at")
        command = letter.fields.get(b"command", b"")
        try:
            out["command"] = command_json(command)
        except ValueError:
            out["command"] = command.decode("utf-8", errors="replace")
    elif kind == "refused":
        out.update(status="refused", errors=[_refusal(letter)], attempts=0,
                   code=letter.text("code"), reason=letter.text("reason"),
                   message=message_json(letter.fields.get(b"b", b"")))
        write_key = letter.text("w")
        if write_key is not None:
            out["write_key"] = fingerprint(write_key)  # a credential: enough to tell keys apart
    elif kind == "expired":
        reason = letter.text("reason") or ""
        out.update(status="expired", errors=[reason], reason=reason,
                   partition=_int(letter.number("partition")), entry=letter.text("entry"),
                   lane=_int(letter.number("lane")), count=_int(letter.number("count")),
                   body=message_json(letter.fields[b"body"]))
        if b"customers" in letter.fields:
            out["customers"] = _customers(letter.fields[b"customers"])
        _times(out, letter, first_attempt="first_at")
    else:
        out["fields"] = _texts(letter.fields)
    return out


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _times(out: dict[str, Any], letter: Letter, **names: str) -> None:
    for key, name in names.items():
        value = letter.number(name)
        if value is not None and value > 0:
            out[key] = when(value)


def _customers(packed: bytes) -> list[int] | str:
    # outbox.pack_customers: one signed 64-bit key per command.
    if len(packed) % 8:
        return packed.hex()
    return outbox.unpack_customers(packed)


# --- replay and purge --------------------------------------------------------------------------


async def _purge(letters: DeadLetters, ids: list[DeadId], *, every: bool) -> int:
    count = 0
    if every:
        for project in await letters.projects():
            async for page in letters.walk(project):
                count += await letters.purge([letter.id for letter in page])
    else:
        count = await letters.purge(ids)
    print(f"purged {count} dead letters")
    return 0


async def _replay(letters: DeadLetters, ids: list[DeadId], *, every: bool) -> int:
    source: AsyncIterator[Letter | None]
    if every:
        projects = await letters.projects()
        moving = [p for p in projects if await _any_replayable(letters, p)]
        source = _every(letters, projects)
    else:
        chosen = [await letters.get(dead_id) for dead_id in ids]
        moving = sorted({c.id.project for c in chosen if c and c.replayable() is None})
        source = _each(chosen)
    for project in moving:  # all checked before anything moves
        await _check_partitions(letters, project)
    replayed, missing = 0, 0
    kept: dict[str, int] = {}  # why not replayed -> how many
    async for letter in source:
        if letter is None:
            missing += 1
            continue
        why = letter.replayable()
        if why is not None:
            kept[why] = kept.get(why, 0) + 1
        elif await letters.replay(letter) is None:
            missing += 1  # replayed or purged since it was read
        else:
            replayed += 1
    print(f"replaying {replayed} dead letters: the running workers send them within seconds")
    if kept.get("refused"):
        print(REFUSED_NOT_REPLAYED.format(kept["refused"]))
    if kept.get("expired"):
        print(f"{kept['expired']} expired outbox entries were not replayed: each is a request "
              "already encoded for Infinario, not commands to send again; read them with show")
    other = kept.get("malformed", 0) + kept.get("unknown", 0)
    if other:
        print(f"{other} dead letters were not replayed: not a failed command this version can "
              "read; read them with show")
    if missing:
        print(f"{missing} dead letters were not found: replayed or purged already")
    return 0


async def _each(chosen: list[Letter | None]) -> AsyncIterator[Letter | None]:
    for letter in chosen:
        yield letter


async def _every(letters: DeadLetters, projects: list[str]) -> AsyncIterator[Letter | None]:
    for project in projects:
        async for page in letters.walk(project):
            for letter in page:
                yield letter


async def _any_replayable(letters: DeadLetters, project: str) -> bool:
    async for page in letters.walk(project):
        if any(letter.replayable() is None for letter in page):
            return True
    return False


async def _check_partitions(letters: DeadLetters, project: str) -> None:
    """Refuse a ``--partitions`` other than the project's.

    The relay records the count in ``meta:{P}`` at its first start. Data written
    before that has only its input streams to tell: every partition the relay runs
    has one once a worker owned it, so streams up to partition n - 1 mean n
    partitions. A wrong count would put a customer's command in a partition nobody
    reads, or in another customer's order.
    """
    stored = await letters.client.hget(Keys(project, letters.partitions).meta, "partitions")
    if stored is not None:
        if int(stored) != letters.partitions:
            raise ConfigError(
                f"partitions: project {project!r} runs {int(stored)} partitions, not "
                f"{letters.partitions}; pass the relay's --partitions (ROUTER_PARTITIONS, "
                "the config's partitions)")
        return
    found = await letters.input_partitions(project)
    if found and max(found) + 1 != letters.partitions:
        raise ConfigError(
            f"partitions: project {project!r} has input streams up to partition {max(found)}, "
            f"so its relay runs {max(found) + 1} partitions, not {letters.partitions}; pass "
            "the relay's --partitions (ROUTER_PARTITIONS, the config's partitions)")


# --- errors ------------------------------------------------------------------------------------


def _one_line(exc: BaseException, url: str) -> RouterError | None:
    """The one-line error for a failure, however trio nested it; None for a bug.

    Only a failure whose every part is the router's own error or Redis's becomes
    one line: anything else is raised again, traceback and all.
    """
    errors = [_as_router_error(leaf, url) for leaf in _leaves(exc)]
    if not errors or any(error is None for error in errors):
        return None
    return next(e for e in errors if e is not None)


def _as_router_error(exc: BaseException, url: str) -> RouterError | None:
    if isinstance(exc, RouterError):
        return exc
    if isinstance(exc, RedisConnectionError | OSError):  # TimeoutError is an OSError
        reason = str(exc) or type(exc).__name__
        return StartupError(f"redis: cannot reach {redact_url(url)} ({reason}); is Redis "
                            "running there, and is --redis (ROUTER_REDIS, the config's redis) "
                            "right?")
    if isinstance(exc, RedisError):
        return StartupError(f"redis: {exc}")
    return None


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
