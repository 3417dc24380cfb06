"""The benchmark's bare forwarder: its message -> command mapping, and bulks end to end."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any

import httptools
import msgspec

from bench import forwarder
from bench.data import BASIC_AUTH, Messages, batch_body, single_body
from bench.forwarder import Message, commands_of, to_command

PROJECTS = {"bench": "bench-project"}
STAMP = "2026-01-02T03:04:05.250Z"
STAMP_S = datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=UTC).timestamp()


def _message(**fields: Any) -> Message:
    return msgspec.json.decode(msgspec.json.encode(fields), type=Message)


def _plain(command: forwarder.Command | None) -> Any:
    return msgspec.to_builtins(command)


def test_track_becomes_an_event_named_after_the_track() -> None:
    msg = _message(type="track", userId="u-1", anonymousId="a-1", event="Order Completed",
                   properties={"price": 9.5, "product": {"sku": "x"}}, timestamp=STAMP,
                   context={"ip": "203.0.113.1"}, messageId="m-1")
    assert _plain(to_command(msg, "p", now=1.0)) == {
        "name": "crm/events",
        "data": {"customer_ids": {"registered": "u-1", "cookie": "a-1"}, "project_id": "p",
                 "type": "Order Completed", "properties": {"price": 9.5,
                                                           "product": {"sku": "x"}},
                 "timestamp": STAMP_S},
    }


def test_other_types_use_the_type_traits_and_the_time_of_arrival() -> None:
    identify = _plain(to_command(_message(type="identify", userId="u-2",
                                          traits={"plan": "pro"}), "p", now=12.5))
    assert identify["data"]["type"] == "identify"
    assert identify["data"]["customer_ids"] == {"registered": "u-2"}
    assert identify["data"]["properties"] == {"plan": "pro"}
    assert identify["data"]["timestamp"] == 12.5
    page = _plain(to_command(_message(anonymousId="a-3"), "p", now=1.0, kind="page"))
    assert (page["data"]["type"], page["data"]["customer_ids"], page["data"]["properties"]) \
        == ("page", {"cookie": "a-3"}, {})
    alias = _plain(to_command(_message(type="alias", userId="u-4", previousId="a-4"), "p", 1.0))
    assert alias["data"]["customer_ids"] == {"registered": "u-4", "cookie": "a-4"}
    assert to_command(_message(type="track", event="x"), "p", 1.0) is None


def test_requests_need_a_known_write_key_and_a_valid_body() -> None:
    gen = Messages(customers=10, id_prefix="t-")
    body = batch_body(gen, 7)
    status, commands = commands_of(b"/v1/batch", body, None, PROJECTS, 1.0)
    assert status == 200 and len(commands) == 7
    assert {c.data.project_id for c in commands} == {"bench-project"}
    assert commands_of(b"/v1/batch", body, None, {"other": "p"}, 1.0)[0] == 401
    assert commands_of(b"/v1/batch", b"{not json", None, PROJECTS, 1.0)[0] == 400
    path, single = single_body(gen)
    assert commands_of(path.encode(), single, None, PROJECTS, 1.0)[0] == 401
    status, commands = commands_of(path.encode(), single, BASIC_AUTH, PROJECTS, 1.0)
    assert status == 200 and len(commands) == 1
    wrong = b"Basic " + base64.b64encode(b"nope:")
    assert commands_of(path.encode(), single, wrong, PROJECTS, 1.0)[0] == 401
    assert commands_of(b"/v1/unknown", single, BASIC_AUTH, PROJECTS, 1.0)[0] == 404


class _TinyUpstream:
    """Records the commands of every ``POST /bulk`` and answers each with 50 ``ok``."""

    def __init__(self) -> None:
        self.bulks: list[list[dict[str, Any]]] = []
        self.paths: list[bytes] = []
        self.changed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = self

        class Request:
            def __init__(self) -> None:
                self.url = b""
                self.body = b""

            def on_url(self, url: bytes) -> None:
                self.url += url

            def on_body(self, body: bytes) -> None:
                self.body += body

            def on_message_complete(self) -> None:
                upstream.paths.append(self.url)
                upstream.bulks.append(msgspec.json.decode(self.body)["commands"])
                answer = msgspec.json.encode({"results": [{"status": "ok"}] * 50,
                                              "success": True})
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(answer), answer))
                self.url, self.body = b"", b""
                upstream.changed.set()

        parser = httptools.HttpRequestParser(Request())
        try:
            while data := await reader.read(65536):
                parser.feed_data(data)
        finally:
            writer.close()

    def commands(self) -> int:
        return sum(map(len, self.bulks))

    async def wait_for(self, n: int, seconds: float = 5.0) -> None:
        async def until() -> None:
            while self.commands() < n:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(until(), seconds)


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                body: bytes) -> tuple[int, bytes]:
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n".encode()
                 + b"Authorization: " + BASIC_AUTH + b"\r\n\r\n" + body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return int(head.split(b" ")[1]), await asyncio.wait_for(reader.readexactly(length), 5.0)


async def _end_to_end() -> tuple[_TinyUpstream, list[tuple[int, bytes]]]:
    upstream = _TinyUpstream()
    sink = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    sink_port = sink.sockets[0].getsockname()[1]
    fwd = forwarder.Forwarder(f"http://127.0.0.1:{sink_port}", PROJECTS, connections=2)
    answers: list[tuple[int, bytes]] = []
    try:
        port = await fwd.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            gen = Messages(customers=1000, id_prefix="e2e-")
            # One connection, kept alive across requests, as the load generator does.
            answers.append(await _post(reader, writer, "/v1/batch", batch_body(gen, 120)))
            await upstream.wait_for(120)
            path, body = single_body(gen)
            answers.append(await _post(reader, writer, path, body))
            await upstream.wait_for(121)
        finally:
            writer.close()
    finally:
        await fwd.stop()
        sink.close()
        await sink.wait_closed()
    return upstream, answers


def test_forwarder_answers_at_once_and_posts_bulks_of_50() -> None:
    upstream, answers = asyncio.run(asyncio.wait_for(_end_to_end(), 20.0))
    assert answers == [(200, b'{"success":true}')] * 2
    # 120 messages: two full bulks at once, the rest after the linger; then the single one.
    assert [len(b) for b in upstream.bulks] == [50, 50, 20, 1]
    assert set(upstream.paths) == {b"/bulk"}
    commands = [c for bulk in upstream.bulks for c in bulk]
    assert {c["name"] for c in commands} == {"crm/events"}
    assert {c["data"]["project_id"] for c in commands} == {"bench-project"}
    assert all(c["data"]["customer_ids"] and isinstance(c["data"]["timestamp"], float)
               for c in commands)
    assert "Product Viewed" in {c["data"]["type"] for c in commands}
