"""Logging for operators: formats and level filters.

The library only emits records through stdlib ``logging`` under per-concept loggers
(``corrosion.agent``, ``corrosion.members``, ``corrosion.schema``, ``corrosion.sync``,
``corrosion.apply``, ``corrosion.broadcast``, ``corrosion.admin``, ``orchestrator.engine``, ...);
an embedding application receives them through its own logging set-up. Only the CLI installs a
handler (``setup_logging``).

Level filters are strings like ``info`` or ``info,corrosion.sync=debug``: a bare level is the
default (the root logger), ``name=level`` sets one logger and its children. They come from
``log.level`` in the config, the ``CORROSION_LOG`` environment variable (which wins), and
``corrosion log set`` at run time (through the admin socket; ``corrosion log reset`` goes back).
What keeps INFO readable under load is the runtime's (``corrosion.runtime.activity``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

ENV_VAR = "CORROSION_LOG"
DEFAULT_LEVEL = "info"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# third-party loggers that speak at INFO/DEBUG about every request: quiet unless named
QUIET = {"uvicorn": logging.WARNING, "hypercorn": logging.WARNING, "httpx": logging.WARNING}
QUIET_DEBUG = {"httpcore": logging.WARNING, "hpack": logging.WARNING, "h11": logging.WARNING}


# -- formats -----------------------------------------------------------------------------------


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC), ``level``, ``target`` (the logger), ``msg``, the
    record's ``fields`` (``extra={"fields": {...}}``) and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "target": record.name,
            "msg": record.getMessage(),
        }
        for k, v in getattr(record, "fields", {}).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class PlainFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <message> key=value ...`` (colored by level on a terminal); the
    fields the message already shows, empty ones and mappings are left out."""

    COLORS = {"WARNING": "\x1b[33m", "ERROR": "\x1b[31m", "CRITICAL": "\x1b[31m"}

    def __init__(self, colors: bool) -> None:
        super().__init__()
        self.colors = colors

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        for k, v in getattr(record, "fields", {}).items():
            if not v or isinstance(v, dict):  # empty, or detail the message summarises
                continue
            value = ",".join(map(str, v)) if isinstance(v, list) else str(v)
            if value not in message:  # the message already says it
                text += f" {k}={value}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        color = self.COLORS.get(record.levelname) if self.colors else None
        return f"{color}{text}\x1b[0m" if color else text


# -- levels ------------------------------------------------------------------------------------


def parse_levels(spec: object) -> dict[str, int]:
    """``"info,corrosion.sync=debug"`` → ``{"": INFO, "corrosion.sync": DEBUG}``; ValueError
    naming the bad part otherwise. The default (``""``, the root logger) is INFO unless given."""
    if not isinstance(spec, str):
        raise ValueError(f"expected a level string such as 'info', got {spec!r}")
    out: dict[str, int] = {"": LEVELS[DEFAULT_LEVEL]}
    names = ", ".join(k for k in LEVELS if k != "warn")
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, level = part.rpartition("=")
        name = name.strip()
        if sep and not name:
            raise ValueError(f"{part!r}: a logger name is expected before '='")
        value = LEVELS.get(level.strip().lower())
        if value is None:
            raise ValueError(f"unknown level {level.strip()!r} (use one of: {names})")
        out[name] = value
    return out


class _Levels:
    """The levels this module set, so that a new filter replaces the old one and ``reset``
    restores what the start-up filter (or, embedded, the application) had."""

    def __init__(self) -> None:
        self.original: dict[str, int] = {}  # logger -> its level before we first set it
        self.startup: str | None = None
        self.current: str | None = None

    def apply(self, spec: str) -> None:
        levels = parse_levels(spec)  # raises before anything changes
        quiet = dict(QUIET)
        if levels[""] <= logging.DEBUG:
            quiet.update(QUIET_DEBUG)
        for name, level in quiet.items():
            if not any(n == name or n.startswith(name + ".") for n in levels):
                levels[name] = level
        for name in self.original:
            if name not in levels:
                logging.getLogger(name or None).setLevel(self.original[name])
        for name, level in levels.items():
            logger = logging.getLogger(name or None)
            self.original.setdefault(name, logger.level)
            logger.setLevel(level)
        self.current = spec

    def reset(self) -> None:
        if self.startup is not None:
            self.apply(self.startup)
            return
        for name, level in self.original.items():
            logging.getLogger(name or None).setLevel(level)
        self.original.clear()
        self.current = None


_levels = _Levels()


def set_levels(spec: str) -> str:
    """Replace the level filter (``corrosion log set``); returns the filter now in force."""
    _levels.apply(spec)
    return spec


def reset_levels() -> str | None:
    """Back to the start-up filter (``corrosion log reset``); returns it (None when the
    process never set one: the application's own levels are restored)."""
    _levels.reset()
    return _levels.current


def current_levels() -> str | None:
    return _levels.current


def level_spec(configured: str, env: Mapping[str, str]) -> str:
    """The filter to start with: ``CORROSION_LOG`` when set, else ``log.level``."""
    value = env.get(ENV_VAR, "").strip()
    return value or configured


def setup_logging(fmt: str, colors: bool, levels: str = DEFAULT_LEVEL) -> None:
    """The CLI's logging: one stderr handler in ``fmt`` (``plaintext`` or ``json``) and the level
    filter ``levels`` (ValueError when invalid, before anything changes)."""
    parse_levels(levels)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter(colors and sys.stderr.isatty()))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    _levels.apply(levels)
    _levels.startup = levels
