"""Starting the relay as its own process (the real CLI) for crash and CLI tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


class RelayProcess:
    """``python -m router serve`` on an ephemeral port; its URL is read from its log."""

    def __init__(self, data_dir: Path, infinario_url: str, *extra: str,
                 write_key: str = "crash-key=crash-project",
                 env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.env = env or {}
        self.args = [
            sys.executable, "-m", "router", "serve", "--listen", "127.0.0.1:0",
            "--infinario-url", infinario_url, "--write-key", write_key,
            "--data-dir", str(data_dir), "--grace", "2", *extra,
        ]
        self.preexec_fn = preexec_fn  # runs in the child before exec (resource limits)
        self.proc: subprocess.Popen[str] | None = None
        self.url: str | None = None
        self.log: list[str] = []
        self._started = threading.Event()

    def start(self, timeout: float = 30.0) -> str:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, env=env, preexec_fn=self.preexec_fn)
        assert self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()
        if not self._started.wait(timeout):
            self.kill()
            raise RuntimeError("relay did not start:\n" + "\n".join(self.log[-20:]))
        assert self.url is not None
        return self.url

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.log.append(line.rstrip())
            if self.url is None and '"router started"' in line:
                try:
                    self.url = json.loads(line)["url"]
                except (ValueError, KeyError):
                    continue
                self._started.set()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.kill()
            raise TimeoutError("relay did not exit")
        return self.proc.returncode


class SimulatorProcess:
    """``python -m router.simulator`` on an ephemeral port; its URL is read from its first line."""

    def __init__(self, *extra: str) -> None:
        self.extra = extra  # more options, e.g. --delay SECONDS
        self.proc: subprocess.Popen[str] | None = None
        self.url: str | None = None

    def start(self, timeout: float = 30.0) -> str:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.simulator", "--listen", "127.0.0.1:0", *self.extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stderr is not None
        found = threading.Event()

        def read(stream: IO[str]) -> None:
            for line in stream:
                if self.url is None and line.startswith("simulator: listening on "):
                    self.url = line.split()[3]
                    found.set()

        threading.Thread(target=read, args=(self.proc.stderr,), daemon=True).start()
        if not found.wait(timeout):
            self.stop()
            raise RuntimeError("the simulator did not start")
        assert self.url is not None
        return self.url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
