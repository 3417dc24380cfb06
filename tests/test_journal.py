"""The journal's row format and the messageId dedup window."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as hs

from router import journal
from router import store as st
from router.journal import Dedup


class TestRows:
    """A journal row keeps the shared part once and gives back the merged messages."""

    def test_shared_part_is_stored_once_and_merged_on_read(self) -> None:
        shared = msgspec.json.encode({"context": {"ip": "10.0.0.1", "big": "x" * 1000}})
        items = [msgspec.json.encode({"type": "track", "messageId": f"m{i}",
                                      "context": {"locale": "de"}}) for i in range(50)]
        row = journal.encode_row(items, shared)
        assert row.count(b"x" * 1000) == 1
        messages = journal.decode_row(row)
        assert [m["messageId"] for m in messages] == [f"m{i}" for i in range(50)]
        assert messages[0]["context"] == {"ip": "10.0.0.1", "big": "x" * 1000, "locale": "de"}

    def test_without_shared_part(self) -> None:
        row = journal.encode_row([b'{"type":"identify","userId":"u"}'])
        assert journal.decode_row(row) == [{"type": "identify", "userId": "u"}]

    def test_event_times_are_kept_beside_the_items(self) -> None:
        # The items stay the client's bytes; each gets its time back when read.
        items = [b'{"type":"track","event":"a"}', b'{"type":"track","event":"b"}']
        times = [1700000000.123456, 0.1 + 0.2]
        row = journal.encode_row(items, b'{"context":{"ip":"1"}}', times)
        assert b"_time" not in row
        messages = journal.decode_row(row)
        assert [m["_time"] for m in messages] == times  # exact: floats round-trip
        assert messages[1] == {"type": "track", "event": "b", "_time": 0.30000000000000004,
                               "context": {"ip": "1"}}

    def test_a_row_whose_times_do_not_match_its_items_is_unreadable(self) -> None:
        row = journal.encode_row([b'{"type":"track"}'], None, [1.0, 2.0])
        with pytest.raises(ValueError, match="1 items but 2 times"):
            journal.decode_row(row)

    @given(hs.lists(hs.text(max_size=40), max_size=20))
    def test_ids_round_trip_whatever_they_hold(self, ids: list[str]) -> None:
        assert journal.decode_ids(journal.encode_ids(ids)) == ids


class TestMergeShared:
    """The item's own context keys win; the shared values are not copied per item."""

    def test_item_wins_and_values_are_shared(self) -> None:
        nested = {"name": "lib"}
        shared = {"context": {"library": nested, "locale": "en"}}
        first = journal.merge_shared({"context": {"locale": "de"}}, shared)
        second = journal.merge_shared({}, shared)
        assert first["context"] == {"library": nested, "locale": "de"}
        assert second["context"]["library"] is nested
        second["context"]["locale"] = "fr"
        assert shared["context"]["locale"] == "en"


class TestDedup:
    """Exact within the window, per write key, forgotten only after the window."""

    def test_new_ids_pass_once_per_write_key(self) -> None:
        dedup = Dedup(window=60)
        assert dedup.claim("k1", ["a", "b", "a"], 0.0, row=1) == [True, True, False]
        assert dedup.claim("k1", ["b", "c"], 1.0, row=2) == [False, True]
        assert dedup.claim("k2", ["a"], 1.0, row=3) == [True]

    def test_release_lets_a_retry_pass(self) -> None:
        dedup = Dedup(window=60)
        assert dedup.claim("k", ["a"], 0.0, row=1) == [True]
        dedup.release("k", ["a"])
        assert dedup.claim("k", ["a"], 0.0, row=2) == [True]

    def test_remembered_for_the_whole_window_then_forgotten(self) -> None:
        window = 80.0
        dedup = Dedup(window=window)
        for second in range(200):
            dedup.claim("k", [f"id-{second}"], float(second), row=second + 1)
            dedup.expire(float(second))
            # Every id seen within the window is still known...
            for earlier in range(max(0, second - int(window)), second + 1):
                assert dedup.claim("k", [f"id-{earlier}"], float(second), row=0) == [False]
        # ...and memory holds at most a slice more than the window.
        assert len(dedup) <= window + window / 8 + 2
        assert dedup.claim("k", ["id-0"], 200.0, row=0) == [True]

    def test_ids_spread_over_every_shard_and_each_is_found_in_its_own(self) -> None:
        dedup = Dedup(window=60)
        ids = [f"message-{n}" for n in range(5000)]
        assert dedup.claim("k", ids, 0.0, row=1) == [True] * len(ids)
        assert all(dedup._gens[0].shards), "a shard got no id: the low bits are not spread"
        assert dedup.claim("k", ids, 1.0, row=2) == [False] * len(ids)
        dedup.release("k", ids[::2])
        assert dedup.claim("k", ids, 2.0, row=3) == [n % 2 == 0 for n in range(len(ids))]
        restored = Dedup(window=60)
        restored.restore("k", ids, 0.0, row=1)
        assert len(restored) == len(ids)
        assert restored.claim("k", ids, 1.0, row=2) == [False] * len(ids)

    def test_expire_names_the_rows_to_delete(self) -> None:
        dedup = Dedup(window=8.0)  # slices of 1 s
        dedup.claim("k", ["a"], 0.0, row=1)
        dedup.claim("k", ["b"], 1.5, row=2)
        dedup.claim("k", ["c"], 9.7, row=3)
        assert dedup.expire(9.7) == 1  # the slice started at 0 ended at 1.5 <= 9.7 - 8
        assert dedup.claim("k", ["a"], 9.8, row=0) == [True]
        assert dedup.claim("k", ["b"], 9.8, row=0) == [False]


class TestStoredDedup:
    """What ``append`` stores brings the window back after a restart; expiry deletes it."""

    async def test_restore_from_the_table(self, store: st.Store) -> None:
        for row, ids in ((1, ["a", "b"]), (2, ["c"])):
            await store.call(lambda conn, row=row, ids=ids: journal.append(
                conn, seq=row, write_key="k", body=journal.encode_row([b"{}"]), dedup_row=row,
                ids=journal.encode_ids(ids), now=100.0 + row))
        again = Dedup(window=60)
        for row, at, write_key, ids in await store.call(
                lambda conn: journal.load_dedup(conn, since=50.0)):
            again.restore(write_key, journal.decode_ids(ids), at, row)
        assert again.claim("k", ["a", "c", "d"], 103.0, row=3) == [False, False, True]
        await store.call(lambda conn: journal.expire_dedup(conn, upto_row=1))
        left = await store.call(lambda conn: journal.load_dedup(conn, since=0.0))
        assert [row for row, *_ in left] == [2]
