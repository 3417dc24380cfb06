from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from router import logs


def redact(**event: Any) -> dict[str, Any]:
    return dict(logs.redact(None, "info", dict(event)))


class TestRedactProcessor:
    """Secret-named values become short fingerprints and URL passwords become ``***``."""

    @pytest.mark.parametrize("key", ["project", "project_token", "token", "auth",
                                     "authorization", "password", "secret", "write_key",
                                     "Authorization", "infinario_auth", "api_token"])
    def test_secret_keys_are_fingerprinted(self, key: str) -> None:
        assert redact(**{key: "PROJECT_TOKEN_A"})[key] == "PROJ…"

    def test_fingerprints_tell_projects_apart_and_are_stable(self) -> None:
        first = redact(project="alpha-project-token")["project"]
        assert first == redact(project="alpha-project-token")["project"] == "alph…"
        assert first != redact(project="beta-project-token")["project"]

    def test_short_secrets_show_little(self) -> None:
        assert redact(password="abc")["password"] == "…"
        assert redact(password="abcde")["password"] == "…"
        assert redact(token="abcdefghi")["token"] == "abc…"

    def test_other_keys_are_left_alone(self) -> None:
        event = redact(event="router started", projects=3, status=200, api="v2",
                       customer="ada")
        assert event == {"event": "router started", "projects": 3, "status": 200,
                         "api": "v2", "customer": "ada"}

    def test_non_text_secrets(self) -> None:
        assert redact(secret=1234)["secret"] == "***"
        assert redact(token=None)["token"] is None
        assert redact(project=["PROJECT_A1", "PROJECT_B1"])["project"] == ["PRO…", "PRO…"]

    def test_urls_lose_their_passwords_anywhere(self) -> None:
        event = redact(infinario="https://user:hunter2@api.example.com/bulk",
                       error="POST https://u:p%40ss@h:8443/x failed",
                       nested={"url": "http://a:b@c", "headers": {"Authorization": "Token SECRET"}})
        assert event["infinario"] == "https://user:***@api.example.com/bulk"
        assert event["error"] == "POST https://u:***@h:8443/x failed"
        assert event["nested"] == {"url": "http://a:***@c", "headers": {"Authorization": "Toke…"}}

    def test_url_without_password_is_unchanged(self) -> None:
        assert redact(url="https://user@host/a@b")["url"] == "https://user@host/a@b"


class TestRedactedOutput:
    """What the configured logger writes carries no secret."""

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_captured_output(self, fmt: str) -> None:
        code = (
            "import structlog\n"
            "from router import logs\n"
            f"logs.configure('info', {fmt!r})\n"
            "structlog.get_logger('t').warning('delivery failed', project='PROJECT_TOKEN_A',\n"
            "    url='https://user:hunter2@api.example.com', auth='token:PUBLIC_API_TOKEN',\n"
            "    count=2)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        for secret in ("PROJECT_TOKEN_A", "hunter2", "PUBLIC_API_TOKEN"):
            assert secret not in result.stderr
        if fmt == "json":
            record = json.loads(result.stderr)
            assert record["project"] == "PROJ…"
            assert record["url"] == "https://user:***@api.example.com"
            assert record["auth"] == "toke…"
            assert record["count"] == 2
        else:
            assert "PROJ…" in result.stderr and "user:***@" in result.stderr
