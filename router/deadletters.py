"""``infinario-router dead-letters``: inspect, replay and purge dead letters.

Works on the store ``serve`` with the same settings would use: Redis when a Redis
setting is given (``--redis``, ``ROUTER_REDIS`` or ``redis`` in the config file;
``cluster/deadletters.py``), else the data dir, directly. There, replay while the
relay runs only marks the rows; the running relay moves them back into its outbox
within a few seconds. With the relay stopped, the rows move at once and go out at
its next start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import config as cfg
from . import outbox
from . import store as st
from .commands import decode_command
from .errors import ConfigError, StartupError
from .infinario import V2, Dialect, Legacy

REFUSED_NOT_REPLAYED = ("{} refused messages were not replayed: the relay's rules refused them; "
                        "resend them after changing the configuration")


def when(value: float) -> str:
    return dt.datetime.fromtimestamp(value, dt.UTC).isoformat(timespec="seconds")


def header(id_column: str = ">6") -> str:
    """The ``list`` header; ``id_column`` aligns the ids (numbers right, text left)."""
    return f"{'id':{id_column}}  {'when':25}  {'project':16}  {'status':9}  {'tries':>5}  reason"


def line(dead_id: object, created: float, project: str, status: str, tries: object,
         reason: str, id_column: str = ">6") -> str:
    """One ``list`` line; ``reason`` as it is to be shown, already shortened."""
    return (f"{dead_id!s:{id_column}}  {when(created):25}  {project[:16]:16}  {status:9}  "
            f"{tries!s:>5}  {reason}")


def command_json(data: bytes) -> dict[str, Any]:
    """A neutral command (``commands.encode_command``) as ``show`` prints it."""
    c = decode_command(data)
    return {"kind": c.kind, "project": c.project, "ids": c.ids, "event_type": c.event_type,
            "properties": c.properties, "timestamp": c.timestamp}


def message_json(origin: bytes) -> Any:
    """A refused message as ``show`` prints it: its JSON, or its text when it is not JSON."""
    try:
        return json.loads(origin)
    except ValueError:
        return origin.decode("utf-8", errors="replace")


def redis_settings(args: argparse.Namespace,
                   env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """The Redis URL and partition count, when a Redis setting is given; else None.

    Flag, environment, config file, as for ``serve``; only ``redis`` and ``partitions``
    are read, so an unrelated setting (a write-key file of another host) cannot fail
    this tool.
    """
    env = os.environ if env is None else env
    path = cfg.config_path(getattr(args, "config", None), env)
    toml = cfg.read_toml(path) if path else {}

    def load(*wanted: str) -> cfg.Config:
        return cfg.load(
            toml={key: value for key, value in toml.items() if key in wanted},
            env={f"ROUTER_{n.upper()}": env[f"ROUTER_{n.upper()}"] for n in wanted
                 if f"ROUTER_{n.upper()}" in env},
            flags={name: getattr(args, name, None) for name in wanted})

    # The partition count only matters with Redis: without it, not even a bad one fails.
    if load("redis").redis is None:
        return None
    config = load("redis", "partitions")
    assert config.redis is not None
    if getattr(args, "data_dir", None) is not None:
        # Both would be a guess at which store was meant; a relay with Redis has no
        # dead letters in its data dir.
        raise ConfigError("data-dir: dead letters are in Redis when --redis (ROUTER_REDIS, "
                          "the config's redis) is set; drop --data-dir or the Redis setting")
    return config.redis, config.partitions


def _data_dir_ids(args: argparse.Namespace) -> None:
    """The data dir numbers its dead letters: refuse a Redis-style id in one line."""
    given = [args.id] if args.action == "show" else list(getattr(args, "ids", []))
    for dead_id in given:
        if not isinstance(dead_id, int):
            raise ConfigError(f"dead letter id {dead_id!r}: the data dir's dead letters have "
                              "numeric ids (see list); PROJECT/STREAM-ID ids need --redis")


def run(args: argparse.Namespace, resolve_data_dir: Callable[[argparse.Namespace], Path]) -> int:
    """``resolve_data_dir`` applies the usual precedence: flag, environment, config file."""
    redis = redis_settings(args)
    if redis is not None:
        from .cluster.deadletters import run as run_redis

        url, partitions = redis
        return run_redis(args, url, partitions)
    _data_dir_ids(args)
    data_dir = resolve_data_dir(args)
    path = data_dir / st.DB_NAME
    if not path.exists():
        raise StartupError(f"no relay database at {str(path)!r}; pass the relay's --data-dir")
    conn = st.open_database(path)
    try:
        if args.action == "list":
            return _list(conn, args.limit)
        if args.action == "show":
            return _show(conn, args.id)
        if not args.ids and not args.all:
            print("infinario-router: name dead letter ids or pass --all", file=sys.stderr)
            return 2
        where, params = ("1=1", []) if args.all else (
            f"id IN ({','.join('?' * len(args.ids))})", list(args.ids))
        if args.action == "purge":
            count = conn.execute(f"DELETE FROM dead_letters WHERE {where}", params).rowcount
            print(f"purged {count} dead letters")
            return 0
        return _replay(conn, data_dir, where, params)
    finally:
        conn.close()


def _list(conn: sqlite3.Connection, limit: int) -> int:
    rows = conn.execute(
        "SELECT id, created_at, project, status, errors, attempts, replay "
        "FROM dead_letters ORDER BY id LIMIT ?", (limit,)).fetchall()
    total = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    if not rows:
        print("no dead letters")
        return 0
    print(header())
    for dead_id, created, project, status, errors, attempts, replay in rows:
        reason = "; ".join(json.loads(errors))[:80]
        mark = " (replay queued)" if replay else ""
        print(line(dead_id, created, project, status, attempts, reason + mark))
    if total > len(rows):
        print(f"... {total - len(rows)} more (use --limit)")
    return 0


def _show(conn: sqlite3.Connection, dead_id: int) -> int:
    row = conn.execute(
        "SELECT id, created_at, project, customer, command, origin, status, errors, attempts, "
        "first_at, last_at, replay FROM dead_letters WHERE id = ?", (dead_id,)).fetchone()
    if row is None:
        print(f"infinario-router: no dead letter {dead_id}", file=sys.stderr)
        return 1
    (dead_id, created, project, customer, command, origin, status, errors, attempts,
     first_at, last_at, replay) = row
    out: dict[str, Any] = {
        "id": dead_id, "created_at": when(created), "project": project, "customer": customer,
        "status": status, "errors": json.loads(errors), "attempts": attempts,
        "first_attempt": when(first_at), "last_attempt": when(last_at),
        "replay_queued": bool(replay),
    }
    if command is not None:
        out["command"] = command_json(command)
    if origin is not None:
        out["message"] = message_json(origin)
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _replay(conn: sqlite3.Connection, data_dir: Any, where: str, params: list[Any]) -> int:
    refused = conn.execute(
        f"SELECT COUNT(*) FROM dead_letters WHERE {where} AND command IS NULL", params
    ).fetchone()[0]
    lock = st.DataDir(data_dir)
    running = not lock.try_lock()
    try:
        conn.execute("BEGIN IMMEDIATE")
        count = conn.execute(
            f"UPDATE dead_letters SET replay = 1 WHERE {where} AND command IS NOT NULL", params
        ).rowcount
        if not running:
            lanes = int(st.meta_get(conn, "lanes", "8") or 8)
            dialect: Dialect = V2({}) if st.meta_get(conn, "dialect") == "v2" else Legacy()
            letters = outbox.marked(conn)
            made = outbox.replay_rows(letters, lanes=lanes, dialect=dialect, now=time.time(),
                                      seqs=st.SeqCounter(st.max_seq(conn, "outbox") + 1))
            outbox.replay(conn, ids=[letter[0] for letter in letters],
                          records=[record for record, _ in made])
        conn.execute("COMMIT")
    finally:
        lock.unlock()
    where_to = ("the running relay picks them up within seconds" if running
                else "they go out when the relay next starts")
    print(f"replaying {count} dead letters: {where_to}")
    if refused:
        print(REFUSED_NOT_REPLAYED.format(refused))
    return 0
