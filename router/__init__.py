"""Relay Segment-spec analytics calls to Infinario (Bloomreach Engagement)."""

from __future__ import annotations

__version__ = "0.1.0"

from .app import Router, open_router, serve
from .commands import Command
from .config import Config
from .errors import ConfigError, Rejected, RouterError, StartupError
from .intake import Accepted, Overloaded

__all__ = [
    "Accepted",
    "Command",
    "Config",
    "ConfigError",
    "Overloaded",
    "Rejected",
    "Router",
    "RouterError",
    "StartupError",
    "open_router",
    "serve",
]
