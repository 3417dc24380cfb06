"""The processes of one scenario: the simulator, the relay, load runs and the sampler.

Everything is a separate process started through the real command lines, on
127.0.0.1 only, and everything started here is stopped here, also on errors.
``ClusterStack`` is the Redis mode's: a redis-server with the shipped
``deploy/redis.conf`` and relay processes sharing it (``--redis ... --role all``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import msgspec
import psutil  # type: ignore[import-untyped]
import trio

from .data import PROJECT, WRITE_KEY
from .measure import BUCKET, Requests, Sample, Timeline, cpu_seconds, proc_status_kb

HOST = "127.0.0.1"
REDIS_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "redis.conf"
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

    def commands(self) -> dict[str, list[str]]:
        """Every process's command line, by name."""
        return {"relay": self.relay.args, "simulator": self.sim.args}

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

    async def delivered_now(self) -> tuple[dict[str, Any] | None, int | None, int | None]:
        """The simulator's stats and the messages and commands delivered, or Nones when it
        did not answer."""
        try:
            stats = await self.sim_stats()
            delivered, commands = delivered_messages(stats)
        except (httpx.HTTPError, msgspec.DecodeError, ValueError, TypeError):
            return None, None, None
        return stats, delivered, commands

    async def sample_once(self) -> Sample:
        stats, delivered, commands = await self.delivered_now()
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
                   max_messages: int = 0, batch_size: int = 100,
                   urls: Sequence[str] = ()) -> Requests:
        """Run ``python -m bench.load`` to completion and read its results; its
        connections are dealt over ``urls`` (default: the relay)."""
        seq_start = max((r.info["seq_end"] for r in self.loads), default=0)
        out = self.workdir / f"load-{len(self.loads)}-{label}.json"
        targets = [a for url in (urls or [self.relay_url]) for a in ("--url", url)]
        args = [sys.executable, "-m", "bench.load", *targets, "--kind", kind,
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


# --- the Redis mode --------------------------------------------------------------------------

async def redis_call(port: int, *args: str | int) -> Any:
    """One command to the redis-server on ``port``: its reply (bytes, int, list or None)."""
    parts = [str(a).encode() for a in args]
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)
    with trio.fail_after(5):
        async with await trio.open_tcp_stream(HOST, port) as stream:
            await stream.send_all(request)
            reader = _Replies(stream)
            return await reader.reply()


class _Replies:
    """Just enough of RESP2 for the bench's look at Redis."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise BenchError("redis closed the connection")
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    async def reply(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise BenchError(f"redis: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise BenchError("redis closed the connection")
                self.buf += chunk
            data = bytes(self.buf[:n])
            del self.buf[:n + 2]
            return data
        if kind == b"*":
            return [await self.reply() for _ in range(max(0, int(rest)))]
        raise BenchError(f"redis: unexpected reply {line[:40]!r}")


def redis_info(text: bytes) -> dict[str, str]:
    """``INFO``'s ``name:value`` lines."""
    out = {}
    for line in text.decode(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            out[name] = value.strip()
    return out


class ClusterStack(Stack):
    """Redis, the simulator and up to ``relays`` relay processes of the Redis mode.

    The first relay starts with the stack, the others on ``add_relay``. The
    sampler's ``cpu_s`` and ``rss_mb`` are the started relays' summed (CPU of
    every thread, from ``/proc`` through psutil), and ``redis_cpu_s`` and
    ``redis_rss_mb`` are redis-server's (its CPU includes the children it forked
    to rewrite the append-only file, once they have ended).
    """

    def __init__(self, workdir: Path, *, relay_options: Sequence[str] = (),
                 sim_options: Sequence[str] = (), relays: int = 2,
                 partitions: int = 16, maxmemory: str = "1gb") -> None:
        super().__init__(workdir, relay_options=relay_options, sim_options=sim_options)
        self.partitions = partitions
        self.redis_port = free_port()
        self.redis_url = f"redis://{HOST}:{self.redis_port}/0"
        (workdir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis = Process("redis-server", [
            "redis-server", str(REDIS_CONFIG), "--port", str(self.redis_port),
            "--dir", str(workdir / "redis"), "--maxmemory", maxmemory], workdir / "redis.log")
        self.relays: list[Process] = []
        self.relay_urls: list[str] = []
        for i in range(1, relays + 1):
            port = free_port()
            self.relay_urls.append(f"http://{HOST}:{port}")
            self.relays.append(Process(f"relay {i}", [
                sys.executable, "-m", "router", "serve", "--redis", self.redis_url,
                "--role", "all", "--partitions", str(partitions),
                "--listen", f"{HOST}:{port}", "--infinario-url", self.sim_url,
                "--write-key", f"{WRITE_KEY}={PROJECT}", "--log-level", "warning",
                *relay_options], workdir / f"relay-{i}.log"))
        self.relay, self.relay_url = self.relays[0], self.relay_urls[0]
        self.active = 0  # relays started so far
        self._relay_ps: list[psutil.Process] = []
        self.exits: dict[str, int | None] = {}
        self.peak_rss_by_relay: dict[str, float] = {}

    async def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise BenchError("redis-server is not on PATH (Debian package redis-server)")
        self.redis.start()
        self.sim.start()
        await _wait_ready(self.redis, lambda: redis_call(self.redis_port, "PING"),
                          START_TIMEOUT)
        self._redis_ps = psutil.Process(self.redis.pid)
        await wait_http(self.sim, f"{self.sim_url}/_sim/stats", START_TIMEOUT)
        await self.add_relay()

    async def add_relay(self) -> None:
        """Start the next relay and wait until it answers ``/health``."""
        relay, url = self.relays[self.active], self.relay_urls[self.active]
        relay.start()
        await wait_http(relay, f"{url}/health", START_TIMEOUT)
        self._relay_ps.append(psutil.Process(relay.pid))
        self.active += 1

    @property
    def active_urls(self) -> list[str]:
        return self.relay_urls[:self.active]

    async def partitions_held(self) -> list[int]:
        """``/health``'s ``partitions_held`` of each started relay."""
        held = []
        for url in self.active_urls:
            response = await self.http.get(f"{url}/health")
            held.append(int(response.json()["partitions_held"]))
        return held

    async def wait_shared(self, seconds: float) -> list[int]:
        """Wait until the started relays hold a fair share each and every partition is held."""
        fair = self.partitions // self.active
        deadline = time.monotonic() + seconds
        held: list[int] = []
        while time.monotonic() < deadline:
            self.check_relay()
            held = await self.partitions_held()
            if sum(held) == self.partitions and min(held) >= fair:
                return held
            await trio.sleep(0.1)
        raise BenchError(f"the relays did not share the {self.partitions} partitions within "
                         f"{seconds:.0f}s (held: {held})")

    async def outbox_length(self) -> int:
        """Commands in the project's outbox streams: sent, not yet known to be answered."""
        total = 0
        for p in range(self.partitions):
            total += await redis_call(self.redis_port, "XLEN", f"out:{{{PROJECT}}}:{p}")
        return int(total)

    async def redis_command_usec(self) -> dict[str, int]:
        """Microseconds redis-server spent inside each command so far (``INFO commandstats``:
        scripts count under ``evalsha``; socket I/O and the fsync are outside them)."""
        info = redis_info(await redis_call(self.redis_port, "INFO", "commandstats"))
        out = {}
        for name, value in info.items():
            if name.startswith("cmdstat_"):
                fields = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
                out[name.removeprefix("cmdstat_")] = int(fields.get("usec", 0))
        return out

    async def redis_memory_mb(self) -> float | None:
        try:
            info = redis_info(await redis_call(self.redis_port, "INFO", "memory"))
            return round(int(info["used_memory"]) / 2**20, 1)
        except (BenchError, OSError, KeyError, ValueError):
            return None

    def stop(self) -> None:
        """Every relay (they drain and hand their partitions back), the simulator, Redis."""
        try:
            for relay in self.relays[:self.active]:
                if relay.alive():
                    hwm = proc_status_kb(relay.pid, "VmHWM")
                    if hwm is not None:
                        self.peak_rss_by_relay[relay.name] = round(hwm / 1024, 1)
            if self.peak_rss_by_relay:
                self.peak_rss_mb = max(self.peak_rss_by_relay.values())
        finally:
            try:
                # All at once, so they drain side by side; one SIGTERM each (a second one
                # would cut a relay's drain short).
                for relay in self.relays:
                    if relay.popen is not None and relay.alive():
                        relay.popen.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + STOP_TIMEOUT
                for relay in self.relays:
                    if relay.popen is not None:
                        try:
                            relay.popen.wait(max(0.1, deadline - time.monotonic()))
                        except subprocess.TimeoutExpired:
                            pass
                    self.exits[relay.name] = relay.stop()
                self.relay_exit = self.exits.get(self.relay.name)
            finally:
                try:
                    self.exits["simulator"] = self.sim.stop(5.0)
                finally:
                    self.exits["redis-server"] = self.redis.stop(10.0)

    def commands(self) -> dict[str, list[str]]:
        out = {relay.name: relay.args for relay in self.relays}
        out.update({"simulator": self.sim.args, "redis-server": self.redis.args})
        return out

    async def sample_once(self) -> Sample:
        stats, delivered, commands = await self.delivered_now()
        cpu: float | None = 0.0
        rss: float | None = 0.0
        for proc in self._relay_ps:
            used = cpu_seconds(proc)
            kb = proc_status_kb(proc.pid, "VmRSS")
            cpu = None if used is None or cpu is None else cpu + used
            rss = None if kb is None or rss is None else rss + kb / 1024
        redis_kb = proc_status_kb(self.redis.pid, "VmRSS")
        sample = Sample(t=time.monotonic(), rss_mb=rss, cpu_s=cpu, delivered=delivered,
                        commands=commands, stats=stats,
                        redis_cpu_s=cpu_seconds(self._redis_ps, children=True),
                        redis_rss_mb=None if redis_kb is None else redis_kb / 1024)
        self.timeline.samples.append(sample)
        self.latest = sample
        return sample

    def check_relay(self) -> None:
        for proc in [*self.relays[:self.active], self.redis]:
            if not proc.alive():
                code = proc.popen.returncode if proc.popen else None
                raise BenchError(f"{proc.name} exited with status {code}; last log lines:\n"
                                 + "\n".join(proc.log_tail()))

    async def relay_metrics(self) -> dict[str, float]:
        """The started relays' unlabelled ``router_*`` values, summed."""
        out: dict[str, float] = {}
        for url in self.active_urls:
            try:
                response = await self.http.get(f"{url}/metrics")
            except httpx.HTTPError:
                continue
            for line in response.text.splitlines():
                if line.startswith("router_") and "{" not in line:
                    name, _, value = line.partition(" ")
                    try:
                        out[name] = out.get(name, 0.0) + float(value)
                    except ValueError:
                        continue
        return out


async def _wait_ready(proc: Process, probe: Callable[[], Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with status {proc.popen.returncode}: "
                             + " ".join(proc.log_tail(3)) if proc.popen
                             else f"{proc.name} did not start")
        try:
            await probe()
            return
        except (OSError, BenchError, trio.TooSlowError):
            await trio.sleep(0.05)
    raise BenchError(f"{proc.name} did not answer within {seconds:.0f}s")
