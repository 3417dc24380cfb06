"""The dead letters kept in Redis: one stream per project, ``dl:{project}``.

An entry has one of three formats (every value is bytes):

- refused: a message the relay's rules refused. ``code``, ``reason``, ``b`` (the
  message JSON), and ``w`` (write key), ``k`` (customer key), ``at`` (POSIX seconds)
  when the writer knew them. Never replayed: the same rules would refuse it again.
- failed: a command Infinario refused or did not take within the retry window.
  ``kind`` = ``failed``, ``project``, ``k``, ``command`` (``commands.encode_command``),
  ``status``, ``errors`` (JSON list), ``attempts``, ``first_at``, ``last_at``, ``at``.
- expired: an outbox entry ``finish.lua`` moved whole: ``lane``, ``body``, ``count``,
  ``reason``, ``partition``, ``entry`` and maybe ``customers``, ``first_at``. Its body
  is already in a dialect's wire form, so it is kept for reading, not replayed.

A dead letter's id is ``<project>/<stream id>`` (``DeadId``): the project names the
stream and the stream id the entry, and a stream id never holds a ``/``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import coredis
from coredis.exceptions import RedisError
from coredis.response.types import StreamEntry
from coredis.typing import ResponseType

from ..commands import decode_command
from .keys import Keys
from .scripts import source

Kind = Literal["refused", "failed", "expired", "unknown"]

PREFIX = b"dl:{"
PAGE = 500  # entries per XRANGE when walking a whole stream
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
_GLOB = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True, slots=True)
class DeadId:
    """Which dead letter: the project whose ``dl:{project}`` holds it, and its stream id."""

    project: str
    stream_id: str

    def __str__(self) -> str:
        return f"{self.project}/{self.stream_id}"

    @classmethod
    def parse(cls, text: str) -> DeadId:
        # rpartition: a project may hold a "/", a stream id never does.
        project, sep, stream_id = text.rpartition("/")
        if (not sep or not project or not _STREAM_ID.fullmatch(stream_id)
                or max(map(int, stream_id.split("-"))) >= 2**64):  # Redis's id parts: 64 bits
            raise ValueError(f"dead letter id {text!r}: expected PROJECT/STREAM-ID as "
                             "'dead-letters list' shows them, e.g. myproject/1712345678901-0")
        return cls(project, stream_id)

    @property
    def millis(self) -> int:
        """When Redis added the entry, in milliseconds (the stream id's first part)."""
        return int(self.stream_id.partition("-")[0])

    def order(self) -> tuple[int, int, str]:
        """Oldest first across projects, as the SQLite path lists by id."""
        millis, _, seq = self.stream_id.partition("-")
        return int(millis), int(seq), self.project


@dataclass(frozen=True, slots=True)
class Letter:
    id: DeadId
    fields: dict[bytes, bytes]

    @property
    def kind(self) -> Kind:
        if self.fields.get(b"kind") == b"failed":
            return "failed"
        if b"code" in self.fields:
            return "refused"
        if b"lane" in self.fields and b"body" in self.fields:
            return "expired"
        return "unknown"

    def text(self, name: str) -> str | None:
        value = self.fields.get(name.encode())
        return None if value is None else value.decode("utf-8", errors="replace")

    def number(self, name: str) -> float | None:
        """A numeric field, or None when it is missing or not a number."""
        value = self.fields.get(name.encode())
        try:
            return None if value is None else float(value)
        except ValueError:
            return None

    @property
    def created_at(self) -> float:
        """The writer's ``at`` when it gave one, else when Redis added the entry."""
        at = self.number("at")
        return at if at is not None else self.id.millis / 1000

    def replayable(self) -> str | None:
        """Why this letter cannot be replayed, or None when it can.

        Only a well-formed failed command goes back: a command the worker cannot
        decode would stop its partition at every read.
        """
        kind = self.kind
        if kind != "failed":
            return kind
        customer, command = self.fields.get(b"k"), self.fields.get(b"command")
        if customer is None or not customer.isdigit() or command is None:
            return "malformed"
        try:
            decode_command(command)
        except ValueError:
            return "malformed"
        return None


def project_of(key: bytes) -> str | None:
    """The project of a ``dl:{project}`` key, or None for any other key."""
    if not (key.startswith(PREFIX) and key.endswith(b"}") and len(key) > len(PREFIX) + 1):
        return None
    try:
        return key[len(PREFIX):-1].decode()
    except UnicodeDecodeError:
        return None  # projects are configured as text: this key is not the relay's


def glob_escape(text: str) -> str:
    """``text`` matched literally by SCAN's MATCH pattern."""
    return _GLOB.sub(r"\\\1", text)


class DeadLetters:
    """Every project's dead letters in one Redis."""

    def __init__(self, client: coredis.Redis[bytes], partitions: int) -> None:
        self.client = client
        self.partitions = partitions
        self._replay = client.register_script(source("replay"))

    def _stream(self, project: str) -> str:
        return Keys(project, self.partitions).dead_letters

    async def projects(self) -> list[str]:
        """The projects that have a dead-letter stream (it may be empty), sorted."""
        found: set[str] = set()
        async for key in self.client.scan_iter(match="dl:{*}", type_="stream"):
            project = project_of(_raw(key))
            if project is not None:
                found.add(project)
        return sorted(found)

    async def count(self, project: str) -> int:
        return int(await self.client.xlen(self._stream(project)))

    async def first(self, project: str, count: int | None) -> list[Letter]:
        """The project's ``count`` oldest dead letters (None: all)."""
        entries = await self.client.xrange(self._stream(project), "-", "+", count=count)
        return [_letter(project, entry) for entry in entries]

    async def get(self, dead_id: DeadId) -> Letter | None:
        entries = await self.client.xrange(self._stream(dead_id.project), dead_id.stream_id,
                                           dead_id.stream_id)
        if not entries:
            return None
        return _letter(dead_id.project, entries[0])

    async def walk(self, project: str) -> AsyncIterator[list[Letter]]:
        """Every dead letter of ``project`` in pages, oldest first."""
        start = "-"
        while True:
            entries = await self.client.xrange(self._stream(project), start, "+", count=PAGE)
            if not entries:
                return
            yield [_letter(project, entry) for entry in entries]
            start = "(" + _raw(entries[-1].identifier).decode()

    async def purge(self, ids: Sequence[DeadId]) -> int:
        """Delete these dead letters; how many there were."""
        by_project: dict[str, list[str]] = {}
        for dead_id in ids:
            by_project.setdefault(dead_id.project, []).append(dead_id.stream_id)
        deleted = 0
        for project, stream_ids in by_project.items():
            for start in range(0, len(stream_ids), PAGE):
                deleted += int(await self.client.xdel(self._stream(project),
                                                      stream_ids[start:start + PAGE]))
        return deleted

    async def input_partitions(self, project: str) -> set[int]:
        """The partitions of ``project`` that have an input stream: the ones workers own."""
        prefix = f"in:{{{project}}}:"
        found: set[int] = set()
        async for key in self.client.scan_iter(match=glob_escape(prefix) + "*", type_="stream"):
            suffix = _raw(key).decode(errors="replace").removeprefix(prefix)
            if suffix.isdigit():
                found.add(int(suffix))
        return found

    async def replay(self, letter: Letter) -> bytes | None:
        """Move a failed command to its customer's partition input in one step (replay.lua).

        Returns the input entry's id, or None when the dead letter was gone already.
        """
        keys = Keys(letter.id.project, self.partitions)
        customer = letter.fields[b"k"]
        reply: ResponseType = await self._replay(
            [keys.dead_letters, keys.inbox(keys.partition(int(customer)))],
            [letter.id.stream_id, customer])
        if isinstance(reply, list) and reply and reply[0] == b"GONE":
            return None
        if isinstance(reply, list) and len(reply) == 2 and reply[0] == b"OK":
            added = reply[1]
            if isinstance(added, bytes):
                return added
        raise RedisError(f"replay.lua answered {reply!r}; is router/cluster current?")



def _letter(project: str, entry: StreamEntry) -> Letter:
    return Letter(DeadId(project, _raw(entry.identifier).decode()),
                  {_raw(name): _raw(value) for name, value in entry.field_values.items()})


def _raw(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
