"""Volumes: the host directories behind a machine's ``config.mounts``.

A volume is a directory ``<volumes_path>/<app>/<volume>`` on the worker (by default under the
machines directory, ``<machines_path>/_volumes``). It outlives the machine's instances: stop,
start, restart and update give the new instance the same directory, so its data is still there.
Destroying the machine deletes the volumes its config mounts, except a mount that says
``"keep_on_destroy": true`` (this orchestrator's knob; Fly keeps volumes as separate resources):
that directory stays, and a later machine of the same app mounting the same volume name sees
its data. An update that drops a mount keeps its directory: only destroy deletes data.

A volume is mounted by at most one live machine of an app at a time (as on Fly), checked when a
config is accepted.
"""

from __future__ import annotations

import posixpath
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError

VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_FLY_FIELDS = {"name", "size_gb", "encrypted", "add_size_gb", "extend_threshold_percent",
               "size_gb_limit"}  # fmt: skip
_FIELDS = {"volume", "path", "keep_on_destroy"} | _FLY_FIELDS


def validate_mounts(raw: Any) -> list[dict[str, Any]]:
    """``config.mounts`` normalized, or InvalidRequestError naming the bad field."""
    if not isinstance(raw, list) or not all(isinstance(x, Mapping) for x in raw):
        raise InvalidRequestError("config.mounts: expected a list of objects")
    out: list[dict[str, Any]] = []
    seen_paths: set[str] = set()
    seen_volumes: set[str] = set()
    for i, mount in enumerate(raw):
        field = f"config.mounts[{i}]"
        unknown = sorted(set(mount) - _FIELDS)
        if unknown:
            raise InvalidRequestError(f"{field}: unknown field(s) {', '.join(unknown)}")
        volume = mount.get("volume")
        if not isinstance(volume, str) or not VOLUME_NAME.match(volume):
            raise InvalidRequestError(
                f"{field}.volume: required, letters, digits, '_', '.', '-' (at most 63)"
            )
        path = mount.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidRequestError(f"{field}.path: required, an absolute path")
        norm = posixpath.normpath(path)
        if norm == "/" or ".." in path.split("/") or any(ord(c) < 0x20 for c in path):
            raise InvalidRequestError(f"{field}.path: {path!r} cannot be mounted over")
        if norm in seen_paths:
            raise InvalidRequestError(f"{field}.path: {norm} is mounted twice")
        if volume in seen_volumes:
            raise InvalidRequestError(f"{field}.volume: {volume} is mounted twice")
        keep = mount.get("keep_on_destroy", False)
        if not isinstance(keep, bool):
            raise InvalidRequestError(f"{field}.keep_on_destroy: expected true or false")
        size = mount.get("size_gb")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise InvalidRequestError(f"{field}.size_gb: expected a positive integer")
        seen_paths.add(norm)
        seen_volumes.add(volume)
        entry = {k: v for k, v in mount.items() if k in _FLY_FIELDS}
        out.append({**entry, "volume": volume, "path": norm, "keep_on_destroy": keep})
    return out


def check_unshared(
    machine_id: str, mounts: Iterable[Mapping[str, Any]], others: Iterable[Mapping[str, Any]]
) -> None:
    """Refuse a volume another live machine of the app already mounts."""
    wanted = {mt["volume"] for mt in mounts}
    for doc in others:
        if doc["id"] == machine_id or doc["state"] == "destroyed":
            continue
        for mt in doc["config"].get("mounts") or ():
            if mt["volume"] in wanted:
                raise InvalidRequestError(
                    f"config.mounts: volume {mt['volume']} is mounted by machine {doc['id']}"
                )


class Volumes:
    """The worker's volume directories."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()

    def directory(self, app: str, volume: str) -> Path:
        return self.path / app / volume

    def attach(self, app: str, mounts: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
        """Create the volumes' directories (kept if they exist); (host dir, path) pairs."""
        pairs = []
        for mt in mounts:
            d = self.directory(app, mt["volume"])
            d.mkdir(parents=True, exist_ok=True)
            pairs.append((str(d), mt["path"]))
        return tuple(pairs)

    def release(self, app: str, mounts: Iterable[Mapping[str, Any]]) -> None:
        """Delete the volumes of a destroyed machine, except those it keeps. Idempotent."""
        for mt in mounts:
            if not mt.get("keep_on_destroy"):
                shutil.rmtree(self.directory(app, mt["volume"]), ignore_errors=True)
