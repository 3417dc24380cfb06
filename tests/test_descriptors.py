"""Descriptors: a relay at a low open-files limit stays responsive under connection abuse."""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from router.cli import raise_descriptor_limit

from .e2e.processes import RelayProcess

LIMIT = 1024
CAP = 1010  # a bit under the limit: the database, its log and the listener need a few
CHURN = 2000
SLOW = 1000


def lower_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


@contextlib.contextmanager
def own_descriptors(needed: int) -> Iterator[None]:
    """Let this test process hold ``needed`` sockets, restoring its limit afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the open-files hard limit ({hard}) is below the {needed} this test needs")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class TestDescriptorLimit:
    """The soft limit goes up to the hard one; the connection cap decides, not EMFILE."""

    def test_soft_limit_is_raised_to_the_hard_limit(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            if hard != resource.RLIM_INFINITY and hard > 64:
                resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
                assert raise_descriptor_limit() == hard
                assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def test_churn_and_slow_clients_do_not_lock_out_a_normal_client(
        self, tmp_path: Path
    ) -> None:
        relay = RelayProcess(tmp_path / "data", "http://127.0.0.1:9", "--max-connections",
                             str(CAP), write_key="k=p", preexec_fn=lower_limit)
        with own_descriptors(SLOW + 200):
            url = relay.start()
            parts = urlsplit(url)
            address = (parts.hostname or "127.0.0.1", parts.port or 0)
            slow: list[socket.socket] = []
            try:
                for _ in range(CHURN):
                    with socket.create_connection(address, timeout=5):
                        pass
                time.sleep(0.5)  # the relay closes them as it reads their end
                for _ in range(SLOW):
                    sock = socket.create_connection(address, timeout=5)
                    slow.append(sock)
                    sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: relay\r\nX-Slow: ")
                for _ in range(3):  # a byte at a time, well inside the header timeout
                    for sock in slow:
                        sock.sendall(b"a")
                    time.sleep(0.3)
                started = time.monotonic()
                response = httpx.post(f"{url}/v1/track", auth=("k", ""), timeout=5, json={
                    "type": "track", "userId": "u", "event": "Normal"})
                elapsed = time.monotonic() - started
                assert response.status_code == 200, response.text
                assert elapsed < 1.0
                assert relay.proc is not None and relay.proc.poll() is None
            finally:
                for sock in slow:
                    sock.close()
                relay.kill()
        assert not any("Traceback" in line for line in relay.log)
