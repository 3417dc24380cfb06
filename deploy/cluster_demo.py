"""A local Redis-mode cluster to try out: one redis-server, the simulator and three relays.

    make cluster-demo                       # or: .venv/bin/python deploy/cluster_demo.py
    .venv/bin/python deploy/cluster_demo.py --fresh --relay-port 9001 --relay-port 9002

Starts ``redis-server`` with the shipped ``deploy/redis.conf`` (data in
``var/cluster-demo/redis``, kept across runs unless ``--fresh``), the built-in
Infinario simulator, and three ``infinario-router serve --redis ... --role all``
processes, every one on 127.0.0.1, then prints how to send to them and where to
look. Ctrl-C (or SIGTERM) stops the relays first, so they hand their partitions
back and drain, then the simulator, then Redis; nothing it started is left
running. A relay that dies (try ``kill -9`` on its pid) is reported and the
others take its partitions over once its leases expire.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "redis.conf"
HOST = "127.0.0.1"
WRITE_KEY = "demo"
PROJECT = "demo-project"
REDIS_PORT, SIMULATOR_PORT, RELAY_PORTS = 6380, 8091, (8081, 8082, 8083)
START_TIMEOUT = 30.0
RELAY_GRACE = 5  # the relays' --grace: how long each drains when stopped
INSTALL_HINT = ("cluster-demo: redis-server is not on PATH; install it (Debian package "
                "redis-server: sudo apt-get install redis-server) and run again")


class DemoError(Exception):
    """The demo cannot start; the message says why in one line."""


def _parent_death_signal() -> None:
    """In the child, before exec: get SIGTERM when the demo dies, even by kill -9 (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Child:
    """One process the demo started; its output goes to a log file."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self.reported = False

    def start(self, env: dict[str, str]) -> None:
        self._out = self.log.open("ab")
        # A session of its own: a Ctrl-C in the terminal reaches the demo alone, which
        # then stops every child in order (relays before Redis).
        self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._out,
                                      stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                      start_new_session=True,
                                      preexec_fn=_parent_death_signal)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> bool:
        """True once it has exited; False if it still runs after ``timeout`` seconds."""
        if self.popen is None:
            return True
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.directory: Path = args.dir.resolve()
        self.logs = self.directory / "logs"
        self.redis_url = f"redis://{HOST}:{args.redis_port}/0"
        self.sim_url = f"http://{HOST}:{args.simulator_port}"
        self.relay_urls = [f"http://{HOST}:{port}" for port in args.relay_ports]
        self.children: list[Child] = []
        self.stopping = False

    # --- start -----------------------------------------------------------------------------

    def check(self) -> None:
        if shutil.which("redis-server") is None:
            raise DemoError(INSTALL_HINT)
        ports = [self.args.redis_port, self.args.simulator_port, *self.args.relay_ports]
        if len(set(ports)) != len(ports):
            raise DemoError(f"cluster-demo: ports must differ, got {ports}")
        for port in ports:
            with socket.socket() as s:
                # As the servers bind: a connection of an earlier run in TIME_WAIT is no
                # obstacle, a listener is.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((HOST, port))
                    s.listen()
                except OSError as exc:
                    raise DemoError(f"cluster-demo: {HOST}:{port} is not free ({exc.strerror}); "
                                    "is a demo still running? Choose other ports with "
                                    "--redis-port, --simulator-port, --relay-port") from None

    def start(self) -> None:
        redis_dir = self.directory / "redis"
        if self.args.fresh and redis_dir.exists():
            shutil.rmtree(redis_dir)
        redis_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
        env["PYTHONUNBUFFERED"] = "1"
        redis = self._spawn("redis-server", [
            "redis-server", str(CONFIG), "--port", str(self.args.redis_port),
            "--dir", str(redis_dir), "--maxmemory", self.args.maxmemory], env)
        self._wait(redis, lambda: _redis_ping(self.args.redis_port))
        sim = self._spawn("simulator", [
            sys.executable, "-m", "router.simulator", "--listen",
            f"{HOST}:{self.args.simulator_port}"], env)
        self._wait(sim, lambda: _http_ok(f"{self.sim_url}/_sim/stats"))
        relays = [self._spawn(f"relay {i}", [
            sys.executable, "-m", "router", "serve", "--redis", self.redis_url,
            "--role", "all", "--partitions", str(self.args.partitions),
            "--listen", f"{HOST}:{port}", "--infinario-url", self.sim_url,
            "--write-key", f"{WRITE_KEY}={PROJECT}", "--grace", str(RELAY_GRACE),
            "--log-format", "console"], env)
            for i, port in enumerate(self.args.relay_ports, 1)]
        for relay, url in zip(relays, self.relay_urls, strict=True):
            self._wait(relay, partial(_http_ok, f"{url}/health"))

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        if self.stopping:
            raise KeyboardInterrupt  # stopped while starting
        log = self.logs / (name.replace(" ", "-") + ".log")
        child = Child(name, args, log)
        self.children.append(child)
        child.start(env)
        return child

    def _wait(self, child: Child, ready: Callable[[], bool],
              timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopping:
                raise KeyboardInterrupt  # stopped while starting
            if not child.alive():
                assert child.popen is not None
                raise DemoError(f"cluster-demo: {child.name} exited at start with status "
                                f"{child.popen.returncode}; {_shown(child.log)} ends with:\n"
                                f"{child.tail(10)}")
            if ready():
                return
            time.sleep(0.1)
        raise DemoError(f"cluster-demo: {child.name} did not answer within {timeout:.0f} s; "
                        f"see {_shown(child.log)}")

    # --- run -------------------------------------------------------------------------------

    def banner(self) -> str:
        a = self.args
        rel = _shown(self.directory)
        cli = f"redis-cli -p {a.redis_port}"
        tag = "{" + PROJECT + "}"
        by_name = {c.name: c for c in self.children}
        lines = [
            "cluster-demo: running; Ctrl-C stops everything it started.",
            "",
            f"  redis-server  {HOST}:{a.redis_port}  pid {by_name['redis-server'].pid}  "
            f"(deploy/redis.conf: appendfsync always; maxmemory {a.maxmemory}, noeviction)",
            f"                data {rel}/redis (kept across runs; --fresh starts empty)",
            f"  simulator     {self.sim_url}  pid {by_name['simulator'].pid}",
        ]
        for i, url in enumerate(self.relay_urls, 1):
            lines.append(f"  relay {i}       {url}  pid {by_name[f'relay {i}'].pid}  "
                         f"(--redis {self.redis_url} --role all --partitions {a.partitions})")
        lines += [
            f"  logs          {rel}/logs/",
            "",
            f"Write key: {WRITE_KEY} (project {PROJECT}). Send to any relay:",
        ]
        for i, url in enumerate(self.relay_urls, 1):
            lines.append(f"  curl -s -u {WRITE_KEY}: -H 'Content-Type: application/json' -d "
                         f"'{{\"userId\": \"user-{i}\", \"event\": \"Signed Up\"}}' "
                         f"{url}/v1/track")
        first = self.relay_urls[0]
        looks = [
            (f"curl -s {self.sim_url}/_sim/events", 'what "Infinario" received'),
            (f"curl -s {self.sim_url}/_sim/customers", "its customers, merged"),
            *((f"curl -s {url}/health", f"relay {i}: partitions held, Redis reachable")
              for i, url in enumerate(self.relay_urls, 1)),
            (f"curl -s {first}/metrics | grep -E "
             "'^router_(partitions_held|messages_accepted_total|commands_delivered_total) '",
             "each relay's /metrics likewise"),
            (f"{cli} ZRANGE 'workers:{tag}' 0 -1", "live relays (heartbeats)"),
            (f"{cli} --scan --pattern 'lease:{tag}:*'", "partitions with a lease"),
            (f"{cli} GET 'lease:{tag}:0'", "partition 0's fencing token"),
            (f"{cli} XINFO GROUPS 'in:{tag}:0'", "partition 0's input stream: pending, lag"),
            (f"{cli} XLEN 'out:{tag}:0'", "partition 0's commands not yet answered"),
            (f"{cli} HGETALL 'id:{tag}'", "the identity directory"),
            (f"{cli} XRANGE 'dl:{tag}' - +", "dead letters"),
            (f"{cli} INFO memory | grep used_memory_human", "memory is the spool"),
        ]
        width = max(len(command) for command, _ in looks if len(command) < 70)
        lines += ["", "Where to look:"]
        lines += [f"  {command.ljust(width)}  # {what}" for command, what in looks]
        lines += [
            "",
            "Try: kill -9 one relay's pid; the others take its partitions over within about "
            "2 s (the lease TTL).",
            "Stop: Ctrl-C (relays drain and hand their partitions back, then the simulator and "
            "Redis stop).",
        ]
        return "\n".join(lines)

    def watch(self) -> int:
        """Until a signal; report children that exit on their own meanwhile."""
        while not self.stopping:
            for child in self.children:
                if not child.alive() and not child.reported:
                    child.reported = True
                    assert child.popen is not None
                    print(f"cluster-demo: {child.name} (pid {child.pid}) exited with status "
                          f"{child.popen.returncode}; last lines of {_shown(child.log)}:\n"
                          f"{child.tail()}", flush=True)
            if not any(child.alive() for child in self.children):
                print("cluster-demo: every process has exited", flush=True)
                return 1
            time.sleep(0.2)
        return 0

    # --- stop ------------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            return
        # A second Ctrl-C while stopping: no more waiting. Redis fsyncs every write
        # (appendfsync always), so a kill loses nothing it acknowledged.
        for child in self.children:
            child.signal(signal.SIGKILL)

    def stop(self) -> None:
        """Relays first (they drain and release their leases), then the simulator, Redis."""
        relays = [c for c in self.children if c.name.startswith("relay")]
        others = [c for c in reversed(self.children) if c not in relays]
        if any(c.alive() for c in self.children):
            print("cluster-demo: stopping the relays, the simulator and redis-server ...",
                  flush=True)
        for group, wait in ((relays, RELAY_GRACE + 10.0), *(([c], 10.0) for c in others)):
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + wait
            for child in group:
                if not child.wait(max(0.1, deadline - time.monotonic())):
                    print(f"cluster-demo: {child.name} did not stop in {wait:.0f} s; killing it",
                          flush=True)
                    child.signal(signal.SIGKILL)
                    child.wait(10.0)
        left = [c for c in self.children if c.alive()]
        for child in self.children:
            child.close()
        if left:
            print("cluster-demo: still running: "
                  + ", ".join(f"{c.name} (pid {c.pid})" for c in left), flush=True)
        elif self.children:
            print("cluster-demo: stopped; nothing it started is running.", flush=True)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cluster-demo", description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=ROOT / "var" / "cluster-demo",
                   help="Redis data and logs (var/cluster-demo)")
    p.add_argument("--fresh", action="store_true", help="start with an empty Redis")
    p.add_argument("--redis-port", type=int, default=REDIS_PORT,
                   help=f"redis-server's port on {HOST} ({REDIS_PORT})")
    p.add_argument("--simulator-port", type=int, default=SIMULATOR_PORT,
                   help=f"the simulator's port ({SIMULATOR_PORT})")
    p.add_argument("--relay-port", type=int, action="append", dest="relay_ports",
                   help="a relay's port, once per relay (8081, 8082, 8083)")
    p.add_argument("--partitions", type=int, default=16,
                   help="partitions of the demo project (16; fixed once Redis holds its data)")
    p.add_argument("--maxmemory", default="256mb",
                   help="redis-server's memory cap, the spool of the Redis mode (256mb)")
    args = p.parse_args(argv)
    if not args.relay_ports:
        args.relay_ports = list(RELAY_PORTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = Demo(args)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, demo.on_signal)
    try:
        demo.check()
        demo.start()
        if demo.stopping:
            return 0
        print(demo.banner(), flush=True)
        return demo.watch()
    except DemoError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
