"""The machines directory: one step-log database per machine, plus the archive of destroyed ones.

Layout: ``<path>/<machine_id>.sqlite`` (with its ``-wal``/``-shm``) and ``<path>/.lock``. The lock
(``flock``) makes one orchestrator process the owner of a directory; it is released by the kernel
when that process dies, so a restarted orchestrator after SIGKILL takes over at once.

Open logs are kept in an LRU of ``max_open`` entries; an evicted log closes its connection and
reopens on next use, so thousands of machines do not exhaust file descriptors.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import threading
from collections import OrderedDict
from pathlib import Path

from .archive import ArchiveStore, DirectoryArchive
from .errors import MachineExistsError, StoreLockedError, UnknownMachineError
from .ids import check_machine_id
from .steplog import MachineLog

SUFFIX = ".sqlite"


def archive_key(machine_id: str) -> str:
    return f"{machine_id}{SUFFIX}.gz"


class MachineStore:
    """Owns the per-machine databases under ``path`` and moves destroyed ones to ``archive``."""

    def __init__(
        self,
        path: str | Path,
        archive: ArchiveStore | None = None,
        *,
        max_open: int = 256,
        lock: bool = True,
        vfs: str | None = None,
    ) -> None:
        """``vfs``: the SQLite VFS the machines' logs are opened through (None: the default)."""
        self.path = Path(path)
        self.vfs = vfs
        self.path.mkdir(parents=True, exist_ok=True)
        self.archive_store: ArchiveStore = (
            archive if archive is not None else DirectoryArchive(self.path / "archive")
        )
        self._max_open = max(1, max_open)
        self._logs: OrderedDict[str, MachineLog] = OrderedDict()
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        if lock:
            self._acquire_lock()

    def _acquire_lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{self.path} is in use by another orchestrator process"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        with self._mutex:
            for log in self._logs.values():
                log.close()
            self._logs.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _file(self, machine_id: str) -> Path:
        return self.path / f"{check_machine_id(machine_id)}{SUFFIX}"

    def machine_ids(self) -> list[str]:
        """Machines with a database here, sorted."""
        return sorted(
            p.name[: -len(SUFFIX)]
            for p in self.path.iterdir()
            if p.name.endswith(SUFFIX) and p.is_file()
        )

    def exists(self, machine_id: str) -> bool:
        return self._file(machine_id).exists()

    def log(self, machine_id: str) -> MachineLog:
        """The log of an existing machine."""
        path = self._file(machine_id)
        with self._mutex:
            log = self._logs.get(machine_id)
            if log is not None:
                self._logs.move_to_end(machine_id)
                return log
            if not path.exists():
                raise UnknownMachineError(machine_id)
            return self._remember(machine_id, MachineLog(path, vfs=self.vfs))

    def create(self, machine_id: str) -> MachineLog:
        """A fresh database for a new machine (its schema is created on first use)."""
        path = self._file(machine_id)
        with self._mutex:
            if machine_id in self._logs or path.exists():
                raise MachineExistsError(f"machine {machine_id} already exists")
            log = MachineLog(path, vfs=self.vfs)
            log.open()
            return self._remember(machine_id, log)

    def discard(self, machine_id: str) -> None:
        """Delete a machine's database outright (a create that never committed its START)."""
        path = self._file(machine_id)
        with self._mutex:
            log = self._logs.pop(machine_id, None)
        if log is not None:
            log.close()
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)

    def _remember(self, machine_id: str, log: MachineLog) -> MachineLog:
        self._logs[machine_id] = log
        while len(self._logs) > self._max_open:
            _, old = self._logs.popitem(last=False)
            old.close()  # reopens lazily if someone still holds it
        return log

    def archive(self, machine_id: str) -> str:
        """Compress the machine's database into the archive store, then delete it here.

        Safe to repeat after a crash: the archive put is atomic and overwrites, and the local
        files are removed only after it succeeded.
        """
        path = self._file(machine_id)
        if not path.exists():
            raise UnknownMachineError(machine_id)
        log = self.log(machine_id)
        log.checkpoint()
        log.close()
        key = archive_key(machine_id)
        self.archive_store.put(key, gzip.compress(path.read_bytes(), compresslevel=6))
        self.discard(machine_id)
        return key

    def is_archived(self, machine_id: str) -> bool:
        """Whether the archive store holds the machine's database."""
        try:
            return archive_key(machine_id) in self.archive_store.list_keys()
        except ValueError:
            return False

    def restore_archived(self, machine_id: str, dest: str | Path) -> MachineLog:
        """Unpack an archived database to ``dest`` and open it (for inspection)."""
        data = gzip.decompress(self.archive_store.get(archive_key(check_machine_id(machine_id))))
        dest = Path(dest)
        dest.write_bytes(data)
        return MachineLog(dest)
