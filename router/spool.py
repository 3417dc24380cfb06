"""The spool: bytes of journal and outbox on disk that are not finished yet."""

from __future__ import annotations


class Spool:
    """Bytes of journal and outbox not yet finished; intake refuses work past the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.bytes = 0

    def add(self, count: int) -> None:
        self.bytes += count

    @property
    def full(self) -> bool:
        return self.bytes >= self.cap
