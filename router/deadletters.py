"""``infinario-router dead-letters``: inspect, replay and purge dead letters.

Works on the data dir directly. Replay while the relay runs only marks the rows;
the running relay moves them back into its outbox within a few seconds. With the
relay stopped, the rows move at once and go out at its next start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import outbox
from . import store as st
from .commands import decode_command
from .errors import StartupError
from .infinario import V2, Dialect, Legacy


def _when(value: float) -> str:
    return dt.datetime.fromtimestamp(value, dt.UTC).isoformat(timespec="seconds")


def run(args: argparse.Namespace, resolve_data_dir: Callable[[argparse.Namespace], Path]) -> int:
    """``resolve_data_dir`` applies the usual precedence: flag, environment, config file."""
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
    print(f"{'id':>6}  {'when':25}  {'project':16}  {'status':9}  {'tries':>5}  reason")
    for dead_id, created, project, status, errors, attempts, replay in rows:
        reason = "; ".join(json.loads(errors))[:80]
        mark = " (replay queued)" if replay else ""
        print(f"{dead_id:>6}  {_when(created):25}  {project[:16]:16}  {status:9}  "
              f"{attempts:>5}  {reason}{mark}")
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
        "id": dead_id, "created_at": _when(created), "project": project, "customer": customer,
        "status": status, "errors": json.loads(errors), "attempts": attempts,
        "first_attempt": _when(first_at), "last_attempt": _when(last_at),
        "replay_queued": bool(replay),
    }
    if command is not None:
        c = decode_command(command)
        out["command"] = {"kind": c.kind, "project": c.project, "ids": c.ids,
                          "event_type": c.event_type, "properties": c.properties,
                          "timestamp": c.timestamp}
    if origin is not None:
        try:
            out["message"] = json.loads(origin)
        except ValueError:
            out["message"] = origin.decode("utf-8", errors="replace")
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
        print(f"{refused} refused messages were not replayed: the relay's rules refused them; "
              "resend them after changing the configuration")
    return 0
