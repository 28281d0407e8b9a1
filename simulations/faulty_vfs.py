"""A fault-injecting SQLite VFS: power cuts that lose or tear unsynced writes, and read errors.

:class:`FaultyVFS` is an ``apsw.VFS`` over the default one: files are real files, every call
goes through to the operating system, and the VFS keeps, per file, its *durable* image (the
content as of its last ``xSync``) and the log of writes and truncations since. A power cut
(:meth:`FaultyVFS.cut_power`, or :meth:`FaultyVFS.cut_power_after` a number of writes) makes
every later write, sync and delete a silent no-op (the process is "dead": what it does next
never reaches the disk); :meth:`FaultyVFS.recover` then rewrites each file as the disk would
hold it after the cut: the durable image plus a seeded random prefix of the unsynced log, the
first write past the prefix possibly torn (a random number of its 512-byte sectors kept). Reads
fail with ``SQLITE_IOERR`` when asked (:meth:`FaultyVFS.fail_reads`).

Simplifications, on the safe side for SQLite's own assumptions: a sync makes the whole file
durable (directory entries included); deletes are durable at once; the shared-memory WAL index
(``-shm``) is not tracked (SQLite rebuilds it from the WAL after the last connection closes);
a file the process removed without the VFS (``os.unlink``) stays removed.
Every choice comes from the ``random.Random`` given, so a seed replays the same faults.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import apsw

__all__ = ["FaultyVFS"]

SECTOR = 512


@dataclass
class _Image:
    """One file as the disk holds it durably (None: absent), and the operations since."""

    durable: bytearray | None
    unsynced: list[tuple[int, bytes] | int] = field(default_factory=list)  # write | truncate


def _apply(buf: bytearray, op: tuple[int, bytes] | int) -> None:
    if isinstance(op, int):
        del buf[op:]
        buf.extend(bytes(op - len(buf)))
        return
    offset, data = op
    if offset > len(buf):
        buf.extend(bytes(offset - len(buf)))
    buf[offset : offset + len(data)] = data


class FaultyVFS(apsw.VFS):
    """Register under ``name`` (pass ``vfs=name`` to ``apsw.Connection``); ``rng`` decides
    what survives a power cut. ``injected`` lists, in order, every fault that took effect."""

    def __init__(self, name: str, rng: random.Random, *, torn: bool = True) -> None:
        super().__init__(name, "")
        self.name = name
        self.rng = rng
        self.torn = torn
        self.down = False
        self.files: dict[str, _Image] = {}
        self.injected: list[str] = []
        self.on_cut: Callable[[], object] | None = None
        """Called when the power goes (a simulated machine stops sending: ``power_cuts``)."""
        self._writes_left: int | None = None
        self._counted: Callable[[str], bool] | None = None
        self._reads_ok: int | None = None
        self._reads_failing = 0

    # -- faults --------------------------------------------------------------------------------

    def cut_power(self) -> None:
        """From now on nothing reaches the disk (until :meth:`recover`)."""
        if not self.down:
            self.down = True
            self.injected.append("power cut")
            if self.on_cut is not None:
                self.on_cut()

    def cut_power_after(self, writes: int, only: Callable[[str], bool] | None = None) -> None:
        """Cut the power just before the ``writes + 1``-th write from now; with ``only``,
        counting only writes to the files whose name (without folder) it accepts."""
        self._writes_left = writes
        self._counted = only

    @property
    def cut_armed(self) -> bool:
        """A :meth:`cut_power_after` is still to come."""
        return self._writes_left is not None

    def fail_reads(self, after: int, count: int = 1) -> None:
        """Let ``after`` reads through, then fail the next ``count`` with ``SQLITE_IOERR``."""
        self._reads_ok, self._reads_failing = after, count

    def clear_faults(self) -> None:
        self._writes_left = self._reads_ok = None
        self._counted = None
        self._reads_failing = 0

    def recover(self) -> list[str]:
        """After a power cut (every connection closed): rewrite each file as the disk holds it,
        power back on, and return what was lost, one line per file that lost anything."""
        lost: list[str] = []
        for path, image in sorted(self.files.items()):
            ops = image.unsynced
            if ops and not os.path.exists(path):
                image.durable, image.unsynced = None, []  # removed by the process, not through
                continue  # the VFS (a discarded machine's log): deletes are durable at once
            if ops:
                keep = self.rng.randint(0, len(ops))
                buf = None if image.durable is None else bytearray(image.durable)
                if buf is None and keep:
                    buf = bytearray()
                for op in ops[:keep]:
                    assert buf is not None
                    _apply(buf, op)
                note = f"{os.path.basename(path)}: kept {keep} of {len(ops)} unsynced writes"
                if keep < len(ops) and self.torn and not isinstance(ops[keep], int):
                    offset, data = ops[keep]  # type: ignore[misc]
                    sectors = self.rng.randint(0, (len(data) - 1) // SECTOR)
                    if sectors:
                        buf = buf if buf is not None else bytearray()
                        _apply(buf, (offset, data[: sectors * SECTOR]))
                        note += f", the next torn after {sectors * SECTOR} of {len(data)} bytes"
                lost.append(note)
                self._write_out(path, buf)
                image.durable = buf
                image.unsynced = []
        self.injected += lost
        self.down = False
        self.clear_faults()
        return lost

    @staticmethod
    def _write_out(path: str, buf: bytearray | None) -> None:
        if buf is None:
            if os.path.exists(path):
                os.remove(path)
            return
        with open(path, "wb") as f:
            f.write(buf)

    # -- the VFS -------------------------------------------------------------------------------

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> apsw.VFSFile:
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        if path is not None and path not in self.files:
            durable = None
            if os.path.exists(path):
                with open(path, "rb") as f:
                    durable = bytearray(f.read())
            self.files[path] = _Image(durable)
        return _FaultyFile(self, path, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        if self.down:
            return
        super().xDelete(filename, syncdir)
        if filename in self.files:
            self.files[filename] = _Image(None)

    def _write(self, image: _Image | None, op: tuple[int, bytes] | int, what: str) -> bool:
        """Whether the write reaches the file (False once the power is cut)."""
        if self._writes_left is not None and (self._counted is None or self._counted(what)):
            if self._writes_left == 0:
                self._writes_left = None
                self.cut_power()
            else:
                self._writes_left -= 1
        if self.down:
            return False
        if image is not None:
            image.unsynced.append(op)
        return True

    def _read(self, what: str) -> None:
        if self._reads_ok is None:
            return
        if self._reads_ok > 0:
            self._reads_ok -= 1
            return
        if self._reads_failing > 0:
            self._reads_failing -= 1
            self.injected.append(f"read error on {what}")
            if self._reads_failing == 0:
                self._reads_ok = None
            raise apsw.IOError(f"injected read error on {what}")


class _FaultyFile(apsw.VFSFile):
    def __init__(
        self, vfs: FaultyVFS, path: str | None, name: str | apsw.URIFilename | None, flags: list
    ) -> None:
        super().__init__("", name, flags)
        self.vfs = vfs
        self.image = vfs.files.get(path) if path is not None else None
        self.what = os.path.basename(path) if path else "a temporary file"

    def xRead(self, amount: int, offset: int) -> bytes:
        self.vfs._read(self.what)
        return super().xRead(amount, offset)

    def xWrite(self, data: bytes, offset: int) -> None:
        if self.vfs._write(self.image, (offset, bytes(data)), self.what):
            super().xWrite(data, offset)

    def xTruncate(self, newsize: int) -> None:
        if self.vfs._write(self.image, newsize, self.what):
            super().xTruncate(newsize)

    def xSync(self, flags: int) -> None:
        if self.vfs.down:
            return
        super().xSync(flags)
        image = self.image
        if image is not None and image.unsynced:
            buf = image.durable if image.durable is not None else bytearray()
            for op in image.unsynced:
                _apply(buf, op)
            image.durable, image.unsynced = buf, []
