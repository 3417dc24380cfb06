"""Settings: defaults, TOML file, ``ROUTER_*`` environment variables and CLI flags.

Precedence, lowest first: built-in defaults, the TOML file given by ``--config``
(or ``ROUTER_CONFIG``), environment variables, command-line flags. Each source is
read into a partial dict of ``Config`` fields and the partials are merged by
replacement, so a source that sets write keys or renames replaces the whole set
from the sources below it. Every value is validated here so a bad setting stops
the relay at start with one line naming the setting.
"""

from __future__ import annotations

import base64
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError

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
DEFAULT_MAX_CONNECTIONS = 1024
MAX_CONCURRENCY = 256
MAX_PARTITIONS = 1024

DEFAULT_PARTITIONS = 16

Api = Literal["legacy", "v2"]
Role = Literal["all", "intake", "worker"]
LogFormat = Literal["json", "console"]
LOG_LEVELS = ("debug", "info", "warning", "error")


class Size:
    """Marks an ``int`` field whose text form is a size such as ``512MB`` or ``2GiB``."""


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8080`` for IPv6) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


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
    spool_cap: Annotated[int, Size] = DEFAULT_SPOOL_CAP
    # Requests per minute to Infinario; None means the dialect default (v2: 6,000, legacy: none).
    rate_limit: int | None = None
    max_customer_keys: int = DEFAULT_LIMIT
    max_event_keys: int = DEFAULT_LIMIT
    max_event_types: int = DEFAULT_LIMIT
    renames: Mapping[str, str] = field(default_factory=dict)
    allow_campaign: bool = False
    grace: float = DEFAULT_GRACE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    log_format: LogFormat = "json"
    log_level: str = "info"
    simulate: bool = False
    # Customers kept in memory before idle ones hibernate to the store.
    active_customers: int = 100_000
    # Commands each sender lane holds in memory; the rest wait in the outbox on disk.
    lane_window: int = 500
    # Seconds a lane waits for a fuller request when it has fewer than 50 commands.
    linger: float = 0.05
    # HOST:PORT of the operator endpoints (/metrics, /report, /ready, /health); None: off.
    admin_listen: str | None = None
    # Shared secret of Segment's webhook destination: /v1/webhook then needs X-Signature.
    webhook_secret: str | None = None
    # Client connections the intake holds at once; past it new ones get a 503.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # redis://HOST:PORT/DB: run as one of many processes sharing this Redis (None: embedded).
    redis: str | None = None
    # With redis: "intake" serves HTTP only, "worker" owns partitions and sends, "all" both.
    role: Role = "all"
    # With redis: partitions per project, fixed once a project has data in Redis.
    partitions: int = DEFAULT_PARTITIONS

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

    def redacted(self) -> dict[str, Any]:
        """The settings as plain values safe to log: secrets become fingerprints."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "write_keys":
                value = {fingerprint(k): fingerprint(v) for k, v in value.items()}
            elif f.name == "project_auth":
                value = {fingerprint(k): "***" for k in value}
            elif f.name in ("infinario_auth", "webhook_secret"):
                value = None if value is None else "***"
            elif f.name in ("infinario_url", "redis") and value is not None:
                value = redact_url(value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out


def auth_header(spec: str) -> str:
    """``token:API_TOKEN`` -> ``Token ...``; ``basic:KEY_ID:SECRET`` -> ``Basic ...``."""
    kind, sep, rest = spec.partition(":")
    if kind == "token" and rest:
        return f"Token {rest}"
    if kind == "basic":
        key_id, sep2, secret = rest.partition(":")
        if key_id and sep2 and secret:
            return "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()
    # Only the kind is echoed: without a colon the whole value may be the secret.
    got = f", got {kind + ':...'!r}" if sep and kind not in ("token", "basic") else ""
    raise ConfigError(f"infinario-auth: expected token:API_TOKEN or basic:KEY_ID:SECRET{got}")


# --- redaction -------------------------------------------------------------------------------

# ``scheme://user:password@``; the password runs to the last ``@`` before the host,
# so a password containing ``@`` is still hidden whole.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):([^/\s]*)@")


def redact_url(url: str) -> str:
    """``https://user:secret@host/x`` -> ``https://user:***@host/x``; other text unchanged."""
    return _USERINFO.sub(r"\1:***@", url)


def fingerprint(secret: str) -> str:
    """A short stable stand-in for a secret: enough of its start to tell two apart.

    At most a third of the value (and never more than 4 characters) is shown,
    and nothing of one shorter than 6, so a short secret is not given away.
    """
    shown = 0 if len(secret) < 6 else min(4, len(secret) // 3)
    return secret[:shown] + "…"


# --- validation ------------------------------------------------------------------------------


def validate(config: Config) -> None:
    try:
        parse_listen(config.listen)
    except ValueError as exc:
        raise ConfigError(f"listen: {exc}") from None
    if config.admin_listen is not None:
        try:
            parse_listen(config.admin_listen)
        except ValueError as exc:
            raise ConfigError(f"admin-listen: {exc}") from None
    if config.webhook_secret is not None and not config.webhook_secret:
        # Only the fact is said: the value is a secret.
        raise ConfigError("webhook-secret: must not be empty")
    _validate_url(config.infinario_url)
    _choice("api", config.api, ("legacy", "v2"))
    for key, token in config.write_keys.items():
        if not key or not token:
            raise ConfigError("write-key: expected KEY=PROJECT_TOKEN, got an empty key or token")
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
        "max-connections": config.max_connections,
    }
    for name, value in positive.items():
        if not _finite(value) or not value > 0:
            raise ConfigError(f"{name}: must be greater than 0, got {value!r}")
    if not _finite(config.linger) or config.linger < 0:
        raise ConfigError(f"linger: must be 0 or more, got {config.linger!r}")
    if config.rate_limit is not None and config.rate_limit < 0:
        raise ConfigError(
            f"rate-limit: must be 0 or more (0 means no limit), got {config.rate_limit!r}"
        )
    if config.concurrency > MAX_CONCURRENCY:
        raise ConfigError(f"concurrency: at most {MAX_CONCURRENCY}, got {config.concurrency}")
    if config.infinario_auth:
        auth_header(config.infinario_auth)
    for project, spec in config.project_auth.items():
        try:
            auth_header(spec)
        except ConfigError as exc:
            detail = str(exc).removeprefix("infinario-auth: ")
            raise ConfigError(f"projects.{fingerprint(project)}.auth: {detail}") from None
    _choice("role", config.role, ("all", "intake", "worker"))
    if config.redis is not None:
        _validate_redis_url(config.redis)
    elif config.role != "all":
        raise ConfigError(f"role: {config.role} needs --redis; a relay without Redis does "
                          "everything in one process")
    if not 1 <= config.partitions <= MAX_PARTITIONS:
        raise ConfigError(f"partitions: expected 1 to {MAX_PARTITIONS}, got {config.partitions!r}")
    _choice("log-format", config.log_format, ("json", "console"))
    _choice("log-level", config.log_level.lower(), LOG_LEVELS, shown=config.log_level)


def _finite(value: float) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...], shown: Any = None) -> None:
    if value not in allowed:
        words = ", ".join(allowed[:-1]) + " or " + allowed[-1]
        raise ConfigError(f"{name}: expected {words}, got {value if shown is None else shown!r}")


def _validate_redis_url(url: str) -> None:
    parts = urlsplit(url) if isinstance(url, str) else None
    shown = redact_url(url) if isinstance(url, str) else url
    if parts is None or parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"redis: expected redis://HOST:PORT/DB, got {shown!r}")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in 0-65535
    except ValueError:
        raise ConfigError(f"redis: the port must be a number up to 65535, got {shown!r}") \
            from None
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigError(f"redis: the database must be a number, got {shown!r}")


def _validate_url(url: str) -> None:
    parts = urlsplit(url) if isinstance(url, str) else None
    shown = redact_url(url) if isinstance(url, str) else url
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"infinario-url: expected an http(s) URL, got {shown!r}")
    if any(c.isspace() for c in url):
        raise ConfigError(f"infinario-url: must not contain spaces, got {shown!r}")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in 0-65535
    except ValueError:
        raise ConfigError(f"infinario-url: the port must be a number up to 65535, got {shown!r}")\
            from None


# --- converting text and TOML values -------------------------------------------------------


def _flag(name: str) -> str:
    return name.replace("_", "-")


def parse_size(value: Any) -> int:
    """``1048576``, ``512MB``, ``2GiB`` -> bytes; ``ValueError`` for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1, "K": 1024,
             "M": 1024**2, "G": 1024**3, "T": 1024**4}
    factor = 1
    for unit, unit_factor in units.items():
        if text.endswith(unit):
            text, factor = text[: -len(unit)], unit_factor
            break
    if not re.fullmatch(r"\d+(\.\d+)?", text):
        raise ValueError("expected a size such as 1048576, 512MB or 2GiB")
    return int(float(text) * factor)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    raise ValueError("expected a whole number")


_NUMBER = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*")


def _to_float(value: Any) -> float:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric and not (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("expected a number")
    return float(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _to_path(value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value).strip():
        raise ValueError("expected a path")
    return Path(value)


Converter = Callable[[Any], Any]


def _converter(hint: Any) -> Converter:
    """How to read a text or TOML value for a field annotated ``hint``."""
    if typing.get_origin(hint) is Annotated:
        base, *marks = typing.get_args(hint)
        if Size in marks:
            return parse_size
        return _converter(base)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        # ``X | None``: a source that sets the field sets an X.
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _converter(inner)
    if typing.get_origin(hint) is Literal:
        # Any string is taken here; ``validate`` names the allowed values.
        return _to_str
    simple: dict[Any, Converter] = {str: _to_str, int: _to_int, float: _to_float,
                                    bool: _to_bool, Path: _to_path}
    return simple[hint]


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str | int | float | bool) else type(value).__name__


# Fields no single value sets: they come from repeatable settings and ``[projects]``.
_COMPOUND = frozenset({"write_keys", "renames", "project_auth"})
_HINTS = typing.get_type_hints(Config, include_extras=True)
_CONVERTERS: dict[str, Converter] = {
    f.name: _converter(_HINTS[f.name]) for f in fields(Config) if f.name not in _COMPOUND
}
# Settings that take several values: a list in TOML, repeated flags, commas in the environment.
_MULTI = ("write_key", "rename")
SETTINGS = (*_CONVERTERS, *_MULTI, "write_key_file")


def _convert(name: str, value: Any) -> Any:
    try:
        return _CONVERTERS[name](value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_flag(name)}: {exc}, got {_describe(value)}") from None


def _pairs(name: str, values: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values:
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            if name == "write_key":
                # The value holds a project token: say what is wrong, not what it was.
                raise ConfigError("write-key: expected KEY=PROJECT_TOKEN, got a value "
                                  + ("without '='" if not sep else "with an empty side"))
            raise ConfigError(f"rename: expected SEGMENT_EVENT=EVENT_TYPE, got {item!r}")
        result[left.strip()] = right.strip()
    return result


def _read_secret_file(setting: str, path: Path) -> list[tuple[int, str]]:
    """The meaningful lines of a secrets file with their numbers: no blanks, no comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{setting}: file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{setting}: cannot read {str(path)!r}: {reason}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append((number, stripped))
    return lines


def read_write_key_file(path: Path) -> dict[str, str]:
    """``KEY=PROJECT_TOKEN`` lines; blank lines and ``#`` comments are ignored."""
    keys: dict[str, str] = {}
    for number, line in _read_secret_file("write-key-file", path):
        key, sep, token = line.partition("=")
        if not sep or not key.strip() or not token.strip():
            raise ConfigError(f"write-key-file: {path} line {number}: expected KEY=PROJECT_TOKEN")
        keys[key.strip()] = token.strip()
    return keys


def read_auth_file(project: str, path: Path) -> str:
    """The ``token:...`` or ``basic:ID:SECRET`` a ``[projects.TOKEN]`` auth file holds."""
    setting = f"projects.{fingerprint(project)}.auth_file"
    lines = _read_secret_file(setting, path)
    if len(lines) != 1:
        raise ConfigError(f"{setting}: {path} must hold exactly one line of credentials, "
                          f"found {len(lines)}")
    number, spec = lines[0]
    try:
        auth_header(spec)
    except ConfigError as exc:
        detail = str(exc).removeprefix("infinario-auth: ")
        raise ConfigError(f"{setting}: {path} line {number}: {detail}") from None
    return spec


def read_toml(path: Path) -> dict[str, Any]:
    """The file's settings; relative secret-file paths are resolved against its directory."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config: file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config: {str(path)!r} is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(f"config: cannot read {str(path)!r}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    data = {key.replace("-", "_"): value for key, value in data.items()}
    base = path.parent

    def resolve(value: Any) -> Any:
        return base / value if isinstance(value, str) and not Path(value).is_absolute() else value

    if "write_key_file" in data:
        data["write_key_file"] = resolve(data["write_key_file"])
    projects = data.get("projects")
    if isinstance(projects, Mapping):
        for section in projects.values():
            if isinstance(section, dict):
                for name in ("auth_file", "auth-file"):
                    if name in section:
                        section[name] = resolve(section[name])
    return data


# --- sources ---------------------------------------------------------------------------------


def _write_keys(explicit: dict[str, str] | None, file: Any) -> dict[str, str] | None:
    """A source's write keys: those of its key file, overlaid by those it names itself."""
    if explicit is None and file is None:
        return None
    keys = read_write_key_file(_convert_path("write_key_file", file)) if file is not None else {}
    keys.update(explicit or {})
    return keys


def _convert_path(name: str, value: Any) -> Path:
    try:
        return _to_path(value)
    except ValueError as exc:
        raise ConfigError(f"{_flag(name)}: {exc}, got {_describe(value)}") from None


def _table_or_list(name: str, value: Any) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = value if isinstance(value, list) else [value]
    return _pairs(name, [str(v) for v in items])


def _from_toml(data: Mapping[str, Any], only: Collection[str] | None = None) -> dict[str, Any]:
    """The ``Config`` fields the TOML file sets."""
    out: dict[str, Any] = {}
    explicit: dict[str, str] | None = None
    key_file: Any = None
    for key, value in data.items():
        if only is not None and key not in only:
            continue
        if key in _CONVERTERS:
            out[key] = _convert(key, value)
        elif key in ("write_key", "write_keys"):
            explicit = _table_or_list("write_key", value)
        elif key == "write_key_file":
            key_file = value
        elif key in ("rename", "renames"):
            out["renames"] = _table_or_list("rename", value)
        elif key == "projects":
            out["project_auth"] = _projects(value)
        else:
            raise ConfigError(f"config: unknown setting {key!r}")
    keys = _write_keys(explicit, key_file)
    if keys is not None:
        out["write_keys"] = keys
    return out


def _projects(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError("projects: expected a table of [projects.TOKEN] sections")
    project_auth: dict[str, str] = {}
    for token, section in value.items():
        name = f"projects.{fingerprint(str(token))}"
        if not isinstance(section, Mapping):
            raise ConfigError(f"{name}: expected a table")
        for key in section:
            if key not in ("auth", "infinario_auth", "infinario-auth", "auth_file", "auth-file"):
                raise ConfigError(f"{name}: unknown setting {key!r}")
        inline = [section[k] for k in ("auth", "infinario_auth", "infinario-auth") if k in section]
        files = [section[k] for k in ("auth_file", "auth-file") if k in section]
        if inline and files:
            raise ConfigError(f"{name}: set auth or auth_file, not both")
        if files:
            project_auth[str(token)] = read_auth_file(
                str(token), _convert_path(f"{name}.auth_file", files[0]))
        elif inline:
            if not isinstance(inline[0], str):
                raise ConfigError(f"{name}.auth: expected a string")
            project_auth[str(token)] = inline[0]
    return project_auth


def _from_env(env: Mapping[str, str], only: Collection[str] | None = None) -> dict[str, Any]:
    """The ``Config`` fields ``ROUTER_<SETTING>`` variables set; empty ones are unset."""
    out: dict[str, Any] = {}
    explicit: dict[str, str] | None = None
    key_file: str | None = None
    for name in SETTINGS:
        if only is not None and name not in only:
            continue
        raw = env.get("ROUTER_" + name.upper())
        if raw is None or raw == "":
            continue
        items = [p for p in raw.split(",") if p.strip()]
        if name == "write_key":
            explicit = _pairs(name, items)
        elif name == "rename":
            out["renames"] = _pairs(name, items)
        elif name == "write_key_file":
            key_file = raw
        else:
            out[name] = _convert(name, raw)
    keys = _write_keys(explicit, key_file)
    if keys is not None:
        out["write_keys"] = keys
    return out


def _from_flags(flags: Mapping[str, Any], only: Collection[str] | None = None) -> dict[str, Any]:
    """The ``Config`` fields the command line sets; ``None`` means the flag was not given."""
    out: dict[str, Any] = {}
    explicit: dict[str, str] | None = None
    key_file: Any = None
    for name, value in flags.items():
        if value is None or (only is not None and name not in only):
            continue
        if name == "write_key":
            explicit = _pairs(name, list(value))
        elif name == "rename":
            out["renames"] = _pairs(name, list(value))
        elif name == "write_key_file":
            key_file = value
        elif name in _CONVERTERS:
            out[name] = _convert(name, value)
    keys = _write_keys(explicit, key_file)
    if keys is not None:
        out["write_keys"] = keys
    return out


def _merge(*partials: Mapping[str, Any]) -> dict[str, Any]:
    """Later partials win, field by field; a mapping field is replaced, never merged."""
    merged: dict[str, Any] = {}
    for partial in partials:
        merged.update(partial)
    return merged


def config_path(flag: Path | str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The TOML file to read: ``--config``, else ``ROUTER_CONFIG``, else none."""
    env = os.environ if env is None else env
    if flag:
        return Path(flag)
    from_env = env.get("ROUTER_CONFIG")
    return Path(from_env) if from_env else None


def load(
    *,
    toml: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge the three sources over the defaults and validate the result."""
    env = os.environ if env is None else env
    return Config(**_merge(_from_toml(toml or {}), _from_env(env), _from_flags(flags or {})))


def load_data_dir(
    *,
    toml: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Path:
    """Only the data dir, with the same precedence: tools that need nothing else
    must not fail over an unrelated setting."""
    env = os.environ if env is None else env
    only = ("data_dir",)
    merged = _merge(_from_toml(toml or {}, only), _from_env(env, only),
                    _from_flags(flags or {}, only))
    path: Path = merged.get("data_dir", DEFAULT_DATA_DIR)
    return path
