"""structlog set-up: JSON lines on stderr by default, or a console format.

Every line passes through ``redact`` first: project tokens, credentials and
passwords in URLs must not end up in log storage, which is usually readable by
far more people than the relay's configuration.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from .config import fingerprint, redact_url

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

# Keys whose values are secrets, or project tokens (which are credentials for
# Infinario's legacy API): ``project``, ``token``, ``auth``, ``write_key``,
# ``authorization``, ``password``, ``secret`` and names ending in one of them.
_SECRET_KEY = re.compile(
    r"(^|_)(project|project_token|token|auth|authorization|password|secret|write_key|"
    r"api_key)$", re.IGNORECASE)
# Nested values are walked this deep; deeper ones are logged as they are.
_MAX_DEPTH = 4


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key.replace("-", "_")))


def _hide(value: Any) -> Any:
    """A stand-in for a secret value: a fingerprint for text, ``***`` for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        return fingerprint(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_hide(item) for item in value]
    return "***"


def _clean(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return redact_url(value) if "@" in value else value
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {k: _hide(v) if isinstance(k, str) and is_secret_key(k) else _clean(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item, depth + 1) for item in value]
    return value


def redact(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: fingerprint secret-named values, hide passwords in URLs."""
    for key, value in event_dict.items():
        if is_secret_key(key):
            event_dict[key] = _hide(value)
        else:
            event_dict[key] = _clean(value, 0)
    return event_dict


def configure(level: str = "info", fmt: str = "json") -> None:
    numeric = _LEVELS[level.lower()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            # After format_exc_info, so a URL quoted in a traceback is redacted too.
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library: their warnings, one per line.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
