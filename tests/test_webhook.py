"""POST /v1/webhook: what Segment's webhook destination sends, signed or not."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from router import config as cfg

from .conftest import WRITE_KEY, Relay
from .test_intake import KB, assert_error, basic, track

SECRET = "s3cret-for-webhooks"


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


class TestSingleMessage:
    """One message object: its own type, 200 {"success": true}, delivered."""

    async def test_track_with_basic_auth(self, relay: Relay) -> None:
        response = await relay.client.post("/v1/webhook", json=track(1, properties={"a": 1}),
                                           headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert response.json() == {"success": True}
        events = await relay.events("Clicked")
        assert [e["customer_ids"] for e in events] == [{"registered": "u1"}]
        assert events[0]["properties"]["a"] == 1

    async def test_write_key_in_the_message(self, relay: Relay) -> None:
        message = {"type": "identify", "userId": "ada", "traits": {"plan": "pro"},
                   "writeKey": WRITE_KEY}
        response = await relay.client.post("/v1/webhook", json=message)
        assert (response.status_code, response.json()) == (200, {"success": True})
        assert any(c.get("properties", {}).get("plan") == "pro" for c in await relay.customers())

    async def test_invalid_message_is_400(self, relay: Relay) -> None:
        response = await relay.client.post("/v1/webhook", json={"type": "track", "userId": "u"},
                                           headers=basic(WRITE_KEY))
        assert_error(response, 400, "missing_event")
        response = await relay.client.post("/v1/webhook", json={"userId": "u"},
                                           headers=basic(WRITE_KEY))
        assert_error(response, 400, "invalid_type")
        assert relay.journaled == []

    async def test_no_or_unknown_write_key_is_401(self, relay: Relay) -> None:
        assert_error(await relay.client.post("/v1/webhook", json=track(1)), 401,
                     "missing_write_key")
        assert_error(await relay.client.post("/v1/webhook", json=track(1),
                                             headers=basic("nope")), 401, "invalid_write_key")
        assert relay.journaled == []

    async def test_message_over_32kb_is_400(self, relay: Relay) -> None:
        big = track(1, properties={"pad": "x" * (33 * KB)})
        response = await relay.client.post("/v1/webhook", json=big, headers=basic(WRITE_KEY))
        assert_error(response, 400, "message_too_large")


class TestArray:
    """An array (the destination's batching): invalid messages are rejected alone."""

    async def test_mixed_array(self, relay: Relay) -> None:
        messages = [track(1), {"type": "track", "userId": "u2"},
                    {"type": "page", "anonymousId": "a3", "name": "Home", "messageId": "p3"},
                    track(4, properties={"pad": "x" * (33 * KB)}), {"type": "nope", "userId": "u"}]
        response = await relay.client.post("/v1/webhook", json=messages,
                                           headers=basic(WRITE_KEY))
        assert response.status_code == 200
        body = response.json()
        assert body["success"] is True
        assert (body["accepted"], body["duplicates"]) == (2, 0)
        assert [(r["index"], r["code"]) for r in body["rejected"]] == [
            (1, "missing_event"), (3, "message_too_large"), (4, "invalid_type")]
        assert [m["type"] for m in relay.journaled] == ["track", "page"]
        assert len(await relay.events("page_visit")) == 1
        assert len(await relay.events("Clicked")) == 1

    async def test_resent_array_is_deduplicated(self, relay: Relay) -> None:
        messages = [track(n) for n in range(3)]
        for expected in ((3, 0), (0, 3)):
            response = await relay.client.post("/v1/webhook", json=messages,
                                               headers=basic(WRITE_KEY))
            body = response.json()
            assert (body["accepted"], body["duplicates"]) == expected
        assert len(await relay.events("Clicked")) == 3

    async def test_write_key_per_message(self, relay: Relay) -> None:
        messages = [{**track(1), "writeKey": WRITE_KEY}, track(2),
                    {**track(3), "writeKey": "nope"}]
        response = await relay.client.post("/v1/webhook", json=messages)
        assert response.status_code == 200
        assert [(r["index"], r["code"]) for r in response.json()["rejected"]] == [
            (1, "missing_write_key"), (2, "invalid_write_key")]
        assert [m["userId"] for m in relay.journaled] == ["u1"]

    async def test_array_without_any_write_key_is_401(self, relay: Relay) -> None:
        response = await relay.client.post("/v1/webhook", json=[track(1), track(2)])
        assert_error(response, 401, "missing_write_key")
        assert relay.journaled == []

    async def test_limits(self, relay: Relay) -> None:
        too_many = [{"type": "track", "userId": "u", "event": "e"}] * 2501
        response = await relay.client.post("/v1/webhook", json=too_many,
                                           headers=basic(WRITE_KEY))
        assert_error(response, 400, "batch_too_large")
        huge = [track(n, properties={"pad": "x" * (30 * KB)}) for n in range(20)]
        response = await relay.client.post("/v1/webhook", json=huge, headers=basic(WRITE_KEY))
        assert response.status_code in (400, 413)
        assert response.json()["code"] == "body_too_large"
        assert_error(await relay.client.post("/v1/webhook", content=b"[{nope",
                                             headers=basic(WRITE_KEY)), 400, "invalid_json")
        assert relay.journaled == []


class TestSignature:
    """With a webhook secret, X-Signature (HMAC-SHA1 of the body) is required."""

    @pytest.fixture
    def relay_options(self) -> dict[str, Any]:
        return {"webhook_secret": SECRET}

    async def test_signed_array_is_accepted(self, relay: Relay) -> None:
        body = as_json([track(1), track(2)])
        response = await relay.client.post(
            "/v1/webhook", content=body,
            headers={**basic(WRITE_KEY), "Content-Type": "application/json",
                     "X-Signature": sign(body)})
        assert response.status_code == 200
        assert response.json()["accepted"] == 2
        assert len(await relay.events("Clicked")) == 2

    async def test_gzip_body_is_signed_as_inflated(self, relay: Relay) -> None:
        body = as_json(track(1))
        response = await relay.client.post(
            "/v1/webhook", content=gzip.compress(body),
            headers={**basic(WRITE_KEY), "Content-Encoding": "gzip", "X-Signature": sign(body)})
        assert (response.status_code, response.json()) == (200, {"success": True})

    @pytest.mark.parametrize("signature", [None, "", "0" * 40, sign(b"other body"),
                                           sign(as_json(track(1)), "wrong secret")])
    async def test_bad_signature_keeps_nothing(self, relay: Relay,
                                               signature: str | None) -> None:
        body = as_json(track(1))
        headers = basic(WRITE_KEY)
        if signature is not None:
            headers["X-Signature"] = signature
        response = await relay.client.post("/v1/webhook", content=body, headers=headers)
        assert_error(response, 401, "invalid_signature")
        assert SECRET not in response.text
        assert relay.journaled == []
        assert relay.router.metrics.get("webhook_signature_failures_total") == 1
        assert relay.router.metrics.get("requests_total", endpoint="webhook", status="401") == 1

    async def test_other_endpoints_need_no_signature(self, relay: Relay) -> None:
        response = await relay.client.post("/v1/track", json=track(1), headers=basic(WRITE_KEY))
        assert response.status_code == 200

    async def test_secret_is_never_shown(self, relay: Relay) -> None:
        assert relay.router.config.redacted()["webhook_secret"] == "***"
        assert SECRET not in (await relay.client.get("/metrics")).text


class TestSettings:
    """The secret and the admin address come from flags, the environment or the TOML file."""

    def test_sources(self, tmp_path: Path) -> None:
        path = tmp_path / "r.toml"
        path.write_text('webhook_secret = "from-file"\nadmin_listen = "127.0.0.1:9091"\n')
        from_toml = cfg.load(toml=cfg.read_toml(path), env={})
        assert (from_toml.webhook_secret, from_toml.admin_listen) == ("from-file",
                                                                      "127.0.0.1:9091")
        from_env = cfg.load(toml=cfg.read_toml(path), env={
            "ROUTER_WEBHOOK_SECRET": "from-env", "ROUTER_ADMIN_LISTEN": "127.0.0.1:9092"})
        assert (from_env.webhook_secret, from_env.admin_listen) == ("from-env",
                                                                    "127.0.0.1:9092")
        from_flags = cfg.load(env={}, flags={"webhook_secret": "flag",
                                             "admin_listen": "0.0.0.0:9093"})
        assert (from_flags.webhook_secret, from_flags.admin_listen) == ("flag", "0.0.0.0:9093")
        assert cfg.load(env={}).admin_listen is None


class TestSecretNotLogged:
    """Neither a start nor a refused signature puts the secret in a log line."""

    @pytest.fixture
    def relay_options(self) -> dict[str, Any]:
        return {"webhook_secret": SECRET}

    async def test_logs(self, relay: Relay) -> None:
        with structlog.testing.capture_logs() as logs:
            response = await relay.client.post("/v1/webhook", json=track(1),
                                               headers={**basic(WRITE_KEY), "X-Signature": "x"})
            assert response.status_code == 401
            relay.router.stop()
        assert SECRET not in repr(logs)
