"""Request bodies by Content-Encoding, inflated without ever exceeding a limit.

Sans-I/O: the server feeds the bytes it receives and gets the inflated bytes
back, so the limit holds while the body streams in. A compressed bomb is
refused after inflating at most ``limit + 1`` bytes, and the compressed bytes
are capped too (``raw_limit``), so endless empty gzip members or trailing junk
cannot run on forever.
"""

from __future__ import annotations

import zlib

from .errors import Rejected

_GZIP = 16 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_WBITS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}
_IDENTITY = frozenset({"", "identity", "none"})


def too_large(limit: int) -> Rejected:
    return Rejected("body_too_large", f"request body exceeds the {limit // 1024} KB limit")


def raw_limit(encoding: str | None, limit: int) -> int:
    """The most bytes on the wire for a body that inflates to at most ``limit``.

    Real payloads compress, so twice the limit is plenty for a compressed body.
    """
    return limit if encoding is None else 2 * limit


def encoding_of(header: bytes | None) -> str | None:
    """The normalised Content-Encoding; None for an identity body.

    Raises ``Rejected(unsupported_encoding)`` for anything but gzip, x-gzip and deflate.
    """
    if header is None:
        return None
    name = header.decode("latin-1").strip().lower()
    if name in _IDENTITY:
        return None
    if name in _WBITS:
        return name
    raise Rejected("unsupported_encoding",
                   f"Content-Encoding {name!r} is not supported; send gzip or no encoding")


class Inflater:
    """Inflates one gzip/x-gzip/deflate body; ``feed`` each received chunk, then ``finish``.

    Both raise ``Rejected``: ``body_too_large`` past ``limit`` inflated bytes,
    ``invalid_body`` for corrupt or truncated data.
    """

    __slots__ = ("_inflater", "_wbits", "encoding", "limit", "size")

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        self.size = 0
        self._wbits = _WBITS[encoding]
        self._inflater = zlib.decompressobj(self._wbits)

    def feed(self, chunk: bytes) -> bytes:
        parts: list[bytes] = []
        inflater = self._inflater
        while chunk:
            if inflater.eof:
                # Concatenated gzip members form one body (RFC 1952); anything
                # else after the end fails the next member's header check.
                inflater = self._inflater = zlib.decompressobj(self._wbits)
            try:
                data = inflater.decompress(chunk, self.limit + 1 - self.size)
            except zlib.error as exc:
                raise Rejected("invalid_body",
                               f"body is not valid {self.encoding}: {exc}") from None
            self.size += len(data)
            # A full output buffer with input left over means more than the limit.
            if self.size > self.limit or inflater.unconsumed_tail:
                raise too_large(self.limit)
            if data:
                parts.append(data)
            chunk = inflater.unused_data if inflater.eof else b""
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def finish(self) -> bytes:
        inflater = self._inflater
        try:
            tail = inflater.flush()
        except zlib.error as exc:
            raise Rejected("invalid_body", f"body is not valid {self.encoding}: {exc}") from None
        self.size += len(tail)
        if self.size > self.limit:
            raise too_large(self.limit)
        if not inflater.eof:
            raise Rejected("invalid_body", f"{self.encoding} body is truncated")
        return tail
