"""Run the benchmark scenarios against the real relay and simulator processes.

    python -m bench.run --full                 # the whole suite (make bench), < 12 minutes
    python -m bench.run --quick                # smoke version (make bench-quick), < 1 minute
    python -m bench.run --quick --scenario outage --scenario slow-sink

Writes ``<scenario>.json`` and ``.png`` for each scenario run, and
``summary.md`` with the table printed at the end: into ``bench/results/`` for a
full run (the numbers the README quotes), into ``bench/results/quick/`` (not
tracked by git) for a quick one.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import trio

from . import plot, report
from .floor import codec_floor, forwarder_floor
from .measure import machine
from .scenarios import (
    BY_NAME,
    CONNECTIONS,
    FULL,
    QUICK,
    SCENARIOS,
    Context,
    Plan,
    Result,
    Scenario,
    finish,
)
from .stack import ClusterStack, Stack

RESULTS = Path(__file__).resolve().parent / "results"
# Quick runs are smoke tests: kept out of the tracked results a full run writes.
QUICK_RESULTS = RESULTS / "quick"
# A safety net per scenario; each wait inside a scenario has its own, shorter bound.
SCENARIO_LIMIT = {"quick": 90.0, "full": 420.0}


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_error_text(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def run_scenario(scenario: Scenario, ctx: Context) -> tuple[Result, Stack]:
    plan = ctx.plan
    result = Result(scenario.name, scenario.description,
                    relay_options=scenario.relay_options(plan),
                    sim_options=scenario.sim_options(plan))
    with tempfile.TemporaryDirectory(prefix=f"bench-{scenario.name}-") as tmp:
        stack = scenario.make_stack(Path(tmp), plan)
        try:
            await stack.start()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stack.sample_forever)
                try:
                    with trio.fail_after(SCENARIO_LIMIT[plan.mode]):
                        await scenario.run(stack, ctx, result)
                except Exception as exc:
                    result.error = _error_text(exc)
                    if not result.series and stack.loads:
                        finish(stack, result, ctx, "batch")
                finally:
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # the processes did not start
            result.error = result.error or _error_text(exc)
        finally:
            stack.stop()
            with trio.CancelScope(shield=True):
                await stack.aclose()
            result.metrics["relay_exit_status"] = stack.relay_exit
            if isinstance(stack, ClusterStack):
                result.metrics["exit_status"] = stack.exits
                result.metrics["peak_rss_mb_by_relay"] = stack.peak_rss_by_relay
                result.relay_log_tail = [line for proc in (*stack.relays, stack.redis)
                                         for line in (f"== {proc.name}", *proc.log_tail(15))]
            if result.metrics.get("peak_rss_mb") is None and stack.peak_rss_mb is not None:
                result.metrics["peak_rss_mb"] = round(stack.peak_rss_mb, 1)
            if not result.relay_log_tail:
                result.relay_log_tail = stack.relay.log_tail(30)
        return result, stack


def to_json(result: Result, stack: Stack, header: dict[str, Any]) -> dict[str, Any]:
    return {
        "scenario": result.name,
        "description": result.description,
        "mode": header["mode"],
        "timestamp": header["timestamp"],
        "machine": header["machine"],
        "plan": header["plan"],
        "relay": {"options": result.relay_options, "command": stack.relay.args},
        "processes": stack.commands(),
        "simulator": {"options": ["--counting", *result.sim_options],
                      "command": stack.sim.args},
        "codec_floor": header["floor"],
        "forwarder": header["forwarder"],
        "metrics": result.metrics,
        "targets": [c.to_json() for c in result.checks],
        "error": result.error,
        "loads": result.loads,
        "relay_metrics": result.relay_metrics,
        "relay_log_tail": result.relay_log_tail,
        "series": result.series,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the whole suite (default)")
    size.add_argument("--quick", action="store_true", help="a smoke version, under a minute")
    p.add_argument("--scenario", action="append", choices=list(BY_NAME), metavar="NAME",
                   help="run only this scenario (repeatable): " + ", ".join(BY_NAME))
    p.add_argument("--results", type=Path, default=None,
                   help=f"output folder ({RESULTS} for --full, {QUICK_RESULTS} for --quick)")
    args = p.parse_args(argv)
    if args.results is None:
        args.results = QUICK_RESULTS if args.quick else RESULTS
    return args


async def main_async(args: argparse.Namespace) -> int:
    plan: Plan = QUICK if args.quick else FULL
    chosen = [BY_NAME[name] for name in args.scenario] if args.scenario else SCENARIOS
    results_dir: Path = args.results
    started = time.monotonic()
    header: dict[str, Any] = {
        "mode": plan.mode,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "machine": machine(),
        "plan": dataclasses.asdict(plan),
    }
    print(f"bench: {plan.mode} run of {', '.join(s.name for s in chosen)}", file=sys.stderr)
    floors = {kind: codec_floor(kind, messages=plan.floor_messages) for kind in ("batch",
                                                                                 "single")}
    header["floor"] = floors
    header["floor_us"] = {k: v["us_per_message"] for k, v in floors.items()}
    print("bench: forwarder ...", file=sys.stderr, flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-forwarder-") as tmp:
            header["forwarder"] = await forwarder_floor(
                Path(tmp), seconds=plan.forwarder_seconds,
                connections={kind: conns[0] for kind, conns in CONNECTIONS.items()})
    except Exception as exc:  # the scenarios still run; the summary says what failed
        header["forwarder"] = {"error": _error_text(exc)}
    header["forwarder_us"] = {kind: header["forwarder"][kind]["us_per_message"]
                              for kind in CONNECTIONS if kind in header["forwarder"]}
    ctx = Context(plan=plan, floor_us=header["floor_us"], forwarder_us=header["forwarder_us"])
    outputs: list[dict[str, Any]] = []
    for scenario in chosen:
        t0 = time.monotonic()
        print(f"bench: {scenario.name} ...", file=sys.stderr, flush=True)
        result, stack = await run_scenario(scenario, ctx)
        data = to_json(result, stack, header)
        (results_dir / f"{scenario.name}.json").write_bytes(
            msgspec.json.format(msgspec.json.encode(data), indent=1))
        plot.plot(data, results_dir / f"{scenario.name}.png")
        outputs.append(data)
        status = "error: " + result.error if result.error else "done"
        print(f"bench: {scenario.name} {status} in {time.monotonic() - t0:.0f}s",
              file=sys.stderr, flush=True)
    text = report.summary(outputs, header)
    text += f"\nTotal time: {time.monotonic() - started:.0f} s.\n"
    (results_dir / "summary.md").write_text(text)
    print(text)
    failed = any(r["error"] for r in outputs)
    return 1 if failed else 0


async def main_until_signal(args: argparse.Namespace) -> int:
    """``main_async``, cancelled by SIGTERM/SIGHUP so every process started gets stopped."""
    code = 130
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                async for signum in signals:
                    print(f"bench: {signal.Signals(signum).name}; stopping", file=sys.stderr)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            code = await main_async(args)
            nursery.cancel_scope.cancel()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    try:
        return trio.run(main_until_signal, args)
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130


def _interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, possibly wrapped in trio's exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(KeyboardInterrupt)
        return match is not None and rest is None
    return isinstance(exc, KeyboardInterrupt)


if __name__ == "__main__":
    sys.exit(main())
