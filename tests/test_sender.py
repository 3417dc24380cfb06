"""The sender: what an answer means per command (the pure plan), and lanes driven through a
fake Infinario and an in-memory spool of outbox rows."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import httpx
import trio
import trio.testing

from router import outbox
from router import store as st
from router.commands import Command
from router.infinario import Legacy, Result, Verdict
from router.metrics import Metrics
from router.sender import Sender, plan
from router.spool import Spool


class TestPlan:
    """Per-command fates from a verdict: done, dead-lettered, retried, with backoff."""

    def test_per_command_results(self) -> None:
        verdict = Verdict(results=(Result("ok"), Result("retry"), Result("error", ("bad",))))
        decided = plan(verdict, [100.0, 100.0, 100.0], now=101.0, retry_window=60)
        assert decided.done == [0]
        assert decided.retry == [1]
        assert decided.dead == [(2, "error", "bad")]
        assert decided.backoff

    def test_retry_past_the_window_is_dead_lettered(self) -> None:
        verdict = Verdict(retry=True, retry_after=3.0, reason="HTTP 503")
        decided = plan(verdict, [0.0, 90.0], now=100.0, retry_window=60)
        assert decided.retry == [1]
        assert [(p, fate) for p, fate, _ in decided.dead] == [(0, "expired")]
        assert decided.delay == 3.0 and decided.outcome == "retry"

    def test_bad_credentials_keep_everything(self) -> None:
        decided = plan(Verdict(auth=True, reason="no"), [0.0, 0.0], now=1e9, retry_window=1)
        assert decided.retry == [0, 1] and not decided.dead and decided.outcome == "auth"

    def test_refused_request_dead_letters_all(self) -> None:
        decided = plan(Verdict(reason="HTTP 400"), [0.0], now=1.0, retry_window=60)
        assert decided.dead == [(0, "rejected", "HTTP 400")] and not decided.backoff

    def test_all_ok(self) -> None:
        decided = plan(Verdict(results=(Result("ok"),) * 3), [0.0] * 3, now=1.0, retry_window=1)
        assert decided.done == [0, 1, 2] and not decided.backoff


class Recorder:
    """A fake Infinario answering by script: each request gets the next status, then ok."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[list[int]] = []
        self.statuses = statuses or []

    def handler(self, request: httpx.Request) -> httpx.Response:
        commands = json.loads(request.content)["commands"]
        self.requests.append([c["data"]["properties"]["n"] for c in commands])
        if self.statuses:
            return httpx.Response(self.statuses.pop(0))
        return httpx.Response(200, json={"results": [{"status": "ok"}] * len(commands)})


def rows(customers: list[int], lanes: int, seqs: st.SeqCounter,
         start: int = 0) -> list[outbox.OutboxRow]:
    """Rows for one command per entry of ``customers``, numbered ``n`` from ``start``."""
    legacy = Legacy()
    commands = [(c, "p", legacy.encode(Command("event", "p", {"registered": f"u{c}"}, {"n": n},
                                                1.0, "e")))
                for n, c in enumerate(customers, start)]
    made = list(outbox.rows_for(commands, lanes, 1_000.0, seqs))
    return [row for _, row in made]


async def commit(store: st.Store, made: list[outbox.OutboxRow]) -> None:
    records = [outbox.Record(r.seq, r.lane, r.project, outbox.pack_customers(r.customers),
                             outbox.encode_body(r.commands), r.first_at) for r in made]
    await store.call(lambda conn: outbox.insert(conn, records))


async def deliver(store: st.Store, send: Sender, made: list[outbox.OutboxRow],
                  until: Callable[[], Awaitable[object]] | None = None) -> None:
    """Commit ``made``, offer it to a running ``send`` and wait until ``until`` returns
    (by default, until every row is retired)."""
    await commit(store, made)
    async with trio.open_nursery() as nursery:
        await nursery.start(send.run)
        for row in made:
            send.offer(row)
        with trio.fail_after(10):
            await (until or send.wait_idle)()
        nursery.cancel_scope.cancel()


def sender(store: st.Store, infinario: Recorder, *, lanes: int, window: int = 500,
           spool: Spool | None = None) -> Sender:
    return Sender(backlog=outbox.SqliteBacklog(store), dialect=Legacy(),
                  base_url="http://infinario.test", lanes=lanes,
                  transport=httpx.MockTransport(infinario.handler), timeout=5,
                  retry_window=3600, rate_limit=None, metrics=Metrics(),
                  spool=spool or Spool(10**9), wall=lambda: 1_000.0, window=window, linger=0)


class TestLanes:
    """Rows offered after their commit reach Infinario in order; a full lane reads the disk."""

    async def test_order_per_customer_and_the_outbox_empties(self, store: st.Store) -> None:
        infinario = Recorder()
        send = sender(store, infinario, lanes=2)
        seqs = st.SeqCounter()
        async with trio.open_nursery() as nursery:
            await nursery.start(send.run)
            for round_ in range(5):
                made = rows([1, 2, 3, 4] * 30, 2, seqs, start=120 * round_)
                await commit(store, made)
                for row in made:
                    send.offer(row)
            with trio.fail_after(10):
                await send.wait_idle()
            nursery.cancel_scope.cancel()
        sent = [n for request in infinario.requests for n in request]
        assert sorted(sent) == list(range(600))
        # Each customer's commands arrive in the order they were produced.
        for customer in range(4):
            mine = [n for n in sent if n % 4 == customer]
            assert mine == sorted(mine)
        assert await store.call(lambda c: c.execute("SELECT COUNT(*) FROM outbox").fetchone())\
            == (0,)

    async def test_backlog_on_disk_is_read_back_in_order(self, store: st.Store) -> None:
        infinario = Recorder(statuses=[503] * 3)
        send = sender(store, infinario, lanes=1, window=10)
        seqs = st.SeqCounter()
        made = rows(list(range(400)), 1, seqs)
        async with trio.open_nursery() as nursery:
            await nursery.start(send.run)
            await commit(store, made)
            for row in made:
                send.offer(row)
            # The lane holds its window and a few rows; the rest waits on disk.
            assert send.pending <= 10 + 5 * 50
            with trio.fail_after(20):
                await send.wait_idle()
            nursery.cancel_scope.cancel()
        ok = [request for request in infinario.requests[3:]]
        assert [n for request in ok for n in request] == list(range(400))


    async def test_commands_answered_retry_go_again_alone_and_every_row_retires(
            self, store: st.Store) -> None:
        # Rows of 50 commands for one customer; each request spans rows. Every third
        # command of the first request is answered retry: its rows stay partly final.
        requests: list[list[int]] = []

        def answer(request: httpx.Request) -> httpx.Response:
            commands = json.loads(request.content)["commands"]
            numbers = [c["data"]["properties"]["n"] for c in commands]
            first = not requests
            requests.append(numbers)
            results = [{"status": "retry" if first and i % 3 == 0 else "ok"}
                       for i in range(len(numbers))]
            return httpx.Response(200, json={"results": results})

        send = sender(store, Recorder(), lanes=1)
        send.transport = httpx.MockTransport(answer)
        await deliver(store, send, rows([1] * 120, 1, st.SeqCounter()))
        retried = requests[0][::3]
        assert sorted(n for request in requests[1:] for n in request) == sorted(
            set(range(120)) - set(requests[0]) | set(retried))
        assert await store.call(lambda c: c.execute("SELECT COUNT(*) FROM outbox").fetchone())\
            == (0,)


class TestIdle:
    """Every waiter on ``wait_idle`` wakes once the lanes are done, not only the last one."""

    async def test_two_waiters(self, store: st.Store) -> None:
        infinario = Recorder()
        send = sender(store, infinario, lanes=1)
        woke: list[str] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(send.run)
            made = rows([1] * 10, 1, st.SeqCounter())
            await commit(store, made)
            for row in made:
                send.offer(row)

            async def wait(name: str) -> None:
                await send.wait_idle()
                woke.append(name)

            with trio.fail_after(10):
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(wait, "first")
                    waiters.start_soon(wait, "second")
            nursery.cancel_scope.cancel()
        assert sorted(woke) == ["first", "second"]


class TestClose:
    """``close`` ends ``run`` once every answer is recorded, however the last answer and the
    close interleave (a relay told to stop right after a burst drains, not waits out its grace)."""

    async def test_close_during_the_last_request(self, store: st.Store) -> None:
        infinario = Recorder()
        send = sender(store, infinario, lanes=1)

        def answer_then_close(request: httpx.Request) -> httpx.Response:
            # The lane ends as soon as this answer is handled, before the retirer has run.
            send.close()
            return infinario.handler(request)

        send.transport = httpx.MockTransport(answer_then_close)
        await deliver(store, send, rows([1] * 3, 1, st.SeqCounter()), until=send.finished.wait)
        assert infinario.requests == [[0, 1, 2]]
        assert await store.call(lambda c: c.execute("SELECT COUNT(*) FROM outbox").fetchone())\
            == (0,)
