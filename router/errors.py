"""The router's error vocabulary.

    RouterError                 base of everything the router raises on purpose
    ├── ConfigError             a setting is wrong; names the setting (exit 2)
    ├── StartupError            the data dir cannot be used (locked, unwritable, corrupt)
    └── Rejected                a Segment message or request the router refuses,
                                carrying the HTTP status and the reason code
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class for errors the router raises on purpose."""


class ConfigError(RouterError):
    """A configuration value is invalid; the message names the setting."""


class StartupError(RouterError):
    """The relay cannot start with this data directory."""


class Rejected(RouterError):
    """Input the router refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}
