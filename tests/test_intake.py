"""The Segment HTTP intake, exercised through a real relay over loopback HTTP."""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.lowlevel

import router.inflate as inflate_module
from router import Overloaded, open_router, segment
from router.app import State

from .conftest import WRITE_KEY, FakeInfinario, Relay, relay_config

KB = 1024


def basic(key: str) -> dict[str, str]:
    token = base64.b64encode(f"{key}:".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def track(n: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": f"u{n}", "event": "Clicked", "messageId": f"m{n}",
            **extra}


async def chunks(data: bytes, size: int = 8 * KB) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]
        await trio.lowlevel.checkpoint()


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"}
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]


async def still_serving(relay: Relay) -> None:
    """A good request after whatever came before is accepted and delivered."""
    before = len(await relay.events("Still Here"))
    response = await relay.client.post(
        "/v1/track", json={"userId": "after", "event": "Still Here"}, headers=basic(WRITE_KEY))
    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert len(await relay.events("Still Here")) == before + 1


class RawConnection:
    """One HTTP/1.1 connection driven by hand, to see exactly what happens to it."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.buffer = b""

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        parsed = httpx.URL(url)
        assert parsed.port is not None
        return cls(await trio.open_tcp_stream(parsed.host, parsed.port), parsed.host)

    async def send_head(self, path: str, headers: dict[str, str]) -> None:
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}",
                 *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        await self.stream.send_all("\r\n".join(lines).encode())

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> None:
        await self.send_head(path, {**headers, "Content-Length": str(len(body))})
        await self.stream.send_all(body)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buffer += data

    async def response(self) -> tuple[int, dict[str, str], dict[str, Any]]:
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buffer:
                await self._fill()
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in header_lines)}
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                await self._fill()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, json.loads(body)

    async def closed_by_server(self) -> bool:
        with trio.fail_after(10):
            try:
                return await self.stream.receive_some(65536) == b""
            except trio.BrokenResourceError:
                return True


SINGLES: dict[str, dict[str, Any]] = {
    "identify": {"userId": "u1", "traits": {"name": "Ada", "plan": "pro"}},
    "track": {"userId": "u1", "event": "Order Placed", "properties": {"total": 10}},
    "page": {"anonymousId": "a1", "name": "Home", "properties": {"path": "/"}},
    "screen": {"anonymousId": "a2", "name": "Settings"},
    "group": {"userId": "u3", "groupId": "g1", "traits": {"name": "Acme"}},
    "alias": {"userId": "u4", "previousId": "a4"},
}


class TestSingleEndpoints:
    """Each single-message endpoint answers exactly 200 {"success": true} and delivers its call."""

    @pytest.mark.parametrize("kind", sorted(SINGLES))
    async def test_accepted_with_exact_body(self, relay: Relay, kind: str) -> None:
        response = await relay.client.post(f"/v1/{kind}", json=SINGLES[kind],
                                           headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert response.json() == {"success": True}
        assert response.headers["content-type"] == "application/json"
        assert [m["type"] for m in relay.journaled] == [kind]

    async def test_each_call_is_delivered_with_its_meaning(self, relay: Relay) -> None:
        for kind, body in SINGLES.items():
            response = await relay.client.post(f"/v1/{kind}", json=body, headers=basic(WRITE_KEY))
            assert response.status_code == 200
        customers = await relay.customers()
        events = await relay.events()
        assert {"ids": {"registered": "u1"}, "project_id": "proj",
                "properties": {"name": "Ada", "plan": "pro"}} in customers
        order = next(e for e in events if e["type"] == "Order Placed")
        assert order["customer_ids"] == {"registered": "u1"}
        assert order["properties"]["total"] == 10
        page = next(e for e in events if e["type"] == "page_visit")
        assert page["customer_ids"] == {"cookie": "a1"}
        assert page["properties"]["name"] == "Home"
        screen = next(e for e in events if e["type"] == "screen_visit")
        assert screen["customer_ids"] == {"cookie": "a2"}
        group = next(c for c in customers if c["properties"].get("group_id") == "g1")
        assert group["properties"]["group_name"] == "Acme"
        assert any(c["ids"] == {"registered": "u4", "cookie": "a4"} for c in customers)

    async def test_path_decides_the_type(self, relay: Relay) -> None:
        response = await relay.client.post(
            "/v1/identify", json={"type": "track", "userId": "u9", "traits": {"x": 1}},
            headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert relay.journaled[0]["type"] == "identify"
        assert await relay.events() == []
        assert [c["properties"] for c in await relay.customers()] == [{"x": 1}]

    async def test_trailing_slash_and_wrong_method(self, relay: Relay) -> None:
        response = await relay.client.post("/v1/track/", json=SINGLES["track"],
                                           headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert_error(await relay.client.get("/v1/track"), 405, "method_not_allowed")
        assert_error(await relay.client.post("/v1/nope", json={}), 404, "not_found")


class TestBatchEndpoints:
    """/v1/batch and /v1/import accept items of any type, merging the envelope into each item."""

    @pytest.mark.parametrize("path", ["/v1/batch", "/v1/import"])
    async def test_envelope_context_and_integrations_merge_item_wins(
        self, relay: Relay, path: str
    ) -> None:
        body = {
            "batch": [
                track(1, context={"locale": "de-DE"}, integrations={"All": True}),
                track(2, properties={"n": 2}),
                {"type": "identify", "userId": "u3", "messageId": "m3", "traits": {"a": 1}},
            ],
            "context": {"ip": "10.0.0.1", "locale": "en-US", "library": {"name": "py"}},
            "integrations": {"All": False, "Infinario": True},
            "sentAt": iso(time.time()),
        }
        response = await relay.client.post(path, json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert response.json() == {"success": True, "accepted": 3, "duplicates": 0,
                                   "rejected": []}
        by_user = {e["customer_ids"]["registered"]: e for e in await relay.events("Clicked")}
        assert by_user["u1"]["properties"] == {
            "ip": "10.0.0.1", "locale": "de-DE", "library_name": "py"}
        assert by_user["u2"]["properties"] == {
            "n": 2, "ip": "10.0.0.1", "locale": "en-US", "library_name": "py"}
        assert [c["ids"] for c in await relay.customers()] == [{"registered": "u3"}]
        journaled = {m["messageId"]: m for m in relay.journaled}
        assert journaled["m1"]["integrations"] == {"All": True, "Infinario": True}
        assert journaled["m2"]["integrations"] == {"All": False, "Infinario": True}
        assert journaled["m3"]["context"]["ip"] == "10.0.0.1"

    async def test_journal_keeps_the_clients_bytes_where_validation_only_adds_the_time(
        self, relay: Relay
    ) -> None:
        as_sent = b'{"type": "track", "userId": "u1", "event": "e", "messageId": "m1" }'
        content = b'{"batch": [%s, %s, %s]}' % (
            as_sent,
            json.dumps({"type": "track", "userId": 2, "event": "e", "messageId": "m2"}).encode(),
            json.dumps({"type": "track", "userId": "u3", "event": "e"}).encode())
        response = await relay.client.post("/v1/batch", content=content,
                                           headers=basic(WRITE_KEY))
        assert response.json()["accepted"] == 3
        [messages], [items] = relay.accepted, relay.given_items
        # A lean item is a view into the request body, not a copy.
        assert type(items[0]) is msgspec.Raw
        first, second, third = (bytes(item) for item in items)
        # Items never carry the event time: it travels beside them, in the message.
        assert all("_time" in m for m in messages)
        without_time = [{k: v for k, v in json.loads(segment.message_json(m)).items()
                         if k != "_time"} for m in messages]
        # The first is decoded lean: the fields the pipeline reads, as the client sent them.
        assert messages[0]["event"] == "e" and "previousId" not in messages[0]
        assert first == as_sent  # the client's own bytes
        assert json.loads(first) == without_time[0]
        assert messages[1]["userId"] == "2"  # coerced: encoded anew
        assert json.loads(second) == without_time[1]
        assert json.loads(third) == without_time[2]  # messageId filled in
        assert len(await relay.events()) == 3

    async def test_a_refused_message_is_kept_as_its_client_sent_it(self, relay: Relay) -> None:
        # Keys the pipeline never reads, an explicit null and the context all reach the
        # dead letter, whichever way intake decoded the message.
        sent = [b'{"type":"track","event":"campaign","userId":"u%d","messageId":"m%d",'
                b'"channel":"server","anonymousId":null,"context":{"ip":"10.0.0.%d"}}'
                % (n, n, n) for n in range(2)]
        sent[1] = sent[1].replace(b'"userId":"u1"', b'"userId":1')  # coerced: decoded in full
        response = await relay.client.post(
            "/v1/batch", content=b'{"batch":[' + b",".join(sent) + b"]}",
            headers=basic(WRITE_KEY))
        assert response.json()["accepted"] == 2
        await relay.delivered()
        rows = await relay.router.store.call(
            lambda conn: conn.execute("SELECT origin FROM dead_letters ORDER BY id").fetchall())
        origins = [json.loads(origin) for (origin,) in rows]
        for client, origin in zip(sent, origins, strict=True):
            expected = json.loads(client)
            expected["userId"] = str(expected["userId"])
            assert {k: v for k, v in origin.items() if k != "_time"} == expected
            assert isinstance(origin["_time"], float)

    async def test_shared_context_counts_toward_each_item_and_is_stored_once(
        self, relay: Relay
    ) -> None:
        # A small request must not become a huge spool: the limit holds on the merged item.
        big = {"batch": [track(n) for n in range(1500)],
               "context": {"pad": "x" * 200 * KB}}
        response = await relay.client.post("/v1/batch", json=big, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        body = response.json()
        assert body["accepted"] == 0
        assert {r["code"] for r in body["rejected"]} == {"message_too_large"}
        assert len(body["rejected"]) == 1500
        assert relay.journaled == []
        assert relay.router.spool.bytes == 0
        # A shared part that fits: items that fit with it pass, the one that does not is
        # refused alone, and the journal keeps the shared part once for the request.
        fits = {"batch": [track(1), track(2, properties={"pad": "y" * 20 * KB}), track(3)],
                "context": {"pad": "z" * 15 * KB}}
        response = await relay.client.post("/v1/batch", json=fits, headers=basic(WRITE_KEY))
        body = response.json()
        assert body["accepted"] == 2
        assert [(r["index"], r["code"]) for r in body["rejected"]] == [(1, "message_too_large")]
        shared = relay.given_shared[-1]
        assert shared is not None and shared.count(b"z" * 15 * KB) == 1
        assert all(b"z" * 100 not in item for item in relay.given_items[-1])
        events = await relay.events("Clicked")
        assert len(events) == 2 and all(e["properties"]["pad"] == "z" * 15 * KB
                                        for e in events)

    async def test_empty_batch_is_accepted(self, relay: Relay) -> None:
        response = await relay.client.post("/v1/batch", json={"batch": []},
                                           headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert response.json()["accepted"] == 0

    async def test_unusable_items_are_rejected_alone(self, relay: Relay) -> None:
        content = (b'{"batch": [{"userId": "u1", "event": "x"}, %s, "not an object",'
                   b' {"type": "track", "userId": 1e999, "event": "x"},'
                   b' {"type": "bogus", "userId": "u1"},'
                   b' {"type": "Track", "userId": "u1", "event": "x", "messageId": "m5"}]}'
                   % json.dumps(track(2)).encode())
        response = await relay.client.post("/v1/batch", content=content,
                                           headers=basic(WRITE_KEY))
        assert response.status_code == 200
        result = response.json()
        assert result["accepted"] == 1
        assert [(r["index"], r["code"]) for r in result["rejected"]] == [
            (0, "invalid_type"), (2, "invalid_message"), (3, "invalid_json"), (4, "invalid_type"),
            (5, "invalid_type")]
        assert [e["customer_ids"] for e in await relay.events()] == [{"registered": "u2"}]


class TestWriteKey:
    """The key comes from Basic auth or the body (also beside a Bearer); bad keys get 401."""

    async def test_basic_auth_username(self, relay: Relay) -> None:
        response = await relay.client.post("/v1/track", json=SINGLES["track"],
                                           headers=basic(WRITE_KEY))
        assert response.status_code == 200
        response = await relay.client.post("/v1/batch", json={"batch": [track(1)]},
                                           auth=(WRITE_KEY, ""))
        assert response.status_code == 200
        assert len(await relay.events()) == 2

    async def test_write_key_in_body_only(self, relay: Relay) -> None:
        response = await relay.client.post(
            "/v1/track", json={**SINGLES["track"], "writeKey": WRITE_KEY})
        assert response.status_code == 200
        response = await relay.client.post(
            "/v1/batch", json={"batch": [track(1)], "writeKey": WRITE_KEY})
        assert response.status_code == 200
        assert len(await relay.events()) == 2

    async def test_bearer_with_write_key_in_body(self, relay: Relay) -> None:
        headers = {"Authorization": "Bearer x"}
        response = await relay.client.post(
            "/v1/batch", json={"batch": [track(1)], "writeKey": WRITE_KEY}, headers=headers)
        assert response.status_code == 200
        response = await relay.client.post(
            "/v1/page", json={"anonymousId": "a", "writeKey": WRITE_KEY}, headers=headers)
        assert response.status_code == 200
        assert len(await relay.events("Clicked")) == 1

    @pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
    async def test_unknown_key_is_401(self, relay: Relay, path: str) -> None:
        body = SINGLES["track"] if path == "/v1/track" else {"batch": [track(1)]}
        assert_error(await relay.client.post(path, json=body, headers=basic("nope")),
                     401, "invalid_write_key")
        assert_error(await relay.client.post(path, json={**body, "writeKey": "nope"}),
                     401, "invalid_write_key")

    @pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
    async def test_missing_key_is_401(self, relay: Relay, path: str) -> None:
        body = SINGLES["track"] if path == "/v1/track" else {"batch": [track(1)]}
        assert_error(await relay.client.post(path, json=body), 401, "missing_write_key")

    async def test_bearer_without_body_key_is_401_with_a_hint(self, relay: Relay) -> None:
        response = await relay.client.post("/v1/batch", json={"batch": [track(1)]},
                                           headers={"Authorization": "Bearer wk"})
        assert_error(response, 401, "missing_write_key")
        assert "writeKey" in response.json()["message"]

    async def test_rejected_requests_deliver_nothing(self, relay: Relay) -> None:
        await relay.client.post("/v1/batch", json={"batch": [track(1)]}, headers=basic("nope"))
        await relay.client.post("/v1/batch", json={"batch": [track(2)]})
        assert relay.journaled == []
        assert await relay.delivered() == []


class TestBodies:
    """Gzip and chunked bodies work; limits hold on the inflated size without a full inflate."""

    async def test_gzip_single_and_batch(self, relay: Relay) -> None:
        headers = {**basic(WRITE_KEY), "Content-Encoding": "gzip",
                   "Content-Type": "application/json"}
        single = gzip.compress(json.dumps(SINGLES["track"]).encode())
        response = await relay.client.post("/v1/track", content=single, headers=headers)
        assert response.status_code == 200
        batch = gzip.compress(json.dumps({"batch": [track(n) for n in range(5)]}).encode())
        response = await relay.client.post("/v1/batch", content=batch, headers=headers)
        assert response.status_code == 200
        assert response.json()["accepted"] == 5
        assert len(await relay.events()) == 6

    async def test_chunked_without_content_length(self, relay: Relay) -> None:
        data = json.dumps({"batch": [track(n, properties={"pad": "x" * 500})
                                     for n in range(40)]}).encode()
        response = await relay.client.post("/v1/batch", content=chunks(data),
                                           headers=basic(WRITE_KEY))
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert response.status_code == 200
        assert response.json()["accepted"] == 40
        assert len(await relay.events()) == 40

    async def test_chunked_gzip(self, relay: Relay) -> None:
        data = gzip.compress(json.dumps({"batch": [track(n) for n in range(10)]}).encode())
        response = await relay.client.post(
            "/v1/batch", content=chunks(data, 64),
            headers={**basic(WRITE_KEY), "Content-Encoding": "gzip"})
        assert response.status_code == 200
        assert response.json()["accepted"] == 10

    async def test_deflate_and_concatenated_gzip_members(self, relay: Relay) -> None:
        body = json.dumps({"batch": [track(n) for n in range(4)]}).encode()
        response = await relay.client.post(
            "/v1/batch", content=zlib.compress(body),
            headers={**basic(WRITE_KEY), "Content-Encoding": "deflate"})
        assert response.status_code == 200
        assert response.json()["accepted"] == 4
        body = json.dumps({"batch": [track(n) for n in range(4, 8)]}).encode()
        members = gzip.compress(body[:50]) + gzip.compress(body[50:])
        response = await relay.client.post(
            "/v1/batch", content=members,
            headers={**basic(WRITE_KEY), "Content-Encoding": "gzip"})
        assert response.status_code == 200
        assert response.json()["accepted"] == 4
        assert len(await relay.events()) == 8

    async def test_endless_empty_gzip_members_are_refused(self, relay: Relay) -> None:
        empty = gzip.compress(b"")
        content = gzip.compress(b'{"batch": [') + empty * (1100 * KB // len(empty))
        response = await relay.client.post(
            "/v1/batch", content=chunks(content, 64 * KB),
            headers={**basic(WRITE_KEY), "Content-Encoding": "gzip"})
        assert_error(response, 400, "body_too_large")
        await still_serving(relay)

    @pytest.mark.parametrize("path", ["/v1/batch", "/v1/track"])
    async def test_gzip_bomb_is_refused_without_full_inflate(
        self, relay: Relay, monkeypatch: pytest.MonkeyPatch, path: str
    ) -> None:
        inflated = [0]
        real = zlib.decompressobj

        class Counting:
            def __init__(self, *args: Any) -> None:
                self.inner = real(*args)

            def decompress(self, data: bytes, max_length: int = 0) -> bytes:
                out = self.inner.decompress(data, max_length)
                inflated[0] += len(out)
                return out

            def flush(self, *args: Any) -> bytes:
                out = self.inner.flush(*args)
                inflated[0] += len(out)
                return out

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        class CountingZlib:
            MAX_WBITS = zlib.MAX_WBITS
            error = zlib.error
            decompressobj = Counting

        monkeypatch.setattr(inflate_module, "zlib", CountingZlib)
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        block = b"\0" * (1024 * KB)
        bomb = b"".join(packer.compress(block) for _ in range(50)) + packer.flush()
        assert len(bomb) < 100 * KB
        started = trio.current_time()
        response = await relay.client.post(
            path, content=bomb, headers={**basic(WRITE_KEY), "Content-Encoding": "gzip"})
        assert_error(response, 400, "body_too_large")
        assert trio.current_time() - started < 2.0
        assert 0 < inflated[0] <= 500 * KB + 1
        assert relay.journaled == []
        monkeypatch.undo()
        await still_serving(relay)

    @pytest.mark.parametrize("chunked", [False, True])
    async def test_plain_body_over_500kb(self, relay: Relay, chunked: bool) -> None:
        pad = "x" * (16 * KB)
        data = json.dumps({"batch": [track(n, properties={"pad": pad})
                                     for n in range(32)]}).encode()
        assert len(data) > 500 * KB
        content: Any = chunks(data) if chunked else data
        response = await relay.client.post("/v1/batch", content=content,
                                           headers=basic(WRITE_KEY))
        assert_error(response, 400, "body_too_large")
        assert relay.journaled == []
        await still_serving(relay)

    async def test_gzip_body_inflating_past_500kb(self, relay: Relay) -> None:
        pad = "x" * (16 * KB)
        data = json.dumps({"batch": [track(n, properties={"pad": pad})
                                     for n in range(32)]}).encode()
        response = await relay.client.post(
            "/v1/batch", content=gzip.compress(data),
            headers={**basic(WRITE_KEY), "Content-Encoding": "gzip"})
        assert_error(response, 400, "body_too_large")

    async def test_batch_just_under_500kb_is_accepted(self, relay: Relay) -> None:
        pad = "x" * (15 * KB)
        data = json.dumps({"batch": [track(n, properties={"pad": pad})
                                     for n in range(32)]}).encode()
        assert 480 * KB < len(data) <= 500 * KB
        response = await relay.client.post("/v1/batch", content=data, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert response.json()["accepted"] == 32

    async def test_single_message_over_32kb(self, relay: Relay) -> None:
        body = {**SINGLES["track"], "properties": {"pad": "x" * (33 * KB)}}
        assert_error(await relay.client.post("/v1/track", json=body, headers=basic(WRITE_KEY)),
                     400, "body_too_large")
        gz = gzip.compress(json.dumps(body).encode())
        response = await relay.client.post(
            "/v1/track", content=gz, headers={**basic(WRITE_KEY), "Content-Encoding": "gzip"})
        assert_error(response, 400, "body_too_large")
        assert relay.journaled == []
        await still_serving(relay)

    async def test_batch_item_over_32kb_is_rejected_alone(self, relay: Relay) -> None:
        body = {"batch": [track(0), track(1, properties={"pad": "x" * (33 * KB)}), track(2)]}
        response = await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        result = response.json()
        assert result["success"] is True
        assert result["accepted"] == 2
        assert [(r["index"], r["code"]) for r in result["rejected"]] == [(1, "message_too_large")]
        assert "32768" in result["rejected"][0]["message"]
        users = sorted(e["customer_ids"]["registered"] for e in await relay.events())
        assert users == ["u0", "u2"]

    async def test_more_than_2500_messages(self, relay: Relay) -> None:
        body = {"batch": [{"type": "track", "userId": "u", "event": "e"}] * 2501}
        assert_error(await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY)),
                     400, "batch_too_large")
        assert relay.journaled == []
        await still_serving(relay)

    async def test_exactly_2500_messages_pass_the_count_limit(self, relay: Relay) -> None:
        # Invalid items keep the test fast: the count limit is checked before validation.
        body = {"batch": [{"type": "track", "userId": "u"}] * 2500}
        response = await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        result = response.json()
        assert result["accepted"] == 0
        assert len(result["rejected"]) == 2500

    @pytest.mark.parametrize(("encoding", "content", "code"), [
        ("br", b"{}", "unsupported_encoding"),
        ("gzip", b"definitely not gzip", "invalid_body"),
        ("gzip", gzip.compress(b'{"batch": []}')[:-12], "invalid_body"),
    ])
    async def test_bad_encodings(
        self, relay: Relay, encoding: str, content: bytes, code: str
    ) -> None:
        response = await relay.client.post(
            "/v1/batch", content=content,
            headers={**basic(WRITE_KEY), "Content-Encoding": encoding})
        assert_error(response, 400, code)
        await still_serving(relay)

    async def test_data_after_the_gzip_stream_is_refused(self, relay: Relay) -> None:
        content = gzip.compress(b'{"batch": []}') + b"\0" * (600 * KB)
        response = await relay.client.post(
            "/v1/batch", content=content,
            headers={**basic(WRITE_KEY), "Content-Encoding": "gzip"})
        assert response.status_code == 400
        assert response.json()["code"] in {"invalid_body", "body_too_large"}
        await still_serving(relay)


class TestMalformed:
    """Bodies that are not a usable JSON object answer 400 with code and message."""

    @pytest.mark.parametrize(("path", "content", "code"), [
        ("/v1/track", b'{"userId": "u1", "event": ', "invalid_json"),
        ("/v1/batch", b'{"batch": [', "invalid_json"),
        ("/v1/track", b"", "invalid_json"),
        ("/v1/batch", b"", "invalid_json"),
        ("/v1/track", b'[{"userId": "u1", "event": "e"}]', "invalid_body"),
        ("/v1/batch", b'[{"type": "track"}]', "invalid_body"),
        ("/v1/track", b'"hello"', "invalid_body"),
        ("/v1/batch", b"42", "invalid_body"),
        ("/v1/batch", b'{"messages": []}', "missing_batch"),
        ("/v1/import", b"{}", "missing_batch"),
        ("/v1/batch", b'{"batch": {"type": "track"}}', "invalid_batch"),
        ("/v1/batch", b'{"batch": [], "context": []}', "invalid_batch"),
        ("/v1/track", b'{"userId": 1e999, "event": "e"}', "invalid_json"),
    ])
    async def test_400_with_code_and_message(
        self, relay: Relay, path: str, content: bytes, code: str
    ) -> None:
        response = await relay.client.post(path, content=content, headers={
            **basic(WRITE_KEY), "Content-Type": "application/json"})
        assert_error(response, 400, code)
        assert relay.journaled == []
        await still_serving(relay)


class TestDeepNesting:
    """Pathologically nested JSON is a clear 400, alone in a batch, never a server error."""

    async def test_single_message(self, relay: Relay) -> None:
        content = b'{"userId": "u", "event": "e", "properties": {"p": ' + b"[" * 5000 \
            + b"]" * 5000 + b"}}"
        response = await relay.client.post("/v1/track", content=content,
                                           headers=basic(WRITE_KEY))
        assert_error(response, 400, "too_deep")
        await still_serving(relay)

    async def test_batch_item_is_rejected_alone(self, relay: Relay) -> None:
        deep = {"p": 1}
        for _ in range(100):
            deep = {"p": deep}
        body = {"batch": [track(1), track(2, properties=deep), track(3)]}
        response = await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        result = response.json()
        assert result["accepted"] == 2
        assert [(r["index"], r["code"]) for r in result["rejected"]] == [(1, "too_deep")]
        assert len(await relay.events()) == 2

    async def test_unparseably_deep_batch(self, relay: Relay) -> None:
        content = b'{"batch": [' + json.dumps(track(1)).encode() + b", " + b"[" * 5000 \
            + b"]" * 5000 + b"]}"
        response = await relay.client.post("/v1/batch", content=content,
                                           headers=basic(WRITE_KEY))
        # Whether the JSON decoder can scan past 5,000 levels depends on the
        # interpreter: refused whole, or the deep item refused alone.
        if response.status_code == 400:
            assert_error(response, 400, "too_deep")
            assert relay.journaled == []
        else:
            body = response.json()
            assert (body["accepted"], [r["code"] for r in body["rejected"]]) == (1, ["too_deep"])
            assert body["rejected"][0]["index"] == 1
        await still_serving(relay)


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("track", {"event": "e"}, "missing_id"),
    ("identify", {"traits": {"a": 1}}, "missing_id"),
    ("alias", {"userId": "u1"}, "missing_id"),
    ("alias", {"previousId": "a1"}, "missing_id"),
    ("track", {"userId": "u1"}, "missing_event"),
    ("track", {"userId": "u1", "event": ""}, "missing_event"),
    ("group", {"userId": "u1"}, "missing_id"),
    ("track", {"userId": "", "event": "e"}, "invalid_id"),
    ("identify", {"anonymousId": "   "}, "invalid_id"),
    ("group", {"userId": "u1", "groupId": ""}, "invalid_id"),
    ("track", {"userId": ["u1"], "event": "e"}, "invalid_id"),
    ("track", {"userId": True, "event": "e"}, "invalid_id"),
    ("track", {"userId": "u1", "event": "e", "messageId": "m" * 101}, "invalid_message_id"),
    ("track", {"userId": "u1", "event": "e", "messageId": {"a": 1}}, "invalid_message_id"),
    ("track", {"userId": "u1", "event": "e", "timestamp": "yesterday"}, "invalid_timestamp"),
    ("track", {"userId": "u1", "event": "e", "originalTimestamp": "2024-13-45"},
     "invalid_timestamp"),
    ("track", {"userId": "u1", "event": "e", "sentAt": "noon"}, "invalid_timestamp"),
    ("track", {"userId": "u1", "event": "e", "timestamp": True}, "invalid_timestamp"),
    ("track", {"userId": "u1", "event": "e", "timestamp": 1e300}, "invalid_timestamp"),
    ("track", {"userId": "u1", "event": "e", "properties": [1, 2]}, "invalid_field"),
    ("identify", {"userId": "u1", "traits": "vip"}, "invalid_field"),
    ("track", {"userId": "u1", "event": "e", "context": ["x"]}, "invalid_field"),
    ("page", {"userId": "u1", "name": 5}, "invalid_field"),
]


class TestMessageValidation:
    """Invalid messages are refused with a reason code; valid ones beside them are delivered."""

    @pytest.mark.parametrize(("kind", "body", "code"), INVALID)
    async def test_single_endpoint_answers_400(
        self, relay: Relay, kind: str, body: dict[str, Any], code: str
    ) -> None:
        response = await relay.client.post(f"/v1/{kind}", json=body, headers=basic(WRITE_KEY))
        assert_error(response, 400, code)
        assert relay.journaled == []

    async def test_batch_rejects_each_invalid_item_and_delivers_the_rest(
        self, relay: Relay
    ) -> None:
        batch: list[dict[str, Any]] = []
        expected: list[tuple[int, str]] = []
        for n, (kind, body, code) in enumerate(INVALID):
            batch.append(track(1000 + n, event="Valid", properties={"n": n}))
            expected.append((len(batch), code))
            batch.append({"type": kind, **body})
        response = await relay.client.post("/v1/batch", json={"batch": batch},
                                           headers=basic(WRITE_KEY))
        assert response.status_code == 200
        result = response.json()
        assert result["accepted"] == len(INVALID)
        assert [(r["index"], r["code"]) for r in result["rejected"]] == expected
        assert all(r["message"] for r in result["rejected"])
        events = await relay.events()
        assert sorted(e["properties"]["n"] for e in events) == list(range(len(INVALID)))
        assert all(e["type"] == "Valid" for e in events)
        assert await relay.customers() == []
        metrics = relay.router.metrics
        assert metrics.get("messages_rejected_total") == len(INVALID)
        assert metrics.get("messages_rejected_total", reason="missing_event") == 2

    async def test_numeric_ids_are_delivered_as_strings(self, relay: Relay) -> None:
        headers = basic(WRITE_KEY)
        response = await relay.client.post(
            "/v1/track", json={"userId": 42, "anonymousId": 7, "event": "e"}, headers=headers)
        assert response.status_code == 200
        response = await relay.client.post(
            "/v1/group", json={"userId": 43, "groupId": 99}, headers=headers)
        assert response.status_code == 200
        response = await relay.client.post(
            "/v1/alias", json={"userId": 44, "previousId": 12.5}, headers=headers)
        assert response.status_code == 200
        [event] = await relay.events()
        assert event["customer_ids"] == {"registered": "42", "cookie": "7"}
        # Different customers may travel in different lanes: their order is not fixed.
        customers = sorted(await relay.customers(), key=lambda c: c["ids"]["registered"])
        assert customers[0]["ids"] == {"registered": "43"}
        assert customers[0]["properties"]["group_id"] == "99"
        assert customers[1]["ids"] == {"registered": "44", "cookie": "12.5"}

    async def test_missing_message_id_is_filled(self, relay: Relay) -> None:
        for _ in range(2):
            response = await relay.client.post(
                "/v1/track", json={"userId": "u1", "event": "e"}, headers=basic(WRITE_KEY))
            assert response.status_code == 200
        ids = [m["messageId"] for m in relay.journaled]
        assert len(ids) == 2 and ids[0] != ids[1]
        assert all(isinstance(i, str) and 0 < len(i) <= 100 for i in ids)
        assert len(await relay.events()) == 2

    async def test_message_id_of_100_characters_is_kept(self, relay: Relay) -> None:
        response = await relay.client.post(
            "/v1/track", json={"userId": "u1", "event": "e", "messageId": "m" * 100},
            headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert relay.journaled[0]["messageId"] == "m" * 100


class TestTime:
    """Event time: explicit timestamp kept, client skew corrected, naive times taken as UTC."""

    async def test_explicit_timestamp_is_kept(self, relay: Relay) -> None:
        body = {"userId": "u1", "event": "e", "timestamp": "2024-03-01T12:00:00.250+02:00",
                "originalTimestamp": "2020-01-01T00:00:00Z", "sentAt": "2020-01-01T00:00:05Z"}
        response = await relay.client.post("/v1/track", json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        [event] = await relay.events()
        assert event["timestamp"] == datetime(2024, 3, 1, 10, 0, 0, 250000, UTC).timestamp()

    async def test_skewed_client_clock_is_corrected(self, relay: Relay) -> None:
        now = time.time()
        client_now = now + 7200  # the client's clock runs two hours ahead
        body = {"batch": [track(1, originalTimestamp=iso(client_now - 60))],
                "sentAt": iso(client_now)}
        response = await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        [event] = await relay.events()
        assert event["timestamp"] == pytest.approx(now - 60, abs=3)

    async def test_item_sent_at_wins_over_the_envelope(self, relay: Relay) -> None:
        now = time.time()
        body = {"batch": [track(1, originalTimestamp=iso(now - 600), sentAt=iso(now - 300))],
                "sentAt": iso(now + 9999)}
        response = await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        [event] = await relay.events()
        assert event["timestamp"] == pytest.approx(now - 300, abs=3)

    async def test_without_sent_at_the_receive_time_is_used(self, relay: Relay) -> None:
        before = time.time()
        body = {"userId": "u1", "event": "e", "originalTimestamp": "2001-01-01T00:00:00Z"}
        response = await relay.client.post("/v1/track", json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        [event] = await relay.events()
        assert event["timestamp"] == pytest.approx(before, abs=3)

    async def test_naive_timestamps_are_utc(self, relay: Relay) -> None:
        body = {"batch": [
            track(1, timestamp="2024-03-01T12:00:00"),
            track(2, originalTimestamp="2024-03-01T11:59:00", sentAt="2024-03-01T12:00:00"),
        ]}
        before = time.time()
        response = await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        by_user = {e["customer_ids"]["registered"]: e["timestamp"]
                   for e in await relay.events()}
        assert by_user["u1"] == datetime(2024, 3, 1, 12, 0, tzinfo=UTC).timestamp()
        assert by_user["u2"] == pytest.approx(before - 60, abs=3)


class TestDedup:
    """A batch sent twice (a retry after a lost response) is delivered once."""

    async def test_same_batch_twice(self, relay: Relay) -> None:
        body = {"batch": [track(1), track(2), {"type": "identify", "userId": "u3",
                                               "messageId": "m3", "traits": {"a": 1}}]}
        first = await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
        assert first.json() == {"success": True, "accepted": 3, "duplicates": 0, "rejected": []}
        await relay.delivered()
        second = await relay.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
        assert second.status_code == 200
        assert second.json() == {"success": True, "accepted": 0, "duplicates": 3,
                                 "rejected": []}
        assert len(await relay.events()) == 2
        assert len(await relay.customers()) == 1
        assert relay.router.metrics.get("messages_duplicate_total") == 3

    async def test_dedup_is_per_write_key(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        config = relay_config(tmp_path, write_keys={WRITE_KEY: "proj", "wk2": "proj2"})
        async with open_router(config, http=True,
                               transport=httpx.MockTransport(infinario.handler)) as router:
            assert router.url is not None
            body = {"batch": [track(1)]}
            async with httpx.AsyncClient(base_url=router.url) as client:
                for key in (WRITE_KEY, "wk2", "wk2", WRITE_KEY):
                    response = await client.post("/v1/batch", json=body, headers=basic(key))
                    assert response.status_code == 200
            with trio.fail_after(10):
                await router.drain()
        assert sorted(c["data"]["project_id"] for c in infinario.commands) == ["proj", "proj2"]

    async def test_dedup_survives_a_restart(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        config = relay_config(tmp_path)
        body = {"batch": [track(1), track(2)]}
        for expected in ({"accepted": 2, "duplicates": 0}, {"accepted": 0, "duplicates": 2}):
            async with open_router(config, http=True,
                                   transport=httpx.MockTransport(infinario.handler)) as router:
                assert router.url is not None
                async with httpx.AsyncClient(base_url=router.url) as client:
                    response = await client.post("/v1/batch", json=body,
                                                 headers=basic(WRITE_KEY))
                assert response.status_code == 200
                assert {k: response.json()[k] for k in expected} == expected
                with trio.fail_after(10):
                    await router.drain()
        assert len(infinario.commands) == 2

    async def test_dedup_window_expires(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        config = relay_config(tmp_path, dedup_window=0.2)
        async with open_router(config, http=True,
                               transport=httpx.MockTransport(infinario.handler)) as router:
            assert router.url is not None
            async with httpx.AsyncClient(base_url=router.url) as client:
                body = {"batch": [track(1)]}
                await client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
                # Past the window and at least one sweep (every half window).
                await trio.sleep(0.5)
                response = await client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
            assert response.json()["accepted"] == 1
            with trio.fail_after(10):
                await router.drain()
        assert len(infinario.commands) == 2

    async def test_partial_overlap_and_single_endpoint(self, relay: Relay) -> None:
        headers = basic(WRITE_KEY)
        await relay.client.post("/v1/batch", json={"batch": [track(1), track(2)]},
                                headers=headers)
        response = await relay.client.post("/v1/batch", json={"batch": [track(2), track(3)]},
                                           headers=headers)
        assert response.json()["accepted"] == 1
        assert response.json()["duplicates"] == 1
        response = await relay.client.post("/v1/track", json=track(3), headers=headers)
        assert response.status_code == 200
        assert response.json() == {"success": True}
        users = sorted(e["customer_ids"]["registered"] for e in await relay.events())
        assert users == ["u1", "u2", "u3"]


class TestResilience:
    """The relay keeps serving on the same connection after any bad request."""

    async def test_bad_requests_then_a_good_one(self, relay: Relay) -> None:
        headers = basic(WRITE_KEY)
        bad: list[tuple[str, Any, dict[str, str]]] = [
            ("/v1/batch", b"{nope", headers),
            ("/v1/batch", b"[]", headers),
            ("/v1/batch", b"{}", headers),
            ("/v1/track", b'{"event": "e"}', headers),
            ("/v1/track", b'{"userId": "u", "event": "e"}', basic("nope")),
            ("/v1/batch", b"\x1f\x8b garbage", {**headers, "Content-Encoding": "gzip"}),
            ("/v1/batch", b"x" * (600 * KB), headers),
            ("/v1/track", b"x" * (40 * KB), headers),
        ]
        for path, content, request_headers in bad:
            response = await relay.client.post(path, content=content, headers=request_headers)
            assert response.status_code in (400, 401), (path, response.text)
            assert set(response.json()) == {"code", "message"}
        await still_serving(relay)
        assert relay.router.metrics.get("requests_total", status="400") == 7
        assert relay.router.metrics.get("requests_total", status="401") == 1


class TestConnectionReuse:
    """A refused body is drained so its connection serves the next request, or is closed."""

    AUTH = basic(WRITE_KEY)
    GOOD = json.dumps({"userId": "u1", "event": "Kept Alive"}).encode()

    async def test_oversize_and_bomb_then_a_good_request(self, relay: Relay) -> None:
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        bomb = b"".join(packer.compress(b"\0" * (1024 * KB)) for _ in range(20))
        bomb += packer.flush()
        refused: list[tuple[str, bytes, dict[str, str]]] = [
            ("/v1/batch", b"x" * (600 * KB), self.AUTH),
            ("/v1/track", b"x" * (40 * KB), self.AUTH),
            ("/v1/batch", bomb, {**self.AUTH, "Content-Encoding": "gzip"}),
            ("/v1/track", bomb, {**self.AUTH, "Content-Encoding": "gzip"}),
            ("/v1/batch", b"{}", self.AUTH),
        ]
        conn = await RawConnection.open(relay.url)
        for path, body, headers in refused:
            await conn.post(path, body, headers)
            status, response_headers, answer = await conn.response()
            assert status == 400
            assert answer["code"] in {"body_too_large", "missing_batch"}
            if response_headers.get("connection", "").lower() == "close":
                # A body refused half-read is not worth reading on: the answer
                # arrives whole and the client opens a new connection.
                assert await conn.closed_by_server()
                await conn.stream.aclose()
                conn = await RawConnection.open(relay.url)
            await conn.post("/v1/track", self.GOOD, {**self.AUTH,
                                                     "Content-Type": "application/json"})
            status, _, answer = await conn.response()
            assert (status, answer) == (200, {"success": True})
        await conn.stream.aclose()
        assert len(await relay.events("Kept Alive")) == len(refused)

    async def test_endless_body_gets_connection_close(self, relay: Relay) -> None:
        conn = await RawConnection.open(relay.url)
        await conn.send_head("/v1/batch", {**self.AUTH, "Content-Length": str(50 * 1024 * KB)})
        await conn.stream.send_all(b"x" * (1024 * KB + 1))
        status, headers, answer = await conn.response()
        assert status == 400
        assert answer["code"] == "body_too_large"
        assert headers["connection"].lower() == "close"
        assert await conn.closed_by_server()
        await still_serving(relay)


class TestOverload:
    """A full pipeline or a stopping relay answers 503 with Retry-After, so clients retry."""

    async def test_pipeline_full(self, relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
        async def full(write_key: str, messages: Any, items: Any, shared: Any = None,
                       contexts: Any = None) -> Any:
            raise Overloaded("pipeline is full")

        monkeypatch.setattr(relay.router, "accept", full)
        for path, body in (("/v1/track", SINGLES["track"]), ("/v1/batch", {"batch": [track(1)]})):
            response = await relay.client.post(path, json=body, headers=basic(WRITE_KEY))
            assert_error(response, 503, "overloaded")
            assert int(response.headers["retry-after"]) > 0
        assert relay.router.metrics.get("overloaded_total", reason="pipeline is full") == 2
        monkeypatch.undo()
        await still_serving(relay)

    async def test_shutting_down(self, relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(relay.router, "state", State.DRAINING)
        response = await relay.client.post("/v1/batch", json={"batch": [track(1)]},
                                           headers=basic(WRITE_KEY))
        assert_error(response, 503, "unavailable")
        assert int(response.headers["retry-after"]) > 0
        assert relay.journaled == []


class TestHealthAndMetrics:
    """/health reports ok and /metrics serves Prometheus text with the request counter."""

    async def test_health(self, relay: Relay) -> None:
        response = await relay.client.get("/health")
        assert response.status_code == 200
        assert response.json()["status"] == "ok"

    async def test_metrics(self, relay: Relay) -> None:
        await relay.client.post("/v1/track", json=SINGLES["track"], headers=basic(WRITE_KEY))
        await relay.client.post("/v1/track", json=SINGLES["track"], headers=basic("nope"))
        response = await relay.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        assert "# TYPE router_requests_total counter" in text
        assert 'router_requests_total{endpoint="single",status="200"} 1.0' in text
        assert 'router_requests_total{endpoint="single",status="401"} 1.0' in text
        assert "router_messages_accepted_total 1.0" in text
