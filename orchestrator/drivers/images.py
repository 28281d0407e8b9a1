"""Local images for the runc driver: root filesystems, looked up by name.

An image here is a directory ``<images>/<name>/rootfs`` with an ``image.json`` (default ``cmd``
and ``env``). ``busybox`` is built on first use from the host's static busybox (Debian's
``busybox-static``): the binary, a symlink per applet, and the empty mount points runc needs in a
read-only root. Names are reduced to their last path component without tag or digest
(``library/busybox:1.36`` is ``busybox``). A reference that names a registry host
(``10.0.0.9:5000/app:v1``) is not looked up here but pulled (:mod:`.oci`).

Root filesystems are shared read-only by every container of the image, with tmpfs on ``/tmp`` and
``/run``: a stopped machine that starts again gets the image's pristine state, as on Fly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .base import DriverError, ImageNotFoundError

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ImageUser:
    """Who the image's command runs as (its config's ``User``, resolved to numbers)."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Image:
    """A root filesystem and how to run it: ``entrypoint`` + ``cmd`` (the config's
    Entrypoint and Cmd), ``env`` (``KEY=value``), the working directory ``cwd`` and ``user``
    (None: root)."""

    name: str
    rootfs: Path
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    entrypoint: tuple[str, ...] = ()
    cwd: str = "/"
    user: ImageUser | None = None

    def command(self, cmd: tuple[str, ...] = (), *, cmd_only: bool = False) -> tuple[str, ...]:
        """What to run, as Docker and Fly do: the image's entrypoint and command by default;
        a machine's ``cmd`` replaces the image's command and keeps its entrypoint when it is
        ``init.cmd`` alone (``cmd_only``), and replaces both otherwise (``init.exec``, or an
        ``init.entrypoint`` of its own)."""
        if not cmd:
            return self.entrypoint + self.cmd
        return self.entrypoint + cmd if cmd_only else cmd


def image_name(ref: str) -> str:
    name = ref.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    if not _NAME_RE.match(name):
        raise ImageNotFoundError(ref)
    return name


def static_executable(candidates: tuple[str, ...]) -> str | None:
    """The first candidate that is a statically linked executable, or None (a dynamically
    linked one cannot run in a bare rootfs)."""
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            if b"ld-linux" not in head and b"/lib64/ld" not in head:
                return path
    return None


def static_busybox() -> str | None:
    """Path of a statically linked busybox, or None."""
    return static_executable(BUSYBOX_CANDIDATES)


class ImageStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def resolve(self, ref: str) -> Image:
        """The image for ``ref``, building ``busybox`` if needed; ImageNotFoundError otherwise."""
        name = image_name(ref)
        d = self.path / name
        if not (d / "image.json").exists():
            if name != "busybox":
                raise ImageNotFoundError(ref)
            with self._lock:
                if not (d / "image.json").exists():
                    self._build_busybox(d)
        meta = json.loads((d / "image.json").read_text())
        return Image(name, d / "rootfs", tuple(meta.get("cmd", ())), tuple(meta.get("env", ())))

    def add(self, name: str, rootfs: str | Path, *, cmd=("sh",), env=()) -> Image:
        """Register an existing root filesystem directory (copied) as image ``name``."""
        name = image_name(name)
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".build-"))
        shutil.copytree(rootfs, tmp / "rootfs", symlinks=True)
        self._finish(tmp, self.path / name, cmd, env)
        return self.resolve(name)

    def _build_busybox(self, dest: Path) -> None:
        busybox = static_busybox()
        if busybox is None:
            raise DriverError(
                "image busybox needs a static busybox (apt-get install busybox-static)",
                transient=False,
            )
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".build-"))
        root = tmp / "rootfs"
        for sub in ("bin", "dev", "proc", "sys", "tmp", "run", "etc", "root", "var", "home"):
            (root / sub).mkdir(parents=True)
        os.chmod(root / "tmp", 0o1777)
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = subprocess.run(
            [busybox, "--list"], check=True, capture_output=True, text=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                os.symlink("busybox", root / "bin" / applet)
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        self._finish(tmp, dest, ("sh",), ("PATH=/bin",))

    @staticmethod
    def _finish(tmp: Path, dest: Path, cmd, env) -> None:
        (tmp / "image.json").write_text(json.dumps({"cmd": list(cmd), "env": list(env)}))
        try:
            os.rename(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (dest / "image.json").exists():
                raise
