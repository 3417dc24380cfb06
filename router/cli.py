"""``infinario-router``: serve the relay, run the simulator, manage dead letters, explain."""

from __future__ import annotations

import argparse
import errno
import gc
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import trio

from . import config as cfg
from .errors import ConfigError, RouterError, StartupError

PROG = "infinario-router"
DEFAULT_SIMULATOR_LISTEN = "127.0.0.1:8090"
# Young collections every 50,000 allocations instead of 700; older ones rarer too.
GC_THRESHOLDS = (50_000, 20, 100)
# Socket errors that mean "this address cannot be listened on", not a broken data dir.
_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


class ShortParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line and exit 2, like every other refusal.

    argparse prints the whole usage before the error; for a command with thirty
    flags that buries the one line that matters. ``--help`` still shows it all.
    """

    def error(self, message: str) -> NoReturn:
        name = PROG if self.prog.startswith(PROG) else self.prog
        self.exit(2, f"{name}: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed distribution's version, or the package's own in a bare checkout."""
    from importlib import metadata

    try:
        return metadata.version("infinario-router")
    except metadata.PackageNotFoundError:
        import router

        return str(getattr(router, "__version__", "unknown"))


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the relay",
                       description="Run the relay. Every flag is also ROUTER_<FLAG> in the "
                       "environment and a key of the --config TOML file.")
    p.add_argument("--config", type=Path,
                   help="TOML file with settings (or ROUTER_CONFIG)")
    p.add_argument("--listen", help=f"HOST:PORT for the Segment intake ({cfg.DEFAULT_LISTEN})")
    p.add_argument("--infinario-url", help=f"Infinario base URL ({cfg.DEFAULT_INFINARIO_URL})")
    p.add_argument("--api", metavar="legacy|v2", help="Infinario tracking API dialect (legacy)")
    p.add_argument("--write-key", action="append", metavar="KEY=PROJECT_TOKEN",
                   help="map a Segment write key to an Infinario project token (repeatable)")
    p.add_argument("--write-key-file", metavar="PATH",
                   help="file of KEY=PROJECT_TOKEN lines (# comments and blank lines ignored)")
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
    _limit_flags(p)
    p.add_argument("--grace", help="seconds to drain on SIGTERM (10)")
    p.add_argument("--request-timeout", help="seconds to wait for Infinario (15)")
    p.add_argument("--log-format", metavar="json|console", help="log format (json)")
    p.add_argument("--log-level", help="debug, info, warning or error (info)")
    p.add_argument("--active-customers", help="customers kept in memory (100000)")
    p.add_argument("--lane-window", help="commands each sender lane keeps in memory (500)")
    p.add_argument("--linger", help="seconds a lane waits to fill a request (0.05)")
    p.add_argument("--admin-listen", metavar="HOST:PORT",
                   help="serve /metrics, /report, /ready and /health here instead of on the "
                   "intake (off unless set)")
    p.add_argument("--webhook-secret", metavar="SECRET",
                   help="shared secret of Segment's webhook destination: /v1/webhook then "
                   "requires a valid X-Signature")
    p.add_argument("--max-connections",
                   help="client connections held at once; past it new ones get 503 (1024)")
    p.add_argument("--redis", metavar="redis://HOST:PORT/DB",
                   help="run as one of many relay processes sharing this Redis (off: one "
                   "process with its own data dir)")
    p.add_argument("--role", metavar="all|intake|worker",
                   help="with --redis: intake serves HTTP, worker owns partitions and sends "
                   "to Infinario, all does both (all)")
    p.add_argument("--partitions",
                   help=f"with --redis: partitions per project ({cfg.DEFAULT_PARTITIONS}); "
                   "fixed once a project has data")
    p.add_argument("--simulate", action="store_const", const=True,
                   help="run the built-in Infinario simulator and deliver to it")
    p.add_argument("--simulator-listen",
                   help="HOST:PORT for the simulator with --simulate "
                   f"(or ROUTER_SIMULATOR_LISTEN; {DEFAULT_SIMULATOR_LISTEN})")


def _limit_flags(p: argparse.ArgumentParser) -> None:
    """The flags that shape what a message becomes: shared by ``serve`` and ``explain``."""
    p.add_argument("--max-customer-keys", help="distinct customer property keys per project (255)")
    p.add_argument("--max-event-keys", help="distinct property keys per event type (255)")
    p.add_argument("--max-event-types", help="distinct event types per project (255)")
    p.add_argument("--rename", action="append", metavar="SEGMENT_EVENT=EVENT_TYPE",
                   help="rename an event type, e.g. 'Order Completed=hard_purchase'")
    p.add_argument("--allow-campaign", action="store_const", const=True,
                   help="allow tracking the reserved 'campaign' event type")


def _store_flags(p: argparse.ArgumentParser, *, nested: bool) -> None:
    # On the actions, a flag that was not given must not overwrite the same flag
    # given before the action: SUPPRESS leaves the attribute alone.
    default = argparse.SUPPRESS if nested else None
    p.add_argument("--data-dir", type=Path, default=default,
                   help="the relay's data dir (ROUTER_DATA_DIR, the config's data_dir, ./var)")
    p.add_argument("--config", type=Path, default=default,
                   help="TOML file with settings, for data_dir, redis and partitions "
                   "(or ROUTER_CONFIG)")
    p.add_argument("--redis", metavar="redis://HOST:PORT/DB", default=default,
                   help="the dead letters of the relays sharing this Redis instead of a data "
                   "dir's (ROUTER_REDIS, the config's redis)")
    p.add_argument("--partitions", default=default,
                   help="with --redis: partitions per project, which must be the relay's: "
                   "replay puts a command in partition customer mod this (ROUTER_PARTITIONS, "
                   f"the config's partitions, {cfg.DEFAULT_PARTITIONS})")


def _dead_id(text: str) -> int | str:
    """A data dir's dead letters are numbered; Redis's are PROJECT/STREAM-ID."""
    try:
        return int(text)
    except ValueError:
        return text


def _dead_parser(sub: Any) -> None:
    p = sub.add_parser(
        "dead-letters", help="list, show, replay or purge dead letters",
        description="Dead letters of the relay's data dir, or with --redis of the relays "
        "sharing that Redis. Ids: a number for a data dir, PROJECT/STREAM-ID (as list shows "
        "them) with Redis.")
    _store_flags(p, nested=False)
    actions = p.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="one line per dead letter")
    ls.add_argument("--limit", type=int, default=100)
    show = actions.add_parser("show", help="everything about one dead letter")
    show.add_argument("id", type=_dead_id)
    _store_flags(ls, nested=True)
    _store_flags(show, nested=True)
    for name, text in (("replay", "send again through the normal path"),
                       ("purge", "delete for good")):
        a = actions.add_parser(name, help=text)
        a.add_argument("ids", type=_dead_id, nargs="*")
        a.add_argument("--all", action="store_true", help="every dead letter")
        _store_flags(a, nested=True)


def _explain_parser(sub: Any) -> None:
    from .explain import DESCRIPTION

    p = sub.add_parser("explain", help="show what Segment messages would become in Infinario",
                       description=DESCRIPTION)
    p.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                   help="a message, a JSON array of messages or a batch body (- or none: stdin)")
    p.add_argument("--config", type=Path, help="TOML file for renames and limits "
                   "(or ROUTER_CONFIG)")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--session-timeout", help="seconds of inactivity that end a session (1200)")
    _limit_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = ShortParser(
        prog=PROG,
        description="Relay Segment-spec analytics calls to Infinario (Bloomreach Engagement).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _dead_parser(sub)
    _explain_parser(sub)
    # Its options belong to the simulator's own parser; ``main`` hands them over.
    sub.add_parser("simulator", help="run the built-in Infinario simulator alone "
                   "(see simulator --help)", add_help=False)
    return parser


def load_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> cfg.Config:
    env = os.environ if env is None else env
    path = cfg.config_path(getattr(args, "config", None), env)
    toml = cfg.read_toml(path) if path else None
    flags = {name: getattr(args, name, None) for name in cfg.SETTINGS}
    return cfg.load(toml=toml, env=env, flags=flags)


def data_dir(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Path:
    """``--data-dir``, else ``ROUTER_DATA_DIR``, else the config file's, else ``./var``."""
    env = os.environ if env is None else env
    path = cfg.config_path(getattr(args, "config", None), env)
    toml = cfg.read_toml(path) if path else None
    return cfg.load_data_dir(toml=toml, env=env,
                             flags={"data_dir": getattr(args, "data_dir", None)})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulator"]:
        from .simulator import main as simulator_main

        return simulator_main(argv[1:], prog=f"{PROG} simulator")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "dead-letters":
            from .deadletters import run as run_dead_letters

            return run_dead_letters(args, data_dir)
        if args.command == "explain":
            from .explain import run as run_explain

            return run_explain(args, load_config(args))
    except RouterError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace) -> int:
    from . import logs

    config = load_config(args)
    logs.configure(config.log_level, config.log_format)
    simulator_listen = (args.simulator_listen or os.environ.get("ROUTER_SIMULATOR_LISTEN")
                        or DEFAULT_SIMULATOR_LISTEN)
    if config.simulate:
        from .config import parse_listen

        try:
            parse_listen(simulator_listen)
        except ValueError as exc:
            raise ConfigError(f"simulator-listen: {exc}") from None
        if not config.write_keys:
            # Trying the relay out needs a write key; a production relay must name its own.
            config = config.with_(write_keys={"demo": "demo-project"})
    tune_gc()
    raise_descriptor_limit()
    try:
        trio.run(partial(_run, config, simulator_listen))
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        raise startup_error(group, config) from None
    except OSError as exc:
        error = startup_error(exc, config)
        if error is None:
            raise
        raise error from None
    return 0


def startup_error(exc: BaseException, config: cfg.Config) -> RouterError:
    """The one-line error for a failure out of the relay's start, however trio nested it.

    A group whose leaves are all the router's own errors (or sockets that could
    not listen) becomes its first such error; anything else is a bug and is
    raised again, traceback and all.
    """
    leaves = list(_leaves(exc))
    errors = [_as_router_error(leaf, config) for leaf in leaves]
    if not leaves or any(error is None for error in errors):
        raise exc
    first = errors[0]
    assert first is not None
    return first


def _leaves(exc: BaseException) -> Any:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _as_router_error(exc: BaseException, config: cfg.Config) -> RouterError | None:
    if isinstance(exc, RouterError):
        return exc
    if isinstance(exc, socket.gaierror) or (
            isinstance(exc, OSError) and exc.errno in _LISTEN_ERRNOS):
        return ConfigError(f"listen: cannot listen on {config.listen}: {exc.strerror or exc}")
    return None


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one; return the new soft limit.

    The default soft limit (often 1,024) counts every client socket, the database
    and its log: a relay with many clients would refuse connections long before
    the connection cap, which is the limit meant to decide.
    """
    import resource

    import structlog

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the soft limit; the connection cap still bounds descriptors
    structlog.get_logger("router").debug("descriptor limit", soft=soft, hard=hard)
    return int(soft)


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
    import structlog

    from .config import parse_listen
    from .simulator import Simulator, run_simulator

    host, port = parse_listen(simulator_listen)
    async with trio.open_nursery() as nursery:
        try:
            url = await nursery.start(run_simulator, Simulator(), host, port)
        except (OSError, StartupError, BaseExceptionGroup) as exc:
            failed = [leaf for leaf in _leaves(exc) if isinstance(leaf, OSError | StartupError)]
            if not failed:
                raise
            leaf = failed[0]
            if isinstance(leaf, StartupError):
                # The server names the setting "listen"; here it is the simulator's.
                raise ConfigError("simulator-" + str(leaf).replace(
                    "--listen", "--simulator-listen")) from None
            reason = leaf.strerror or str(leaf)
            raise ConfigError(f"simulator-listen: cannot listen on {simulator_listen}: "
                              f"{reason}") from None
        structlog.get_logger("router").info("simulator listening", url=url,
                                            events=f"{url}/_sim/events")
        await serve(config.with_(infinario_url=url))
        nursery.cancel_scope.cancel()
