"""``infinario-router``: serve the relay, run the simulator, manage dead letters."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from . import config as cfg
from .errors import ConfigError, RouterError

DEFAULT_SIMULATOR_LISTEN = "127.0.0.1:8090"
# Young collections every 50,000 allocations instead of 700; older ones rarer too.
GC_THRESHOLDS = (50_000, 20, 100)


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the relay",
                       description="Run the relay. Every flag is also ROUTER_<FLAG> in the "
                       "environment and a key of the --config TOML file.")
    p.add_argument("--config", type=Path, help="TOML file with settings")
    p.add_argument("--listen", help=f"HOST:PORT for the Segment intake ({cfg.DEFAULT_LISTEN})")
    p.add_argument("--infinario-url", help=f"Infinario base URL ({cfg.DEFAULT_INFINARIO_URL})")
    p.add_argument("--api", choices=["legacy", "v2"], help="Infinario tracking API dialect")
    p.add_argument("--write-key", action="append", metavar="KEY=PROJECT_TOKEN",
                   help="map a Segment write key to an Infinario project token (repeatable)")
    p.add_argument("--session-timeout", help="seconds of inactivity that end a session (1200)")
    p.add_argument("--data-dir", help="journal and state directory (./var)")
    p.add_argument("--concurrency", help="most requests in flight to Infinario (8)")
    p.add_argument("--infinario-auth", metavar="token:API_TOKEN|basic:KEY_ID:SECRET",
                   help="v2 credentials for every project")
    p.add_argument("--dedup-window", help="seconds a messageId is remembered (86400)")
    p.add_argument("--retry-window", help="seconds a command is retried before dead-lettering "
                   "(14400)")
    p.add_argument("--spool-cap", help="disk cap for undelivered data, e.g. 2GiB; past it intake "
                   "answers 503")
    p.add_argument("--rate-limit", help="requests per minute to Infinario (v2: 6000; 0: none)")
    p.add_argument("--max-customer-keys", help="distinct customer property keys per project (255)")
    p.add_argument("--max-event-keys", help="distinct property keys per event type (255)")
    p.add_argument("--max-event-types", help="distinct event types per project (255)")
    p.add_argument("--rename", action="append", metavar="SEGMENT_EVENT=EVENT_TYPE",
                   help="rename an event type, e.g. 'Order Completed=hard_purchase'")
    p.add_argument("--allow-campaign", action="store_const", const=True,
                   help="allow tracking the reserved 'campaign' event type")
    p.add_argument("--grace", help="seconds to drain on SIGTERM (10)")
    p.add_argument("--request-timeout", help="seconds to wait for Infinario (15)")
    p.add_argument("--log-format", choices=["json", "console"], help="log format (json)")
    p.add_argument("--log-level", help="debug, info, warning or error (info)")
    p.add_argument("--active-customers", help="customers kept in memory (100000)")
    p.add_argument("--lane-window", help="commands each sender lane keeps in memory (500)")
    p.add_argument("--linger", help="seconds a lane waits to fill a request (0.05)")
    p.add_argument("--simulate", action="store_const", const=True,
                   help="run the built-in Infinario simulator and deliver to it")
    p.add_argument("--simulator-listen", default=DEFAULT_SIMULATOR_LISTEN,
                   help=f"HOST:PORT for the simulator with --simulate ({DEFAULT_SIMULATOR_LISTEN})")


def _dead_parser(sub: Any) -> None:
    p = sub.add_parser("dead-letters", help="list, show, replay or purge dead letters")
    p.add_argument("--data-dir", type=Path, help="the relay's data dir (./var)")
    p.add_argument("--config", type=Path, help="TOML file with settings (for data_dir)")
    actions = p.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="one line per dead letter")
    ls.add_argument("--limit", type=int, default=100)
    show = actions.add_parser("show", help="everything about one dead letter")
    show.add_argument("id", type=int)
    for name, text in (("replay", "send again through the normal path"),
                       ("purge", "delete for good")):
        a = actions.add_parser(name, help=text)
        a.add_argument("ids", type=int, nargs="*")
        a.add_argument("--all", action="store_true", help="every dead letter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinario-router",
        description="Relay Segment-spec analytics calls to Infinario (Bloomreach Engagement).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _dead_parser(sub)
    sim = sub.add_parser("simulator", help="run the built-in Infinario simulator alone")
    sim.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def load_config(args: argparse.Namespace, env: Any = None) -> cfg.Config:
    toml = cfg.read_toml(args.config) if getattr(args, "config", None) else None
    flags = {name: getattr(args, name, None) for name in cfg.SETTINGS}
    return cfg.load(toml=toml, env=os.environ if env is None else env, flags=flags)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "dead-letters":
            from .deadletters import run as run_dead_letters

            return run_dead_letters(args, load_config)
        if args.command == "simulator":
            from .simulator import main as simulator_main

            return simulator_main(args.args)
    except RouterError as exc:
        print(f"infinario-router: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace) -> int:
    from . import logs

    config = load_config(args)
    logs.configure(config.log_level, config.log_format)
    if config.simulate:
        from .http import parse_listen

        try:
            parse_listen(args.simulator_listen)
        except ValueError as exc:
            raise ConfigError(f"simulator-listen: {exc}") from None
        if not config.write_keys:
            # Trying the relay out needs a write key; a production relay must name its own.
            config = config.with_(write_keys={"demo": "demo-project"})
    tune_gc()
    try:
        trio.run(partial(_run, config, args.simulator_listen))
    except KeyboardInterrupt:
        pass
    return 0


def tune_gc() -> None:
    """Collect garbage far less often than Python's default.

    The relay allocates a few dozen short-lived containers per message and makes
    almost no reference cycles, so the default (a young collection every 700
    allocations, each promoting whatever is in flight) cost about 15% of its CPU
    under batch load finding nothing. Objects alive at startup are frozen out of
    collections.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _run(config: cfg.Config, simulator_listen: str) -> None:
    from .app import serve

    if not config.simulate:
        await serve(config)
        return
    from .http import parse_listen
    from .simulator import Simulator, run_simulator

    host, port = parse_listen(simulator_listen)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_simulator, Simulator(), host, port)
        print(f"infinario-router: simulator listening on {url} "
              f"(see {url}/_sim/events)", file=sys.stderr)
        await serve(config.with_(infinario_url=url))
        nursery.cancel_scope.cancel()
