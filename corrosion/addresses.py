"""``(host, port)`` addresses as the config and the logs write them. Below both ``config`` and
``logs`` (the config checks log levels with ``logs``)."""

from __future__ import annotations

Address = tuple[str, int]


def format_addr(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
