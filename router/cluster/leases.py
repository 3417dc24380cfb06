"""Fenced partition leases with a fair share: which of a project's partitions this worker owns.

Every worker keeps a heartbeat in ``workers:{P}`` and holds at most its fair share,
ceil(partitions / live workers), of the partitions. A partition is held by a lease:
``lease:{P}:<p>`` holds a fencing token drawn from ``fence:{P}`` and expires after
``ttl`` unless renewed (``lease.lua``). Every commit checks the token (``commit.lua``),
so a worker that lost a lease can no longer write in its name.

Timing: renewals go out every ``renew_every`` (ttl/3). Redis sets a renewed expiry no
earlier than the renewal was sent, so this worker trusts a lease only until ``trust``
(2/3 of the ttl) after the send time of its last successful renewal: it stops believing
it owns a partition at least ttl/3 before any other worker can take it, even if Redis
or the network stalls. A dead holder's lease stays taken until its TTL ends; a released
one is free at once.

Giving a partition up (over the fair share, or leaving) cancels first and releases
after: the lease's ``wait_lost()`` returns, the partition task stops and calls
``stopped()``, and only then is the key deleted. A lease whose task never stops is
left to expire instead.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Literal

import coredis
import structlog
import trio
from coredis.exceptions import RedisError
from coredis.typing import ResponseType

from .keys import Keys
from .scripts import source

log = structlog.get_logger("router.cluster.leases")

DEFAULT_TTL = 2.0  # seconds; a dead worker's partitions wait this long for a new owner

# Why a lease ended: ``expired`` no renewal succeeded within ``trust``; ``taken`` a
# renewal found another token in the key; ``rebalance`` given up to keep the fair share;
# ``stopped`` the worker left or its ``run`` ended.
Why = Literal["expired", "taken", "rebalance", "stopped"]


class Lease:
    """One partition held under a fencing token until it is lost; commits carry ``token``."""

    def __init__(self, partition: int, token: int, trusted_until: float,
                 wake: Callable[[], None]) -> None:
        self.partition = partition
        self.token = token
        self.why: Why | None = None
        self._trusted_until = trusted_until
        self._lost = trio.Event()
        self._stopped = False
        self._wake = wake

    def __repr__(self) -> str:
        return f"Lease(partition={self.partition}, token={self.token}, why={self.why})"

    def valid(self) -> bool:
        """Held, and renewed recently enough that no other worker can hold it yet."""
        return self.why is None and trio.current_time() < self._trusted_until

    async def wait_lost(self) -> None:
        """Return once the lease is lost or being given up: the partition task must stop."""
        await self._lost.wait()

    def stopped(self) -> None:
        """The partition task is done with the lease: it is released at once.

        A task that ends on its own (not asked to) gives its partition back too; this
        worker or another takes it again with a new token.
        """
        if not self._stopped:
            self._stopped = True
            self._wake()

    def _lose(self, why: Why) -> None:
        if self.why is None:
            self.why = why
            self._lost.set()
            log.info("lease_lost", partition=self.partition, token=self.token, why=why)


class Leases:
    """This worker's leases on one project's partitions, kept fresh by ``run``.

    New leases arrive on ``gained`` (each once); a lease signals its own loss
    (``Lease.wait_lost``). ``token(p)`` is the token to commit partition ``p`` with.
    """

    def __init__(self, client: coredis.Redis[bytes], keys: Keys, *, worker: str | None = None,
                 ttl: float = DEFAULT_TTL, renew_every: float | None = None,
                 trust: float | None = None) -> None:
        self.keys = keys
        self.ttl = ttl
        self.renew_every = ttl / 3 if renew_every is None else renew_every
        self.trust = ttl * 2 / 3 if trust is None else trust
        if not 0 < self.renew_every < self.trust < ttl:
            raise ValueError(f"lease timing needs 0 < renew_every < trust < ttl; got "
                             f"{self.renew_every}, {self.trust}, {ttl}")
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.live = 0  # live workers at the last heartbeat
        self.share = 0  # this worker's fair share at the last heartbeat
        self._ttl_ms = max(1, round(ttl * 1000))
        self._script = client.register_script(source("lease"))
        self._held: dict[int, Lease] = {}
        self._giving: dict[int, float] = {}  # partition -> when to stop waiting for its task
        self._send, self.gained = trio.open_memory_channel[Lease](math.inf)
        self._wake = trio.Event()
        self._leaving = False
        self._running = False
        self._ended = trio.Event()
        # Each worker searches for free partitions from its own starting point, so workers
        # that start together do not all contend for partition 0.
        self._offset = zlib.crc32(self.worker.encode()) % keys.partitions

    def held(self) -> dict[int, Lease]:
        """The leases this worker may use now, by partition."""
        return {p: lease for p, lease in self._held.items() if lease.valid()}

    def token(self, partition: int) -> int | None:
        """The fencing token of ``partition`` if this worker may use it now."""
        lease = self._held.get(partition)
        return lease.token if lease is not None and lease.valid() else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat, renew, rebalance; started once the first heartbeat and acquisitions are done.

        Cancelling it is a crash as far as Redis knows: nothing is released and the
        leases expire after the TTL (locally they are lost at once).
        """
        if self._running:
            raise RuntimeError("Leases.run() was started before; make a new Leases to run again")
        self._running = True
        try:
            # Unguarded: a Redis that refuses us at start is a configuration error.
            next_tick = trio.current_time() + self.renew_every
            await self._tick()
            task_status.started()
            while True:
                with trio.move_on_at(min(next_tick, self._next_deadline())):
                    await self._wake.wait()
                self._wake = trio.Event()
                self._expire()
                if self._leaving or trio.current_time() >= next_tick:
                    next_tick = trio.current_time() + self.renew_every
                    await self._guarded(self._tick)
                else:
                    await self._guarded(self._release_stopped)
                if self._leaving and not self._held:
                    await self._guarded(self._leave)
                    return
        finally:
            for lease in list(self._held.values()):
                self._drop(lease, "stopped")
            self._send.close()
            self._ended.set()

    async def leave(self) -> None:
        """Give every partition up (cancel first, release after), drop the heartbeat, end run()."""
        if not self._running:
            return
        self._leaving = True
        self._poke()
        await self._ended.wait()

    # --- one pass ---------------------------------------------------------------------------

    async def _tick(self) -> None:
        sent = trio.current_time()
        # A renewal that has not answered by the earliest deadline is as good as failed.
        with trio.move_on_at(min(sent + self.ttl, self._next_deadline())):
            await self._keep(sent)
            await self._rebalance()
        self._expire()

    async def _keep(self, sent: float) -> None:
        leases = list(self._held.values())
        reply: ResponseType = await self._script(
            [self.keys.workers, *(self.keys.lease(lease.partition) for lease in leases)],
            ["keep", self.worker, self._ttl_ms, *(lease.token for lease in leases)])
        values = _ints(reply, "keep")
        self.live = max(1, values[0])
        for lease, kept in zip(leases, values[1:], strict=True):
            if self._held.get(lease.partition) is not lease:
                continue  # dropped while the renewal was in flight: it stays dropped
            if kept:
                lease._trusted_until = sent + self.trust
            else:
                self._drop(lease, "taken")

    async def _rebalance(self) -> None:
        self.share = math.ceil(self.keys.partitions / self.live)
        keep = 0 if self._leaving else self.share
        active = sorted(p for p, lease in self._held.items() if lease.why is None)
        for partition in active[keep:]:
            self._held[partition]._lose("stopped" if self._leaving else "rebalance")
            self._giving[partition] = trio.current_time() + self.ttl
        await self._release_stopped()
        if keep > len(active):
            await self._acquire(keep - len(active))

    async def _release_stopped(self) -> None:
        leases = [lease for lease in self._held.values() if lease._stopped]
        if not leases:
            return
        for lease in leases:
            lease._lose("stopped")  # no-op for a lease already being given up
        reply: ResponseType = await self._script(
            [self.keys.lease(lease.partition) for lease in leases],
            ["release", *(lease.token for lease in leases)])
        _ints(reply, "release")
        for lease in leases:
            self._forget(lease.partition)  # released, or no longer ours: either way not held

    async def _acquire(self, want: int) -> None:
        n = self.keys.partitions
        free = [p for p in ((self._offset + i) % n for i in range(n)) if p not in self._held]
        if not free:
            return
        sent = trio.current_time()
        # Not idempotent: if the reply is lost (and the client retries), the leases taken
        # by the first run are held by no one until their TTL ends. Nothing else is harmed.
        reply: ResponseType = await self._script(
            [self.keys.fence, *(self.keys.lease(p) for p in free)],
            ["acquire", self._ttl_ms, want])
        values = _ints(reply, "acquire")
        for position, token in zip(values[::2], values[1::2], strict=True):
            lease = Lease(free[position - 1], token, sent + self.trust, self._poke)
            self._held[lease.partition] = lease
            log.info("lease_gained", partition=lease.partition, token=token, worker=self.worker)
            self._send.send_nowait(lease)

    async def _leave(self) -> None:
        await self._script([self.keys.workers], ["leave", self.worker])

    # --- bookkeeping ----------------------------------------------------------------------

    def _expire(self) -> None:
        now = trio.current_time()
        for partition, lease in list(self._held.items()):
            if now >= lease._trusted_until:
                self._drop(lease, "expired")
            elif partition in self._giving and now >= self._giving[partition]:
                self._forget(partition)  # its task never stopped: let the lease expire in Redis

    def _next_deadline(self) -> float:
        deadlines = [lease._trusted_until for lease in self._held.values()]
        return min([*deadlines, *self._giving.values()], default=math.inf)

    def _drop(self, lease: Lease, why: Why) -> None:
        lease._lose(why)
        self._forget(lease.partition)

    def _forget(self, partition: int) -> None:
        self._held.pop(partition, None)
        self._giving.pop(partition, None)

    def _poke(self) -> None:
        self._wake.set()

    async def _guarded(self, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except (RedisError, OSError) as error:  # OSError covers TimeoutError
            log.warning("lease_step_failed", worker=self.worker, error=str(error))


def _ints(reply: ResponseType, operation: str) -> list[int]:
    if not isinstance(reply, list) or not all(isinstance(v, int) for v in reply):
        raise RedisError(f"lease.lua {operation} answered {reply!r}; is router/cluster current?")
    return [int(v) for v in reply]  # type: ignore[arg-type]
