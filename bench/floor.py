"""The codec floor: the CPU a relay cannot avoid spending per message.

Whatever else it does, a relay has to decode each intake body and encode the
bulk bodies it sends on. Timing exactly that with msgspec (the relay's own JSON
library) on the same bodies, in the same run and on the same machine, gives a
yardstick that moves with the machine's speed: the relay's CPU per message
divided by it is a ratio that survives a noisy, shared box better than
absolute microseconds do.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from .data import Messages, batch_body, legacy_bodies, single_body
from .measure import median


def _bodies(kind: str, messages: int, batch_size: int) -> list[bytes]:
    gen = Messages(customers=10_000, id_prefix="floor-")
    if kind == "batch":
        return [batch_body(gen, batch_size) for _ in range(max(1, messages // batch_size))]
    return [single_body(gen)[1] for _ in range(messages)]


def codec_floor(kind: str, *, messages: int = 20_000, batch_size: int = 100,
                repeats: int = 5) -> dict[str, Any]:
    """CPU µs per message to decode the intake bodies and encode the legacy bulk bodies."""
    bodies = _bodies(kind, messages, batch_size)
    decoded: list[dict[str, Any]] = []
    for body in bodies:
        data = msgspec.json.decode(body)
        decoded.extend(data["batch"] if kind == "batch" else [data])
    bulk = list(legacy_bodies(decoded, per_body=50))
    decode, encode = msgspec.json.decode, msgspec.json.encode
    n = len(decoded)
    samples: list[float] = []
    for _ in range(repeats):
        t0 = time.process_time()
        for body in bodies:
            decode(body)
        for payload in bulk:
            encode(payload)
        samples.append((time.process_time() - t0) / n * 1e6)
    best = median(samples)
    assert best is not None
    return {"kind": kind, "messages": n, "repeats": repeats, "us_per_message": round(best, 3),
            "samples_us": [round(s, 3) for s in samples],
            "intake_bytes_per_message": round(sum(map(len, bodies)) / n, 1)}


if __name__ == "__main__":
    for k in ("batch", "single"):
        print(codec_floor(k))
