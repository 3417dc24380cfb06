"""A project's schema limits decided once, in Redis, for every worker process.

In the embedded mode one process owns a project and ``mapping.Schema`` decides
alone whether a new event type or property key still fits under Infinario's
caps. Here many workers run turns of the same project, so the decisions are
made by ``admit.lua`` and each worker's :class:`SharedSchema` keeps a cache of
them. A turn asks the cache; when the cache cannot answer, the call raises
:class:`NeedsSchema` before anything is recorded, the worker settles the need
with one round trip and re-runs the turn, which then completes.

The cache answers alone in two cases. A name it holds is admitted: Redis's
sets only grow. A set it holds at or over the limit is full, and it then holds
every member (``admit.lua`` sends a full set's membership, and :meth:`warm`
reads whole sets), so any other name is refused. That holds while no process
of the project runs with higher limits (a full set never grows again); the caps
are Infinario's, one per project, so every process should be given the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from coredis.client import Redis, RedisCluster
from coredis.commands.script import Script

from ..mapping import Limits, Schema
from .keys import Keys
from .scripts import source

__all__ = ["NeedsSchema", "RedisClient", "SchemaKeys", "SharedSchema"]

T = TypeVar("T")
# Either client: a project's schema keys share one slot, so a cluster runs admit.lua too.
RedisClient = Redis[Any] | RedisCluster[Any]

_DEFAULT_LIMITS = Limits()
# admit.lua's fixed set numbers; a type's key set is 2 + its position in the call.
_TYPES = 1
_CUSTOMER = 2


class NeedsSchema(Exception):
    """The schema cache cannot decide yet: settle this with :meth:`SharedSchema.settle`.

    ``event_type`` is the event type whose keys (or itself, when ``new_type``)
    are undecided, or None for customer keys; ``keys`` are the undecided keys in
    the order of the props. Deliberately not a ``LimitExceeded``: nothing was
    refused, and the message must be re-run, not dead-lettered.
    """

    def __init__(self, event_type: str | None, new_type: bool, keys: tuple[str, ...]) -> None:
        super().__init__(event_type, new_type, keys)
        self.event_type = event_type
        self.new_type = new_type
        self.keys = keys

    def __str__(self) -> str:
        what = "customer keys" if self.event_type is None else f"event type {self.event_type!r}"
        return f"{what} not decided yet ({len(self.keys)} keys): settle it, then re-run the turn"


@dataclass(frozen=True, slots=True)
class SchemaKeys:
    """The Redis sets of one project's schema, under ``Keys.schema`` (hash tag ``{P}``)."""

    base: str

    @property
    def types(self) -> str:
        return f"{self.base}:types"

    @property
    def customer(self) -> str:
        return f"{self.base}:customer"

    def event(self, event_type: str) -> str:
        # After the tag, so any type name keeps the key on the project's slot.
        return f"{self.base}:t:{event_type}"


@cache
def _admit() -> Script[Any]:
    # Bound to a client at each call; the script object only carries the text and sha.
    return Script(script=source("admit"))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Call:
    """One ``admit.lua`` call being assembled: its KEYS, ARGV and what each pair asks."""

    def __init__(self, names: SchemaKeys, limits: Limits) -> None:
        self.names = names
        self.limits = limits
        self.type_sets: dict[str, int] = {}  # event type -> its set number
        self.pairs: dict[tuple[int, str], None] = {}  # ordered, without repeats

    def set_of(self, event_type: str) -> int:
        number = self.type_sets.get(event_type)
        if number is None:
            number = self.type_sets[event_type] = 3 + len(self.type_sets)
        return number

    def add(self, need: NeedsSchema) -> None:
        if need.event_type is None:
            for key in need.keys:
                self.pairs[_CUSTOMER, key] = None
            return
        if need.new_type:
            self.pairs[_TYPES, need.event_type] = None
        if need.keys:
            number = self.set_of(need.event_type)
            for key in need.keys:
                self.pairs[number, key] = None

    def keys(self) -> list[str]:
        names = self.names
        return [names.types, names.customer, *map(names.event, self.type_sets)]

    def args(self) -> list[str | int]:
        limits = self.limits
        args: list[str | int] = [limits.event_types, limits.event_keys, limits.customer_keys,
                                 len(self.type_sets), *self.type_sets]
        for number, name in self.pairs:
            args += (number, name)
        return args


class SharedSchema(Schema):
    """``mapping.Schema`` whose sets are a cache of ``admit.lua``'s decisions.

    ``admit_event`` and ``admit_customer`` answer exactly as ``Schema`` would
    with Redis's sets, or raise :class:`NeedsSchema` having recorded nothing.
    Counts (dropped keys, refused types) are this process's own, and the sizes
    in :meth:`report` are what this process has seen so far. Redis is the record
    of what Infinario knows, so :meth:`drain_new` stays empty.
    """

    __slots__ = ("_names", "_undo")

    def __init__(self, keys: Keys, limits: Limits = _DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._names = SchemaKeys(keys.schema)
        # While :meth:`complete` runs an attempt: how to take back the counts it
        # made, should it stop on a NeedsSchema and run again.
        self._undo: list[Callable[[], None]] | None = None

    @property
    def names(self) -> SchemaKeys:
        return self._names

    def admit_event(
        self, event_type: str, props: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        known = self._types.get(event_type)
        if known is None:
            if len(self._types) < self._limits.event_types:
                raise NeedsSchema(event_type, True, tuple(props))
        elif props.keys() <= known:
            return props, []  # the common path, as cheap as Schema's
        elif len(known) < self._limits.event_keys:
            raise NeedsSchema(event_type, False, tuple(k for k in props if k not in known))
        # The set is full and whole in the cache: Schema refuses or drops, and counts.
        if self._undo is not None:
            self._undo.append(self._restorer(event_type))
        return super().admit_event(event_type, props)

    def admit_customer(self, props: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        known = self._customer_keys
        if props.keys() <= known:
            return props, []
        if len(known) < self._limits.customer_keys:
            raise NeedsSchema(None, False, tuple(k for k in props if k not in known))
        if self._undo is not None:
            self._undo.append(self._restorer(None))
        return super().admit_customer(props)

    def _restorer(self, event_type: str | None) -> Callable[[], None]:
        """Put back the counts a refusal or a drop on ``event_type`` (None: customer) may change."""
        if event_type is None:
            stats = self._customer_dropped
            count, keys = stats.count, set(stats.keys)

            def restore_customer() -> None:
                stats.count, stats.keys = count, keys

            return restore_customer
        total, refused = self._refused_total, self._refused.get(event_type)
        dropped = self._event_dropped.get(event_type)
        saved = None if dropped is None else (dropped.count, set(dropped.keys))

        def restore_event() -> None:
            self._refused_total = total
            if refused is None:
                self._refused.pop(event_type, None)
            else:
                self._refused[event_type] = refused
            if dropped is None or saved is None:
                self._event_dropped.pop(event_type, None)
            else:
                dropped.count, dropped.keys = saved

        return restore_event

    async def settle(self, client: RedisClient, needs: Iterable[NeedsSchema]) -> None:
        """Decide ``needs`` in Redis (one ``admit.lua`` call) and cache the answers.

        Afterwards the calls that raised them answer from the cache. Safe to
        retry: the script's answers do not change on a second run.
        """
        call = _Call(self._names, self._limits)
        for need in needs:
            call.add(need)
        if not call.pairs:
            return
        reply: Any = await _admit()(call.keys(), call.args(), client=client)
        answers, full = reply
        kinds = {number: event_type for event_type, number in call.type_sets.items()}
        for (number, name), admitted in zip(call.pairs, answers, strict=True):
            if admitted:
                self._learn(number, kinds, name)
        for entry in full:
            number = int(entry[0])
            for member in entry[1:]:
                self._learn(number, kinds, _text(member))

    def _learn(self, number: int, kinds: dict[int, str], name: str) -> None:
        if number == _TYPES:
            self.load("type", name, "")
        elif number == _CUSTOMER:
            self.load("customer_key", "", name)
        else:
            self.load("event_key", kinds[number], name)

    async def warm(self, client: RedisClient) -> None:
        """Fill the cache with everything Redis holds, so a warm worker seldom waits.

        Two round trips whatever the project's size. Each set is read whole, so
        a full one is decided locally from then on. Safe at any time: it only adds.
        """
        names = self._names
        types = sorted(_text(t) for t in await client.smembers(names.types))
        async with client.pipeline(transaction=False) as pipe:
            customer = pipe.smembers(names.customer)
            events = [pipe.smembers(names.event(t)) for t in types]
        for event_type, members in zip(types, events, strict=True):
            self.load("type", event_type, "")
            for key in await members:
                self.load("event_key", event_type, _text(key))
        for key in await customer:
            self.load("customer_key", "", _text(key))

    async def complete(self, client: RedisClient, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` (e.g. one ``customer.turn``) until no :class:`NeedsSchema` stops it.

        Each stop settles its need and runs ``attempt`` again; the counts a
        stopped attempt made are taken back first, so they are counted once.
        ``attempt`` must be repeatable: a turn leaves the customer's state alone
        when it raises, but a ``TurnContext``'s own counters are the caller's to reset.
        """
        last: NeedsSchema | None = None
        while True:
            self._undo = []
            try:
                return attempt()
            except NeedsSchema as need:
                for restore in reversed(self._undo):
                    restore()
                if last is not None and need.args == last.args:
                    # settle always decides what it is given, so this is a bug, not bad luck.
                    raise RuntimeError(f"schema need did not settle: {need}") from need
                last = need
            finally:
                self._undo = None
            await self.settle(client, [last])
