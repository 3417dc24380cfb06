"""Settings: defaults, TOML file, ``ROUTER_*`` environment variables and CLI flags.

Precedence, lowest first: built-in defaults, the TOML file given by ``--config``,
environment variables, command-line flags. Every value is validated here so a
bad setting stops the relay at start with one line naming the setting.
"""

from __future__ import annotations

import base64
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError
from .http import parse_listen

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_INFINARIO_URL = "https://api.infinario.com"
DEFAULT_SESSION_TIMEOUT = 1200.0
DEFAULT_DATA_DIR = Path("./var")
DEFAULT_CONCURRENCY = 8
DEFAULT_DEDUP_WINDOW = 24 * 3600.0
DEFAULT_RETRY_WINDOW = 4 * 3600.0
DEFAULT_SPOOL_CAP = 2 * 1024**3
DEFAULT_V2_RATE_LIMIT = 6000
DEFAULT_GRACE = 10.0
DEFAULT_REQUEST_TIMEOUT = 15.0
DEFAULT_LIMIT = 255

Api = Literal["legacy", "v2"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything the relay needs to run. Construct with keywords; see ``load``."""

    listen: str = DEFAULT_LISTEN
    infinario_url: str = DEFAULT_INFINARIO_URL
    api: Api = "legacy"
    write_keys: Mapping[str, str] = field(default_factory=dict)
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    data_dir: Path = DEFAULT_DATA_DIR
    concurrency: int = DEFAULT_CONCURRENCY
    # v2 credentials: ``infinario_auth`` for every project, ``project_auth`` per token.
    infinario_auth: str | None = None
    project_auth: Mapping[str, str] = field(default_factory=dict)
    dedup_window: float = DEFAULT_DEDUP_WINDOW
    retry_window: float = DEFAULT_RETRY_WINDOW
    spool_cap: int = DEFAULT_SPOOL_CAP
    # Requests per minute to Infinario; None means the dialect default (v2: 6,000, legacy: none).
    rate_limit: int | None = None
    max_customer_keys: int = DEFAULT_LIMIT
    max_event_keys: int = DEFAULT_LIMIT
    max_event_types: int = DEFAULT_LIMIT
    renames: Mapping[str, str] = field(default_factory=dict)
    allow_campaign: bool = False
    grace: float = DEFAULT_GRACE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    log_format: Literal["json", "console"] = "json"
    log_level: str = "info"
    simulate: bool = False
    # Customers kept in memory before idle ones hibernate to the store.
    active_customers: int = 100_000
    # Commands each sender lane holds in memory; the rest wait in the outbox on disk.
    lane_window: int = 500
    # Seconds a lane waits for a fuller request when it has fewer than 50 commands.
    linger: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.data_dir, Path):
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        validate(self)

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @property
    def effective_rate_limit(self) -> int | None:
        if self.rate_limit is not None:
            return self.rate_limit if self.rate_limit > 0 else None
        return DEFAULT_V2_RATE_LIMIT if self.api == "v2" else None

    def auth_header(self, project: str) -> str | None:
        """The v2 ``Authorization`` header value for ``project``, if configured."""
        spec = self.project_auth.get(project, self.infinario_auth)
        return auth_header(spec) if spec else None


def auth_header(spec: str) -> str:
    """``token:API_TOKEN`` -> ``Token ...``; ``basic:KEY_ID:SECRET`` -> ``Basic ...``."""
    kind, _, rest = spec.partition(":")
    if kind == "token" and rest:
        return f"Token {rest}"
    if kind == "basic":
        key_id, sep, secret = rest.partition(":")
        if key_id and sep and secret:
            return "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()
    raise ConfigError(
        "infinario-auth: expected token:API_TOKEN or basic:KEY_ID:SECRET, got "
        f"{kind or spec!r}..."
    )


def validate(config: Config) -> None:
    try:
        parse_listen(config.listen)
    except ValueError as exc:
        raise ConfigError(f"listen: {exc}") from None
    url = urlsplit(config.infinario_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ConfigError(
            f"infinario-url: expected an http(s) URL, got {config.infinario_url!r}"
        )
    if config.api not in ("legacy", "v2"):
        raise ConfigError(f"api: expected legacy or v2, got {config.api!r}")
    for key, token in config.write_keys.items():
        if not key or not token:
            raise ConfigError(f"write-key: expected KEY=PROJECT_TOKEN, got {key!r}={token!r}")
    positive = {
        "session-timeout": config.session_timeout,
        "concurrency": config.concurrency,
        "dedup-window": config.dedup_window,
        "retry-window": config.retry_window,
        "spool-cap": config.spool_cap,
        "grace": config.grace,
        "request-timeout": config.request_timeout,
        "max-customer-keys": config.max_customer_keys,
        "max-event-keys": config.max_event_keys,
        "max-event-types": config.max_event_types,
        "active-customers": config.active_customers,
        "lane-window": config.lane_window,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name}: must be greater than 0, got {value!r}")
    if config.linger < 0:
        raise ConfigError(f"linger: must be 0 or more, got {config.linger!r}")
    if config.concurrency > 256:
        raise ConfigError(f"concurrency: at most 256, got {config.concurrency}")
    if config.infinario_auth:
        auth_header(config.infinario_auth)
    for project, spec in config.project_auth.items():
        try:
            auth_header(spec)
        except ConfigError as exc:
            raise ConfigError(f"projects.{project}.auth: {exc}") from None
    if config.log_format not in ("json", "console"):
        raise ConfigError(f"log-format: expected json or console, got {config.log_format!r}")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log-level: expected debug, info, warning or error, got {config.log_level!r}"
        )


# --- loading -------------------------------------------------------------------------------

_FIELD_TYPES: dict[str, str] = {
    "listen": "str",
    "infinario_url": "str",
    "api": "str",
    "session_timeout": "float",
    "data_dir": "path",
    "concurrency": "int",
    "infinario_auth": "str",
    "dedup_window": "float",
    "retry_window": "float",
    "spool_cap": "size",
    "rate_limit": "int",
    "max_customer_keys": "int",
    "max_event_keys": "int",
    "max_event_types": "int",
    "allow_campaign": "bool",
    "grace": "float",
    "request_timeout": "float",
    "log_format": "str",
    "log_level": "str",
    "simulate": "bool",
    "active_customers": "int",
    "lane_window": "int",
    "linger": "float",
}
# Settings that take several values: a list in TOML, repeated flags, commas in the environment.
_MULTI = ("write_key", "rename")
SETTINGS = (*_FIELD_TYPES, *_MULTI)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _convert(name: str, kind: str, value: Any) -> Any:
    try:
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("expected a whole number")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if kind == "path":
            return Path(str(value))
        if kind == "size":
            return parse_size(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true or false")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_flag(name)}: {exc} (got {value!r})") from None
    raise AssertionError(kind)


def parse_size(value: Any) -> int:
    """``1048576``, ``512MB``, ``2GiB`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1, "K": 1024,
             "M": 1024**2, "G": 1024**3}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _pairs(name: str, values: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values:
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            what = "KEY=PROJECT_TOKEN" if name == "write_key" else "SEGMENT_EVENT=EVENT_TYPE"
            raise ConfigError(f"{_flag(name)}: expected {what}, got {item!r}")
        result[left.strip()] = right.strip()
    return result


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config: file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def load(
    *,
    toml: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge the three sources over the defaults and validate the result."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    multi: dict[str, dict[str, str]] = {"write_key": {}, "rename": {}}
    project_auth: dict[str, str] = {}

    # TOML
    for key, value in (toml or {}).items():
        if key in _FIELD_TYPES:
            values[key] = _convert(key, _FIELD_TYPES[key], value)
        elif key in ("write_key", "write_keys"):
            if isinstance(value, Mapping):
                multi["write_key"].update({str(k): str(v) for k, v in value.items()})
            elif isinstance(value, list):
                multi["write_key"].update(_pairs("write_key", [str(v) for v in value]))
            else:
                multi["write_key"].update(_pairs("write_key", [str(value)]))
        elif key in ("rename", "renames"):
            if isinstance(value, Mapping):
                multi["rename"].update({str(k): str(v) for k, v in value.items()})
            else:
                items = value if isinstance(value, list) else [value]
                multi["rename"].update(_pairs("rename", [str(v) for v in items]))
        elif key == "projects":
            if not isinstance(value, Mapping):
                raise ConfigError("projects: expected a table of [projects.TOKEN] sections")
            for token, section in value.items():
                if not isinstance(section, Mapping):
                    raise ConfigError(f"projects.{token}: expected a table")
                for name in ("auth", "infinario_auth", "infinario-auth"):
                    if name in section:
                        project_auth[str(token)] = str(section[name])
        else:
            raise ConfigError(f"config: unknown setting {key!r}")

    # Environment
    for name in SETTINGS:
        raw = env.get("ROUTER_" + name.upper())
        if raw is None or raw == "":
            continue
        if name in _MULTI:
            multi[name].update(_pairs(name, [p for p in raw.split(",") if p.strip()]))
        else:
            values[name] = _convert(name, _FIELD_TYPES[name], raw)

    # Flags
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name in _MULTI:
            multi[name].update(_pairs(name, list(value)))
        elif name in _FIELD_TYPES:
            values[name] = _convert(name, _FIELD_TYPES[name], value)

    known = {f.name for f in fields(Config)}
    assert set(values) <= known
    return Config(
        **values,
        write_keys=multi["write_key"],
        renames=multi["rename"],
        project_auth=project_auth,
    )
