"""The Redis key names of one project; all share the hash tag ``{project}``."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "actors"  # the consumer group on every input stream; its consumer is the partition name


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for ``project``; ``partitions`` is fixed for the life of the project's data."""

    project: str
    partitions: int

    @property
    def tag(self) -> str:
        return "{" + self.project + "}"

    def dedup(self, slot: int) -> str:
        return f"dd:{self.tag}:{slot}"  # messageId hashes seen in one time slot

    @property
    def ids(self) -> str:
        return f"id:{self.tag}"  # "r:<userId>" / "c:<anonymousId>" -> customer key

    @property
    def registered(self) -> str:
        return f"reg:{self.tag}"  # customer key -> its registered id

    @property
    def forward(self) -> str:
        return f"fwd:{self.tag}"  # merged customer key -> survivor

    @property
    def next_key(self) -> str:
        return f"nk:{self.tag}"

    @property
    def cookies_prefix(self) -> str:
        return f"ck:{self.tag}:"  # route.lua appends the customer keys it resolves

    def cookies(self, key: int) -> str:
        return f"{self.cookies_prefix}{key}"  # the customer's cookies, oldest first

    def partition(self, key: int) -> int:
        return key % self.partitions

    @property
    def inbox_prefix(self) -> str:
        return f"in:{self.tag}:"  # route.lua appends the partitions of the keys it resolves

    def inbox(self, partition: int) -> str:
        return f"{self.inbox_prefix}{partition}"

    def states(self, partition: int) -> str:
        return f"cs:{self.tag}:{partition}"

    def timers(self, partition: int) -> str:
        return f"tm:{self.tag}:{partition}"

    def outbox(self, partition: int) -> str:
        return f"out:{self.tag}:{partition}"

    def progress(self, partition: int) -> str:
        return f"done:{self.tag}:{partition}"  # outbox entry id -> which commands are final

    def handed(self, partition: int) -> str:
        return f"handed:{self.tag}:{partition}"  # set by an owner that left nothing in flight

    def lease(self, partition: int) -> str:
        return f"lease:{self.tag}:{partition}"

    def round(self, partition: int) -> str:
        return f"round:{self.tag}:{partition}"

    @property
    def fence(self) -> str:
        return f"fence:{self.tag}"  # the counter fencing tokens are drawn from

    @property
    def meta(self) -> str:
        return f"meta:{self.tag}"  # the project's fixed settings (its partition count)

    @property
    def schema(self) -> str:
        return f"schema:{self.tag}"

    @property
    def dead_letters(self) -> str:
        return f"dl:{self.tag}"

    @property
    def workers(self) -> str:
        return f"workers:{self.tag}"
