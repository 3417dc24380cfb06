"""The store's writer: group transactions, submission order, one failing op fails alone."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest

from router import store as st


def put(key: str, value: str) -> Callable[[sqlite3.Connection], None]:
    return lambda conn: st.meta_set(conn, key, value)


def fail_after_writing(conn: sqlite3.Connection) -> None:
    st.meta_set(conn, "half", "written")
    raise ValueError("op failed")


async def meta(store: st.Store) -> dict[str, str]:
    rows = await store.call(lambda conn: conn.execute("SELECT key, value FROM meta").fetchall())
    return dict(rows)


async def test_a_failing_op_fails_alone_and_leaves_nothing_behind(store: st.Store) -> None:
    # Submitted together, so they share one group transaction.
    first = store.submit(put("a", "1"))
    failing = store.submit(fail_after_writing)
    last = store.submit(put("b", "2"))
    await first.result()
    with pytest.raises(ValueError, match="op failed"):
        await failing.result()
    await last.result()
    assert await meta(store) == {"a": "1", "b": "2"}


async def test_ops_run_in_submission_order(store: st.Store) -> None:
    store.submit(put("k", "old"))
    store.submit(put("k", "new"))
    seen = store.submit(lambda conn: st.meta_get(conn, "k"))
    assert await seen.result() == "new"


async def test_many_rows_per_statement_keep_every_row(store: st.Store) -> None:
    rows = [(f"key-{i}", str(i)) for i in range(st.MAX_PARAMS)]  # several statements' worth
    await store.call(lambda conn: st.insert_many(conn, "INSERT INTO meta(key, value)", rows))
    assert await meta(store) == dict(rows)


async def test_statement_journals_stay_in_memory(store: st.Store) -> None:
    # A round's outbox row lands on pages its retired journal rows just freed; the old
    # contents go to a statement journal, which on disk is a temporary file per round.
    assert await store.call(lambda conn: conn.execute("PRAGMA temp_store").fetchone()) == (2,)


async def test_a_deleted_row_is_not_written_again_to_zero_it(store: st.Store) -> None:
    # FAST (2): SQLite builds that zero deleted rows by default wrote every retired
    # journal and outbox row twice.
    assert await store.call(lambda conn: conn.execute("PRAGMA secure_delete").fetchone()) == (2,)
