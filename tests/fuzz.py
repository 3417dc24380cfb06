"""A fixed-seed fuzz of the Segment intake through the relay's real HTTP server.

Random and mutated requests (truncated JSON, wrong types, huge strings, deep
nesting, non-UTF-8, gzip garbage, wrong or doubled framing headers, header junk,
odd credentials, a 200 KB batch context) go over raw sockets, with a valid
canary message every ``CANARY_EVERY`` requests. The run fails on any 5xx
answer, on a canary not delivered exactly once, and on memory that keeps growing.

    python -m tests.fuzz --requests 1000000 --seed 1
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from router import Config, open_router

WRITE_KEY = "fuzz-key"
CANARY_EVERY = 25
WORKERS = 16
ANSWER_TIMEOUT = 5.0
_AUTH = b"Basic " + base64.b64encode(f"{WRITE_KEY}:".encode())


def rss_bytes() -> int:
    """This process's resident set size, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Report:
    """What a run saw: answers by status, canaries sent and delivered, peak memory."""

    statuses: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    canaries_sent: int = 0
    delivered: Counter[int] = field(default_factory=Counter)
    rss_start: int = 0
    rss_peak: int = 0
    seconds: float = 0.0
    server_errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def problems(self) -> list[str]:
        found = list(self.server_errors[:5])
        lost = [n for n in range(self.canaries_sent) if self.delivered[n] != 1]
        if lost:
            found.append(f"{len(lost)} canaries not delivered exactly once, e.g. {lost[:5]}")
        return found

    def summary(self) -> str:
        rate = self.requests / self.seconds if self.seconds else 0.0
        by_status = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        delivered_once = sum(1 for n in range(self.canaries_sent) if self.delivered[n] == 1)
        return (f"requests {self.requests} in {self.seconds:.0f} s ({rate:.0f}/s)\n"
                f"by status: {by_status}\n"
                f"canaries: sent {self.canaries_sent}, delivered exactly once "
                f"{delivered_once}\n"
                f"rss: start {self.rss_start / 2**20:.0f} MiB, "
                f"peak {self.rss_peak / 2**20:.0f} MiB")


class Sink:
    """A fake Infinario: answers ok to every command, counts canaries, keeps nothing else."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def handler(self, request: httpx.Request) -> httpx.Response:
        commands = json.loads(request.content)["commands"]
        for command in commands:
            data = command.get("data", {})
            canary = data.get("properties", {}).get("canary") if isinstance(data, dict) else None
            if command.get("name") == "crm/events" and isinstance(canary, int):
                self.report.delivered[canary] += 1
        return httpx.Response(200, json={"success": True,
                                         "results": [{"status": "ok"} for _ in commands]})


# --- request makers: each returns (kind, raw request bytes) ----------------------------------


def _junk(rng: random.Random) -> Any:
    choice = rng.randrange(9)
    if choice == 0:
        return []
    if choice == 1:
        return {}
    if choice == 2:
        return rng.randint(-2**70, 2**70)
    if choice == 3:
        return None
    if choice == 4:
        return rng.random() < 0.5
    if choice == 5:
        return rng.random() * 1e300
    if choice == 6:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(40)))
    if choice == 7:
        return [_junk(rng)]
    return {"k": _junk(rng)}


def _message(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["track", "identify", "page", "screen", "group", "alias"])
    message: dict[str, Any] = {"type": kind, "userId": f"u{rng.randrange(1000)}",
                               "messageId": f"f{rng.getrandbits(64):x}"}
    if kind == "track":
        message["event"] = rng.choice(["Clicked", "Bought", "x" * 300, ""])
        message["properties"] = {"price": rng.random(), "n": rng.randrange(10)}
    elif kind == "identify":
        message["traits"] = {"email": "a@example.com", "age": rng.randrange(99)}
    elif kind == "alias":
        message["previousId"] = f"p{rng.randrange(1000)}"
    elif kind == "group":
        message["groupId"] = f"g{rng.randrange(10)}"
    if rng.random() < 0.3:
        message["anonymousId"] = f"a{rng.randrange(1000)}"
    return message


def _http(path: str, body: bytes, headers: list[bytes] | None = None, *,
          length: bool = True, auth: bytes | None = _AUTH, method: bytes = b"POST") -> bytes:
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: relay",
             b"Connection: close", b"Content-Type: application/json"]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    if length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.extend(headers or [])
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def valid(rng: random.Random) -> tuple[str, bytes]:
    message = _message(rng)
    return "valid", _http(f"/v1/{message['type']}", _dumps(message))


def truncated(rng: random.Random) -> tuple[str, bytes]:
    body = _dumps({"batch": [_message(rng) for _ in range(rng.randrange(1, 5))]})
    return "truncated", _http("/v1/batch", body[: rng.randrange(len(body))])


def wrong_types(rng: random.Random) -> tuple[str, bytes]:
    message = _message(rng)
    name = rng.choice([*message, "context", "timestamp", "sentAt", "integrations",
                       "properties", "traits", "writeKey", "event", "type"])
    message[name] = _junk(rng)
    if rng.random() < 0.5:
        return "wrong_types", _http("/v1/batch", _dumps({"batch": [message],
                                                         "context": _junk(rng)}))
    return "wrong_types", _http("/v1/track", _dumps(message))


def odd_type(rng: random.Random) -> tuple[str, bytes]:
    message = _message(rng)
    message["type"] = rng.choice([[], {}, None, 7, "", "TRACK", "x" * 1000])
    path = rng.choice(["/v1/batch", "/v1/track", "/v1/identify"])
    body = {"batch": [message]} if path == "/v1/batch" else message
    return "odd_type", _http(path, _dumps(body))


def huge(rng: random.Random) -> tuple[str, bytes]:
    message = _message(rng)
    message["properties"] = {"blob": "x" * rng.choice([40_000, 600_000, 1_100_000])}
    return "huge", _http(rng.choice(["/v1/track", "/v1/batch"]), _dumps(
        {"batch": [message]} if rng.random() < 0.5 else message))


def deep(rng: random.Random) -> tuple[str, bytes]:
    depth = rng.choice([50, 200, 5000])
    nested = b"[" * depth + b"1" + b"]" * depth
    body = (b'{"type":"track","userId":"u","event":"Deep","properties":{"d":' + nested
            + b"}}")
    return "deep", _http("/v1/track", body)


def not_utf8(rng: random.Random) -> tuple[str, bytes]:
    body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
    if rng.random() < 0.5:
        body = b'{"type":"track","userId":"' + body + b'","event":"E"}'
    return "not_utf8", _http(rng.choice(["/v1/track", "/v1/batch"]), body)


def gzip_garbage(rng: random.Random) -> tuple[str, bytes]:
    if rng.random() < 0.5:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
    else:
        whole = gzip.compress(_dumps({"batch": [_message(rng)]}))
        body = whole[: rng.randrange(1, len(whole))]
    return "gzip_garbage", _http("/v1/batch", body, [b"Content-Encoding: gzip"])


def bad_length(rng: random.Random) -> tuple[str, bytes]:
    body = _dumps(_message(rng))
    wrong = rng.choice([0, len(body) - 1, len(body) + 1, len(body) + 1000, -1, 2**70])
    headers = [b"Content-Length: " + str(wrong).encode()]
    if rng.random() < 0.3:
        headers.append(b"Content-Length: " + str(len(body)).encode())
    return "bad_length", _http("/v1/track", body, headers, length=False)


def cl_and_te(rng: random.Random) -> tuple[str, bytes]:
    body = _dumps(_message(rng))
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    headers = [b"Transfer-Encoding: " + rng.choice([b"chunked", b"gzip, chunked", b"x"])]
    return "cl_and_te", _http("/v1/track", chunked, headers)


def header_junk(rng: random.Random) -> tuple[str, bytes]:
    body = _dumps(_message(rng))
    junk = rng.choice([
        b"NoColonHere",
        b": empty-name",
        bytes(rng.getrandbits(8) for _ in range(40)) + b": v",
        b"X-Long: " + b"a" * rng.choice([100, 20_000]),
        b"X-Bad\x00Name: v",
        b" folded: continuation",
        b"Content-Type: \xff\xfe",
    ])
    return "header_junk", _http("/v1/track", body, [junk])


def odd_credentials(rng: random.Random) -> tuple[str, bytes]:
    message = _message(rng)
    auth = rng.choice([
        b"Basic " + base64.b64encode("ключ:пароль".encode()),
        b"Basic " + base64.b64encode(b"\xff\xfe:"),
        b"Basic \xc3\xa9\xc3\xa9",
        b"Basic !!!notbase64",
        b"Bearer " + WRITE_KEY.encode(),
        b"Basic",
        b"",
    ])
    return "odd_credentials", _http("/v1/track", _dumps(message), auth=auth)


def big_context(rng: random.Random) -> tuple[str, bytes]:
    context = {"library": {"name": "fuzz"}, "pad": "c" * 200_000}
    batch = [_message(rng) for _ in range(rng.choice([5, 100]))]
    return "big_context", _http("/v1/batch", _dumps({"batch": batch, "context": context}))


def wrong_route(rng: random.Random) -> tuple[str, bytes]:
    method = rng.choice([b"GET", b"PUT", b"DELETE", b"POST", b"\xffX", b"BREW"])
    path = rng.choice(["/", "/v1", "/v1/", "/v1/unknown", "/health", "/%00", "/" + "a" * 5000])
    return "wrong_route", _http(path, b"{}", method=method)


MAKERS: list[Callable[[random.Random], tuple[str, bytes]]] = [
    valid, truncated, wrong_types, odd_type, huge, deep, not_utf8, gzip_garbage, bad_length,
    cl_and_te, header_junk, odd_credentials, big_context, wrong_route,
]


def canary(number: int) -> tuple[str, bytes]:
    message = {"type": "track", "userId": f"canary-{number % 50}", "event": "Canary",
               "messageId": f"canary-{number}", "properties": {"canary": number}}
    return "canary", _http("/v1/track", _dumps(message))


# --- sending -----------------------------------------------------------------------------------


async def exchange(host: str, port: int, raw: bytes) -> str:
    """Send one raw request and read the status of the answer ('none': closed unanswered)."""
    with trio.move_on_after(ANSWER_TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            try:
                await stream.send_all(raw)
                # Half-close: a request whose framing promised more body ends here.
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            received = b""
            try:
                while b"\r\n" not in received and len(received) < 64:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    received += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            if received.startswith(b"HTTP/1.1 ") and len(received) >= 12:
                return received[9:12].decode("latin-1")
            return "none"
    return "timeout"


async def run(requests: int, seed: int, data_dir: Path, *, workers: int = WORKERS,
              progress: Callable[[Report], None] | None = None) -> Report:
    """Fuzz a relay started here with ``requests`` requests; the report says what happened."""
    report = Report(rss_start=rss_bytes())
    report.rss_peak = report.rss_start
    sink = Sink(report)
    config = Config(write_keys={WRITE_KEY: "fuzz-project"}, data_dir=data_dir,
                    listen="127.0.0.1:0", infinario_url="http://infinario.test", grace=30.0,
                    log_level="warning")
    rng = random.Random(seed)
    started = time.monotonic()
    async with open_router(config, http=True,
                           transport=httpx.MockTransport(sink.handler)) as router:
        assert router.url is not None
        host, _, port = router.url.removeprefix("http://").rpartition(":")
        send, receive = trio.open_memory_channel[tuple[str, bytes]](workers * 2)

        async def worker(inbox: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
            async with inbox:
                async for kind, raw in inbox:
                    status = await exchange(host, int(port), raw)
                    report.statuses[status] += 1
                    report.kinds[kind] += 1
                    if status.startswith("5") or (kind == "canary" and status != "200"):
                        report.server_errors.append(f"{kind} answered {status}")

        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for number in range(requests):
                    if number % CANARY_EVERY == 0:
                        request = canary(report.canaries_sent)
                        report.canaries_sent += 1
                    else:
                        request = rng.choice(MAKERS)(rng)
                    await send.send(request)
                    if number % 1000 == 0:
                        report.rss_peak = max(report.rss_peak, rss_bytes())
                        if progress is not None and number:
                            report.seconds = time.monotonic() - started
                            progress(report)
        with trio.fail_after(60):
            await router.drain()
    report.rss_peak = max(report.rss_peak, rss_bytes())
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args(argv)
    last = [time.monotonic()]

    def progress(report: Report) -> None:
        if time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            print(report.summary().replace("\n", "; "), file=sys.stderr, flush=True)

    from router import logs

    # Malformed requests are what this run sends: their log lines would drown the counts.
    logs.configure("warning", "console")
    with tempfile.TemporaryDirectory(prefix="router-fuzz-") as tmp:
        report = trio.run(lambda: run(args.requests, args.seed, Path(tmp) / "data",
                                      workers=args.workers, progress=progress))
    print(report.summary())
    problems = report.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
