"""The machines directory: one step-log database per machine, plus the archive of destroyed ones.

Layout: ``<path>/<machine_id>.sqlite`` (with its ``-wal``/``-shm``) and ``<path>/.lock``. The lock
(``flock``) makes one orchestrator process the owner of a directory; it is released by the kernel
when that process dies, so a restarted orchestrator after SIGKILL takes over at once.

Open logs are kept in an LRU of ``max_open`` entries; an evicted log closes its connection and
reopens on next use, so thousands of machines do not exhaust file descriptors.

The store also remembers each database's schema status (``schema_status``), as its logs learn
it from whichever thread opened or migrated them (a status is an immutable value, set under its
own lock); ``take_schema_changes`` hands the machines whose status changed to the event loop,
which publishes them. A machine whose file cannot be opened at all (damaged) is recorded FAILED
and left out of ``machine_ids`` so the worker still starts; its file is not touched.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from .archive import ArchiveStore, DirectoryArchive
from .errors import MachineExistsError, StoreLockedError, UnknownMachineError
from .ids import check_machine_id
from .steplog import MachineLog
from .steplog_schema import CURRENT_TARGET, FAILED, PENDING, SchemaStatus, SchemaTarget

SUFFIX = ".sqlite"
TEMPLATE_SUFFIX = ".new"  # ``.<id>.sqlite.new``: a database being created (never listed)


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
        target: SchemaTarget = CURRENT_TARGET,
        vfs: str | None = None,
    ) -> None:
        """``target``: the step-log schema this release writes (tests pass a later one).
        ``vfs``: the SQLite VFS the machines' logs are opened through (None: the default)."""
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
        self.target = target
        self._status_lock = threading.Lock()  # never held while taking _mutex or a log's lock
        self._status: dict[str, SchemaStatus] = {}
        self._status_changed: dict[str, None] = {}
        self._unreadable: set[str] = set()
        self._template_bytes: bytes | None = None
        if lock:
            self._acquire_lock()
            for debris in self.path.glob(f".*{SUFFIX}{TEMPLATE_SUFFIX}"):  # a create cut short
                debris.unlink(missing_ok=True)
            for scratch in self.path.glob(".template-*"):
                shutil.rmtree(scratch, ignore_errors=True)

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
        """Machines with a database here, sorted (but not those found unreadable)."""
        with self._status_lock:
            unreadable = set(self._unreadable)
        return sorted(
            mid
            for p in self.path.iterdir()
            if p.name.endswith(SUFFIX) and p.is_file()
            and (mid := p.name[: -len(SUFFIX)]) not in unreadable
        )  # fmt: skip

    # --- schema status ------------------------------------------------------------------------

    def schema_status(self, machine_id: str) -> SchemaStatus | None:
        """The machine database's schema status, once a log has opened it (None before)."""
        with self._status_lock:
            return self._status.get(machine_id)

    def schema_statuses(self) -> dict[str, SchemaStatus]:
        with self._status_lock:
            return dict(self._status)

    def pending_migrations(self) -> list[str]:
        """Machines whose database is on an older schema and not yet migrated, sorted."""
        with self._status_lock:
            return sorted(m for m, st in self._status.items() if st.state == PENDING)

    def take_schema_changes(self) -> list[str]:
        """The machines whose schema status changed since the last call (for publishing)."""
        with self._status_lock:
            out = list(self._status_changed)
            self._status_changed.clear()
        return out

    def release(self, machine_id: str) -> None:
        """Close the machine's log if it is open (it reopens on next use), so that another
        process may work on the file without this one's cached view of it."""
        with self._mutex:
            log = self._logs.pop(machine_id, None)
        if log is not None:
            log.close()

    def file_of(self, machine_id: str) -> Path:
        """The machine's database file (UnknownMachineError when there is none)."""
        path = self._file(machine_id)
        if not path.exists():
            raise UnknownMachineError(machine_id)
        return path

    def record_status(self, machine_id: str, status: SchemaStatus) -> None:
        """A status learned outside this store's logs (a migration in another process)."""
        self._record_status(machine_id, status)

    def _record_status(self, machine_id: str, status: SchemaStatus) -> None:
        with self._status_lock:
            if self._status.get(machine_id) != status:
                self._status[machine_id] = status
                self._status_changed[machine_id] = None

    def mark_unreadable(self, machine_id: str, error: BaseException) -> SchemaStatus:
        """Record that the machine's file cannot be read at all (left as it is, skipped)."""
        status = SchemaStatus(0, "", FAILED, f"unreadable: {type(error).__name__}: {error}")
        self._record_status(machine_id, status)
        with self._status_lock:
            self._unreadable.add(machine_id)
        return status

    def migrate(self, machine_id: str) -> SchemaStatus:
        """Migrate one machine's database now if it is older (call from a worker thread).

        A log not in the LRU is opened for this alone and closed after, so a background sweep
        does not evict the logs in use. Should an API call open the same file meanwhile, SQLite's
        locking serializes the two and the migration, re-checked in its transaction, runs once.
        """
        with self._mutex:
            log = self._logs.get(machine_id)
        if log is not None:
            return log.migrate()
        path = self._file(machine_id)
        if not path.exists():
            raise UnknownMachineError(machine_id)
        log = self._new_log(machine_id, path)
        try:
            return log.migrate()
        finally:
            log.close()

    def _new_log(self, machine_id: str, path: Path) -> MachineLog:
        status = self.schema_status(machine_id)
        return MachineLog(
            path,
            vfs=self.vfs,
            target=self.target,
            failed=status if status is not None and status.state == FAILED else None,
            on_status=lambda st: self._record_status(machine_id, st),
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
            return self._remember(machine_id, self._new_log(machine_id, path))

    def create(self, machine_id: str) -> MachineLog:
        """A fresh database for a new machine: a copy of the empty database of the current
        schema (:meth:`_template`), written under a temporary name, fsynced and renamed into
        place, so the file is whole or absent — two fsyncs, where making it in place (switching
        it to WAL, creating the schema) takes four and the schema work."""
        path = self._file(machine_id)
        with self._mutex:
            if machine_id in self._logs or path.exists():
                raise MachineExistsError(f"machine {machine_id} already exists")
            tmp = path.with_name(f".{path.name}{TEMPLATE_SUFFIX}")
            with open(tmp, "wb") as f:
                f.write(self._template())
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)  # the rename survives a power cut
            finally:
                os.close(fd)
            log = self._new_log(machine_id, path)
            log.open()
            return self._remember(machine_id, log)

    def _template(self) -> bytes:
        """An empty step-log database of ``target``, in WAL mode, checkpointed (made once per
        store, in a scratch directory)."""
        if self._template_bytes is None:
            with tempfile.TemporaryDirectory(dir=self.path, prefix=".template-") as scratch:
                scratch_log = MachineLog(Path(scratch) / f"template{SUFFIX}", target=self.target)
                try:
                    scratch_log.open()
                    scratch_log.checkpoint()
                finally:
                    scratch_log.close()
                self._template_bytes = (Path(scratch) / f"template{SUFFIX}").read_bytes()
        return self._template_bytes

    def discard(self, machine_id: str) -> None:
        """Delete a machine's database outright (a create that never committed its START)."""
        path = self._file(machine_id)
        with self._mutex:
            log = self._logs.pop(machine_id, None)
        if log is not None:
            log.close()
        with self._status_lock:
            self._status.pop(machine_id, None)
            self._unreadable.discard(machine_id)
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
