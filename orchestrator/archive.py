"""Where destroyed machines' databases go: compressed blobs in an archive store.

The store is a tiny key/blob interface so an object store (S3 and friends) can replace the
default directory. ``put`` must be atomic: after a crash a key either holds the whole blob or is
absent, and putting the same key again overwrites it (archiving is retried after a crash).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, runtime_checkable

from corrosion.files import write_durably

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise ValueError(f"invalid archive key {key!r}")
    return key


@runtime_checkable
class ArchiveStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def list_keys(self) -> list[str]: ...


class DirectoryArchive:
    """Blobs as files in one directory, written to a temp file, fsynced, then renamed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes) -> None:
        write_durably(self.path / _check_key(key), data)

    def get(self, key: str) -> bytes:
        path = self.path / _check_key(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def list_keys(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))


class MemoryArchive:
    """In-memory archive for tests and the simulator."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> None:
        self.blobs[_check_key(key)] = bytes(data)

    def get(self, key: str) -> bytes:
        return self.blobs[_check_key(key)]

    def list_keys(self) -> list[str]:
        return sorted(self.blobs)
