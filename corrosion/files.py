"""Files written so that a crash at any moment leaves either the old content or the new one,
never a torn file: a temporary file in the same folder, fsynced, renamed over the target, and
the folder fsynced so the rename survives a power cut. Shared by every layer (the orchestrator's
state files and archive, the templates ``corrosion template`` renders)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_durably(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """``data`` as the whole content of ``path``, or (after a crash) the old content: never a
    torn file. The temporary file is a dot-file beside it, removed on failure; ``mode``: the
    permission bits the new file gets (default: mkstemp's 0o600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json_durably(path: Path, data: Any) -> None:
    write_durably(path, json.dumps(data, sort_keys=True).encode())


__all__ = ["write_durably", "write_json_durably"]
