"""The floors: the CPU a relay cannot avoid spending per message.

The codec floor times only the JSON work in this process. The forwarder floor
runs ``bench.forwarder`` (HTTP in, JSON in and out, bulk POSTs out, nothing
else) under the relay's own load and reads its CPU from the OS.

Whatever else it does, a relay has to decode each intake body and encode the
bulk bodies it sends on. Timing exactly that with msgspec (the relay's own JSON
library) on the same bodies, in the same run and on the same machine, gives a
yardstick that moves with the machine's speed: the relay's CPU per message
divided by it is a ratio that survives a noisy, shared box better than
absolute microseconds do.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil  # type: ignore[import-untyped]
import trio

from .data import PROJECT, WRITE_KEY, Messages, batch_body, legacy_bodies, single_body
from .measure import BUCKET, Requests, cpu_seconds, median, window_rates
from .scenarios import CUSTOMERS
from .stack import HOST, START_TIMEOUT, BenchError, Process, free_port, run_load, wait_http


def _bodies(kind: str, messages: int, batch_size: int) -> list[bytes]:
    gen = Messages(customers=10_000, id_prefix="floor-")
    if kind == "batch":
        return [batch_body(gen, batch_size) for _ in range(max(1, messages // batch_size))]
    return [single_body(gen)[1] for _ in range(messages)]


def codec_floor(kind: str, *, messages: int = 20_000, batch_size: int = 100,
                repeats: int = 5) -> dict[str, Any]:
    """CPU µs per message to decode the intake bodies and encode the legacy bulk bodies."""
    bodies = _bodies(kind, messages, batch_size)
    decoded: list[dict[str, Any]] = []
    for body in bodies:
        data = msgspec.json.decode(body)
        decoded.extend(data["batch"] if kind == "batch" else [data])
    bulk = list(legacy_bodies(decoded, per_body=50))
    decode, encode = msgspec.json.decode, msgspec.json.encode
    n = len(decoded)
    samples: list[float] = []
    for _ in range(repeats):
        t0 = time.process_time()
        for body in bodies:
            decode(body)
        for payload in bulk:
            encode(payload)
        samples.append((time.process_time() - t0) / n * 1e6)
    best = median(samples)
    assert best is not None
    return {"kind": kind, "messages": n, "repeats": repeats, "us_per_message": round(best, 3),
            "samples_us": [round(s, 3) for s in samples],
            "intake_bytes_per_message": round(sum(map(len, bodies)) / n, 1)}




# --- the forwarder floor ----------------------------------------------------------------------

async def _forwarder_stats(http: httpx.AsyncClient, url: str) -> dict[str, int]:
    response = await http.get(f"{url}/stats")
    response.raise_for_status()
    return msgspec.json.decode(response.content)  # type: ignore[no-any-return]


async def _forwarder_drained(http: httpx.AsyncClient, url: str, proc: Process,
                             seconds: float) -> dict[str, int]:
    """Wait until every command the forwarder made was answered by the upstream."""
    deadline = time.monotonic() + seconds
    while True:
        if not proc.alive():
            raise BenchError("the forwarder exited; last log lines:\n"
                             + "\n".join(proc.log_tail()))
        stats = await _forwarder_stats(http, url)
        if stats["pending"] == 0 and stats["forwarded"] + stats["failed"] >= stats["received"]:
            return stats
        if time.monotonic() > deadline:
            raise BenchError(f"the forwarder still had {stats['pending']} commands to send "
                             f"after {seconds:.0f}s")
        await trio.sleep(BUCKET)


async def _forwarder_run(http: httpx.AsyncClient, url: str, proc: Process, workdir: Path,
                         kind: str, *, seconds: float, connections: int,
                         drain_timeout: float) -> dict[str, Any]:
    ps = psutil.Process(proc.pid)

    async def load(label: str, duration: float) -> Requests:
        out = workdir / f"forwarder-{kind}-{label}.json"
        args = [sys.executable, "-m", "bench.load", "--url", url, "--kind", kind,
                "--mode", "closed", "--duration", str(duration),
                "--connections", str(connections), "--customers", str(CUSTOMERS),
                "--out", str(out)]
        return await run_load(args, out, duration)

    # A short run first: connections open, code paths warm, as the relay's are by then.
    await load("warm-up", min(1.0, seconds / 2))
    before = await _forwarder_drained(http, url, proc, drain_timeout)
    cpu0 = cpu_seconds(ps)
    run = await load("measured", seconds)
    after = await _forwarder_drained(http, url, proc, drain_timeout)
    cpu1 = cpu_seconds(ps)
    acked = run.acked()
    if not acked or cpu0 is None or cpu1 is None:
        raise BenchError(f"the forwarder acknowledged no {kind} messages")
    per_message = (cpu1 - cpu0) / acked * 1e6
    answered = run.count(200)
    acked_per_s = median(window_rates(run.ack_times(), run.start, run.end)) or 0.0
    return {
        "kind": kind, "connections": connections, "seconds": seconds,
        "acked_messages": acked, "requests": answered,
        "acked_per_s": round(acked_per_s, 1),
        "requests_per_s": round(acked_per_s / (acked / answered), 1),
        "forwarded_commands": after["forwarded"] - before["forwarded"],
        "failed_commands": after["failed"] - before["failed"],
        "bulks": after["bulks"] - before["bulks"],
        "cpu_seconds": round(cpu1 - cpu0, 3),
        "us_per_message": round(per_message, 2),
        "us_per_request": round(per_message * acked / answered, 1),
        "load_generator_cpu_seconds": run.info["cpu_seconds"],
    }


async def forwarder_floor(workdir: Path, *, seconds: float, connections: dict[str, int],
                          drain_timeout: float = 60.0) -> dict[str, Any]:
    """CPU µs per message of ``bench.forwarder`` under the relay's max-rate load.

    The forwarder and a counting simulator run as their own processes; the same
    load generator drives the forwarder with the same bodies and connections as
    the relay's max-rate phases (``connections`` per body kind), and its CPU
    (user + system, all threads, from the OS) is read from the start of the run
    until the simulator has answered every bulk it made, per message acked.
    """
    sim_port, fwd_port = free_port(), free_port()
    sim_url, url = f"http://{HOST}:{sim_port}", f"http://{HOST}:{fwd_port}"
    sim = Process("simulator", [sys.executable, "-m", "router.simulator", "--listen",
                                f"{HOST}:{sim_port}", "--counting"],
                  workdir / "forwarder-simulator.log")
    fwd = Process("forwarder", [sys.executable, "-m", "bench.forwarder", "--listen",
                                f"{HOST}:{fwd_port}", "--upstream", sim_url,
                                "--write-key", f"{WRITE_KEY}={PROJECT}"],
                  workdir / "forwarder.log")
    out: dict[str, Any] = {"command": fwd.args}
    try:
        sim.start()
        fwd.start()
        await wait_http(sim, f"{sim_url}/_sim/stats", START_TIMEOUT)
        await wait_http(fwd, f"{url}/health", START_TIMEOUT)
        async with httpx.AsyncClient(timeout=5.0) as http:
            for kind, n in connections.items():
                out[kind] = await _forwarder_run(http, url, fwd, workdir, kind,
                                                 seconds=seconds, connections=n,
                                                 drain_timeout=drain_timeout)
            stats = (await http.get(f"{sim_url}/_sim/stats")).json()
            out["simulator_commands"] = stats.get("commands")
            out["simulator_errors"] = stats.get("errors")
    finally:
        try:
            fwd.stop(5.0)
        finally:
            sim.stop(5.0)
    return out


if __name__ == "__main__":
    import tempfile

    for k in ("batch", "single"):
        print(codec_floor(k))
    with tempfile.TemporaryDirectory() as tmp:
        print(trio.run(lambda: forwarder_floor(Path(tmp), seconds=5.0,
                                               connections={"batch": 8, "single": 32})))
