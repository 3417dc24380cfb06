"""Outbox rows: dealt by lane and project, read back, re-dealt, replayed; and an upgrade from
schema version 1 keeps every pending command and message."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import msgspec

from router import Config, open_router, outbox
from router import store as st
from router.commands import Command, encode_command
from router.infinario import V2, Legacy
from router.migrate import migrate_v1

from .conftest import FakeInfinario


def command(n: int, project: str = "p", kind: str = "event") -> Command:
    return Command(kind, project, {"registered": f"u{n}"}, {"n": n}, 1_700_000_000.0 + n,
                   "e" if kind == "event" else None)


def wires(commands: list[tuple[int, Command]]) -> list[tuple[int, str, bytes]]:
    legacy = Legacy()
    return [(customer, c.project, legacy.encode(c)) for customer, c in commands]


class TestRows:
    """Rows hold one lane's commands of one project, in order, 50 at most."""

    def test_dealt_by_lane_and_project_in_order(self) -> None:
        commands = [(customer, command(i, "p" if i % 3 else "q"))
                    for i, customer in enumerate([1, 2, 3, 5, 7, 1, 3] * 20)]
        made = list(outbox.rows_for(wires(commands), 2, 5.0, st.SeqCounter(10)))
        assert [r.seq for r, _ in made] == list(range(10, 10 + len(made)))
        for record, row in made:
            assert len(row.commands) <= 50
            assert all(customer % 2 == row.lane for customer in row.customers)
            assert record.body == outbox.encode_body(row.commands)
            assert outbox.unpack_customers(record.customers) == row.customers
        # Each (lane, project) keeps the given order.
        for lane in (0, 1):
            for project in ("p", "q"):
                got = [json.loads(w)["data"]["properties"]["n"] for _, row in made
                       if (row.lane, row.project) == (lane, project) for w in row.commands]
                assert got == sorted(got)
                assert len(got) == sum(1 for i, (c, cmd) in enumerate(commands)
                                       if c % 2 == lane and cmd.project == project)

    def test_read_back_with_progress(self) -> None:
        [(record, row)] = outbox.rows_for(wires([(4, command(1)), (4, command(2))]), 2, 1.0,
                                          st.SeqCounter())
        again = outbox.row_from_db(record.seq, record.lane, record.project, record.customers,
                                   record.body, b"\x01\x00", record.first_at)
        assert again.commands == row.commands
        assert (again.remaining, list(again.final)) == (1, [1, 0])


def open_db(path: Path) -> sqlite3.Connection:
    return st.open_database(path / st.DB_NAME)


class TestRewrite:
    """At start a changed lane count re-deals the backlog, a changed dialect re-encodes it."""

    def test_new_lane_count_and_dialect(self, tmp_path: Path) -> None:
        conn = open_db(tmp_path)
        outbox.rewrite(conn, lanes=2, dialect=Legacy(), now=1.0)  # first start: nothing to do
        commands = [(customer, command(i)) for i, customer in enumerate([1, 2, 3, 4, 5, 6])]
        records = [r for r, _ in outbox.rows_for(wires(commands), 2, 1.0, st.SeqCounter())]
        outbox.insert(conn, records)
        # One command already answered: it must not come back.
        conn.execute("UPDATE outbox SET done = ? WHERE seq = ?",
                     (b"\x01" + b"\x00" * 2, records[0].seq))
        outbox.rewrite(conn, lanes=3, dialect=V2({}), now=9.0)
        rows = [row for lane in range(3)
                for row in outbox.load_lane(conn, lane=lane, after=0, limit=100)]
        v2 = V2({})
        by_customer = {c: v2.decode(w, row.project) for row in rows
                       for c, w in zip(row.customers, row.commands, strict=True)}
        assert sorted(by_customer) == [2, 3, 4, 5, 6]
        assert all(c % 3 == row.lane for row in rows for c in row.customers)
        assert by_customer[4] == command(3)
        assert st.meta_get(conn, "lanes") == "3" and st.meta_get(conn, "dialect") == "v2"


class TestReplay:
    """Dead letters marked for replay become outbox rows, all or nothing."""

    def test_replay_and_a_purged_letter(self, tmp_path: Path) -> None:
        conn = open_db(tmp_path)
        for customer in (3, 4):
            conn.execute(
                "INSERT INTO dead_letters(created_at, project, customer, command, status, errors,"
                " attempts, first_at, last_at, replay) VALUES(0, 'p', ?, ?, 'error', '[]', 1, 0,"
                " 0, 1)", (customer, encode_command(command(customer))))
        letters = outbox.marked(conn)
        made = outbox.replay_rows(letters, lanes=2, dialect=Legacy(), now=5.0,
                                  seqs=st.SeqCounter(1))
        conn.execute("DELETE FROM dead_letters WHERE customer = 4")  # purged meanwhile
        assert not outbox.replay(conn, ids=[i for i, *_ in letters],
                                 records=[r for r, _ in made])
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
        letters = outbox.marked(conn)
        made = outbox.replay_rows(letters, lanes=2, dialect=Legacy(), now=5.0,
                                  seqs=st.SeqCounter(1))
        assert outbox.replay(conn, ids=[i for i, *_ in letters], records=[r for r, _ in made])
        [row] = outbox.load_lane(conn, lane=1, after=0, limit=10)
        assert Legacy().decode(row.commands[0], "p") == command(3)
        assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0] == 0


V1_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE journal(seq INTEGER PRIMARY KEY, write_key TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE dedup(write_key TEXT NOT NULL, message_id TEXT NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY(write_key, message_id)) WITHOUT ROWID;
CREATE INDEX dedup_seen ON dedup(seen_at);
CREATE TABLE outbox(seq INTEGER PRIMARY KEY, lane INTEGER NOT NULL, customer INTEGER NOT NULL,
    body BLOB NOT NULL, origin BLOB, first_at REAL NOT NULL);
CREATE INDEX outbox_lane ON outbox(lane, seq);
"""


class TestUpgradeFromVersion1:
    """A version 1 data dir keeps its journal, dedup window and pending commands."""

    async def test_everything_pending_is_delivered_and_dedup_holds(self, tmp_path: Path) -> None:
        data = tmp_path / "data"
        data.mkdir()
        conn = sqlite3.connect(data / st.DB_NAME, isolation_level=None)
        conn.executescript(V1_SCHEMA)
        message = {"type": "track", "userId": "journaled", "event": "From Journal",
                   "messageId": "m-journal", "_time": 1_700_000_000.0}
        conn.execute("INSERT INTO journal VALUES(1, 'wk', ?)", (msgspec.json.encode(message),))
        conn.execute("INSERT INTO dedup VALUES('wk', 'm-journal', strftime('%s','now'))")
        conn.execute("INSERT INTO dedup VALUES('wk', 'm-old', strftime('%s','now'))")
        pending = Command("event", "proj", {"registered": "waiting"}, {"a": 1},
                          1_700_000_000.0, "From Outbox")
        conn.execute("INSERT INTO outbox VALUES(7, 1, 9, ?, NULL, strftime('%s','now'))",
                     (encode_command(pending),))
        conn.execute("INSERT INTO meta VALUES('lanes', '8')")
        conn.close()

        infinario = FakeInfinario()
        config = Config(write_keys={"wk": "proj"}, data_dir=data, linger=0.0,
                        infinario_url="http://infinario.test")
        async with open_router(config, transport=httpx.MockTransport(infinario.handler)) as r:
            again = await r.submit({"type": "track", "userId": "x", "event": "Again",
                                    "messageId": "m-old"}, write_key="wk")
            assert (again.accepted, again.duplicates) == (0, 1)
            await r.drain()
            types = sorted(c["data"]["type"] for c in infinario.commands)
            assert types == ["From Journal", "From Outbox"]
            tables = await r.store.call(lambda c: [row[0] for row in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")])
            assert "outbox_v1" not in tables and "dedup_v1" not in tables

    def test_nothing_to_do_for_a_new_database(self, tmp_path: Path) -> None:
        conn = open_db(tmp_path)
        migrate_v1(conn, 8, Legacy())
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
