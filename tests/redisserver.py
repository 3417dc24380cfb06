"""A real redis-server on a loopback port, started with the shipped deploy/redis.conf."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "redis.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process in its own directory; ``stop()`` ends it (kill -9 with ``hard``)."""

    def __init__(self, directory: Path, port: int | None = None, *extra: str) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", str(CONFIG), "--port", str(self.port), "--dir", str(self.directory),
             *self.extra],
            stdout=(self.directory / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited at start: {log[-500:]}")
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout} s")

    def cli(self, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, timeout=10)
        return done.stdout.strip()

    def stop(self, hard: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if hard:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def required() -> bool:
    """In CI the Redis tests must run: a missing redis-server is a failure, not a skip."""
    return bool(os.environ.get("CI"))
