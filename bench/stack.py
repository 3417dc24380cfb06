"""The processes of one scenario: the simulator, the relay, load runs and the sampler.

Everything is a separate process started through the real command lines, on
127.0.0.1 only, and everything started here is stopped here, also on errors.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import msgspec
import psutil  # type: ignore[import-untyped]
import trio

from .data import PROJECT, WRITE_KEY
from .measure import BUCKET, Requests, Sample, Timeline, cpu_seconds, proc_status_kb

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
SESSION_EVENTS = ("session_start", "session_end")


class BenchError(Exception):
    """A scenario could not run as planned (a process died, a wait ran out)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def delivered_messages(stats: dict[str, Any]) -> tuple[int, int]:
    """(messages, commands) the simulator took with an ``ok``.

    Every message but a session event is exactly one command, so messages =
    commands - session_start - session_end. Commands answered ``error`` or
    ``retry`` were not delivered.
    """
    commands = int(stats.get("commands", 0)) - int(stats.get("errors", 0)) \
        - int(stats.get("retries", 0))
    by_type = stats.get("events_by_type") or {}
    sessions = sum(int(by_type.get(name, 0)) for name in SESSION_EVENTS)
    return commands - sessions, commands


class Process:
    """A child process with its stderr in a file; ``stop`` always leaves it dead."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.popen is None:
            return None
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(10)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
            if self._log is not None:
                self._log.close()
                self._log = None
        return self.popen.returncode

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]


async def wait_http(proc: Process, url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited with status {proc.popen.returncode}"
                                 if proc.popen else f"{proc.name} did not start")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.1)
    raise BenchError(f"{proc.name} did not answer {url} within {seconds:.0f}s")


async def run_load(args: Sequence[str], out: Path, duration: float) -> Requests:
    """Run a ``bench.load`` command line to completion and read what it wrote to ``out``."""
    with trio.fail_after(duration + 60):
        result = await trio.run_process(args, stdout=subprocess.DEVNULL,
                                        capture_stderr=True, check=False)
    requests = _read_requests(out) if result.returncode == 0 else None
    if requests is None:
        raise BenchError(f"load generator failed ({result.returncode}):\n"
                         + result.stderr.decode(errors="replace")[-2000:])
    return requests


def _read_requests(path: Path) -> Requests | None:
    if not path.exists():
        return None
    return Requests.from_json(msgspec.json.decode(path.read_bytes()))


class Stack:
    """The simulator and the relay for one scenario, plus the sampler's view of them."""

    def __init__(self, workdir: Path, *, relay_options: Sequence[str] = (),
                 sim_options: Sequence[str] = ()) -> None:
        self.workdir = workdir
        sim_port, relay_port = free_port(), free_port()
        self.sim_url = f"http://{HOST}:{sim_port}"
        self.relay_url = f"http://{HOST}:{relay_port}"
        self.sim = Process("simulator", [
            sys.executable, "-m", "router.simulator", "--listen", f"{HOST}:{sim_port}",
            "--counting", *sim_options], workdir / "simulator.log")
        self.relay_options = list(relay_options)
        self.relay = Process("relay", [
            sys.executable, "-m", "router", "serve", "--listen", f"{HOST}:{relay_port}",
            "--infinario-url", self.sim_url, "--write-key", f"{WRITE_KEY}={PROJECT}",
            "--data-dir", str(workdir / "data"), "--log-level", "warning",
            *relay_options], workdir / "relay.log")
        self.timeline = Timeline()
        self.http = httpx.AsyncClient(timeout=5.0)
        self.peak_rss_mb: float | None = None
        self.relay_exit: int | None = None
        self.latest: Sample | None = None
        self.loads: list[Requests] = []

    async def start(self) -> None:
        self.sim.start()
        self.relay.start()
        await wait_http(self.sim, f"{self.sim_url}/_sim/stats", START_TIMEOUT)
        await wait_http(self.relay, f"{self.relay_url}/health", START_TIMEOUT)
        self._psutil = psutil.Process(self.relay.pid)

    def stop(self) -> None:
        """Record the relay's peak RSS, then stop both processes (always)."""
        try:
            if self.relay.alive():
                hwm = proc_status_kb(self.relay.pid, "VmHWM")
                if hwm is not None:
                    self.peak_rss_mb = hwm / 1024
        finally:
            try:
                self.relay_exit = self.relay.stop()
            finally:
                self.sim.stop(5.0)

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- the simulator's side ------------------------------------------------------------

    async def sim_stats(self) -> dict[str, Any]:
        response = await self.http.get(f"{self.sim_url}/_sim/stats")
        response.raise_for_status()
        return msgspec.json.decode(response.content)  # type: ignore[no-any-return]

    async def fail_requests(self, status: int = 503) -> None:
        response = await self.http.post(f"{self.sim_url}/_sim/faults",
                                        json={"fail_requests": {"status": status}})
        response.raise_for_status()

    async def clear_faults(self) -> None:
        response = await self.http.delete(f"{self.sim_url}/_sim/faults")
        response.raise_for_status()

    # --- sampling ------------------------------------------------------------------------

    async def sample_forever(self) -> None:
        """Every ``BUCKET`` seconds: relay RSS and CPU, simulator counts."""
        next_at = time.monotonic()
        while True:
            await self.sample_once()
            next_at += BUCKET
            await trio.sleep(max(0.0, next_at - time.monotonic()))

    async def sample_once(self) -> Sample:
        delivered = commands = None
        stats = None
        try:
            stats = await self.sim_stats()
            delivered, commands = delivered_messages(stats)
        except (httpx.HTTPError, msgspec.DecodeError, ValueError, TypeError):
            pass
        rss = proc_status_kb(self.relay.pid, "VmRSS")
        sample = Sample(t=time.monotonic(), rss_mb=None if rss is None else rss / 1024,
                        cpu_s=cpu_seconds(self._psutil), delivered=delivered, commands=commands,
                        stats=stats)
        self.timeline.samples.append(sample)
        self.latest = sample
        return sample

    def check_relay(self) -> None:
        if not self.relay.alive():
            code = self.relay.popen.returncode if self.relay.popen else None
            raise BenchError(f"the relay exited with status {code}; last log lines:\n"
                             + "\n".join(self.relay.log_tail()))

    async def wait_delivered(self, target: int, seconds: float) -> Sample | None:
        """Wait until the simulator has ``target`` messages: the first sample showing it, or
        None when ``seconds`` ran out first."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check_relay()
            sample = self.latest
            if sample is not None and sample.delivered is not None \
                    and sample.delivered >= target:
                return sample
            await trio.sleep(BUCKET / 2)
        return None

    def acked(self) -> int:
        """Messages the relay acknowledged over every load run so far."""
        return sum(r.acked() for r in self.loads)

    async def relay_metrics(self) -> dict[str, float]:
        """The relay's unlabelled ``router_*`` Prometheus values."""
        try:
            response = await self.http.get(f"{self.relay_url}/metrics")
        except httpx.HTTPError:
            return {}
        out: dict[str, float] = {}
        for line in response.text.splitlines():
            if line.startswith("router_") and "{" not in line:
                name, _, value = line.partition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out

    # --- load ----------------------------------------------------------------------------

    async def load(self, label: str, *, kind: str, mode: str, duration: float,
                   connections: int, rate: float = 0.0, customers: int = 10_000,
                   max_messages: int = 0, batch_size: int = 100) -> Requests:
        """Run ``python -m bench.load`` to completion and read its results."""
        seq_start = max((r.info["seq_end"] for r in self.loads), default=0)
        out = self.workdir / f"load-{len(self.loads)}-{label}.json"
        args = [sys.executable, "-m", "bench.load", "--url", self.relay_url, "--kind", kind,
                "--mode", mode, "--duration", str(duration), "--connections", str(connections),
                "--customers", str(customers), "--batch-size", str(batch_size),
                "--seq-start", str(seq_start), "--out", str(out)]
        if rate:
            args += ["--rate", f"{rate:.1f}"]
        if max_messages:
            args += ["--max-messages", str(max_messages)]
        requests = await run_load(args, out, duration)
        requests.info["label"] = label
        self.loads.append(requests)
        self.timeline.phases.append((requests.start, requests.end, label))
        return requests
