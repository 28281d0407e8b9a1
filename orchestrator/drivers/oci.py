"""Images from an OCI registry: pull by digest into a shared cache, unpack, give each instance a
writable root.

Why skopeo and umoci (Debian's packages) rather than our own client: the registry protocol has
more corners than its happy path (token auth, manifest lists, Docker schema 2 vs OCI media types,
blob redirects) and unpacking has subtle ones (whiteouts, hard links, device nodes, xattrs, a
symlink in a layer that must not let a later layer write outside the root). skopeo
(containers/image, what podman and buildah use) and umoci (from the OCI project) are maintained,
packaged for Debian, verify every blob's sha256 as they read it and get those corners right; no
Python OCI client is as well kept. What is ours is small: the reference syntax, the cache and its
lock, the per-instance writable layer, and errors that name the image and the cause.

A *registry reference* names a registry host: ``127.0.0.1:5000/app:v1``,
``registry.example.com/team/app@sha256:…`` (its first component has a ``.`` or ``:``, or is
``localhost``). A bare name (``busybox``, ``app:v1``) is a local image folder (:mod:`.images`).

The cache, under ``<images>/oci`` and shared by every instance of the driver:

* ``layout/`` — one OCI image layout (``skopeo copy`` writes into it; blobs are stored by their
  sha256, so a layer two images share is fetched once);
* ``rootfs/<hex>/`` — the image whose manifest digest is ``sha256:<hex>``, unpacked (``rootfs``
  and ``image.json``: the default command and environment). It is made in a temporary
  directory and renamed into place, so it is whole or absent; a failed pull leaves no trace here.

A lock file serialises pulls (threads and processes): a second create of the same image waits for
the first and then finds it unpacked, without a request to the registry. A tag is resolved once,
when the machine is created or updated (:meth:`RegistryImages.pin`): the machine's
``config.image`` becomes ``<ref>@sha256:…``, so its restarts run exactly that image from the cache.

Plain HTTP (no TLS) is used only for registries at ``localhost``, loopback or private addresses
given literally (as Docker allows for ``127.0.0.0/8``), where the test registry and a team's own
registry on a private network live. skopeo runs with ``--insecure-policy``: signatures are not
checked (this platform trusts its registry); content is checked by digest.

Writable layer: each instance's root is an overlay mount (lower = the cached image, upper and work
= the instance's own directories) where the kernel and privileges allow one, otherwise a copy of
the image (``cp -a``). One log line per instance says which. Either way the instance's writes stay
in its own directory and are gone when it is destroyed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .base import DriverError, ImageNotFoundError
from .images import Image, ImageUser

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REPO_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DEFAULT_KEEP = 3  # unpacked images no instance uses that the cache keeps (most recently used)
PULL_TIMEOUT = "120s"  # skopeo's --command-timeout: an unresponsive registry fails the create
REF_NAME = "org.opencontainers.image.ref.name"  # a manifest's name in the layout's index
_TLS_FLAG = {"inspect": "tls-verify", "copy": "src-tls-verify"}  # skopeo's name, per command


class ImagePullError(DriverError):
    """The image could not be fetched or unpacked (registry unreachable, digest mismatch)."""

    def __init__(self, image: str, cause: str) -> None:
        super().__init__(f"image {image!r}: {cause}", transient=False)
        self.image = image


class RegistryImageNotFoundError(ImageNotFoundError):
    """The registry answered that the repository, tag or digest does not exist."""

    def __init__(self, image: str, cause: str) -> None:
        DriverError.__init__(self, f"image {image!r} not found: {cause}", transient=False)
        self.image = image


@dataclass(frozen=True)
class Reference:
    """``registry/repository[:tag][@digest]`` (a tag-less, digest-less reference means
    ``:latest``)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def transport(self) -> str:
        """skopeo's name for it: by digest when known, else by tag."""
        base = f"docker://{self.registry}/{self.repository}"
        return f"{base}@{self.digest}" if self.digest else f"{base}:{self.tag or 'latest'}"

    @property
    def plain_http(self) -> bool:
        """Whether to speak plain HTTP: only to localhost, loopback and private addresses."""
        if self.registry.startswith("["):  # [ipv6]:port
            host = self.registry[1:].split("]", 1)[0]
        else:
            host = self.registry.split(":", 1)[0]
        if host == "localhost":
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return addr.is_loopback or addr.is_private


def is_registry_reference(ref: str) -> bool:
    """Whether ``ref`` names a registry host (else it is a local image folder's name)."""
    first, slash, _ = ref.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def parse_reference(ref: str) -> Reference:
    """A registry reference, or ImageNotFoundError saying what is wrong with it."""
    if not is_registry_reference(ref):
        raise ImageNotFoundError(ref)
    registry, _, rest = ref.partition("/")
    rest, _, digest = rest.partition("@")
    repository, tag = rest, None
    if ":" in rest.rsplit("/", 1)[-1]:
        repository, tag = rest.rsplit(":", 1)
    if digest and not _DIGEST_RE.match(digest):
        raise RegistryImageNotFoundError(ref, f"invalid digest {digest!r} (sha256:<64 hex>)")
    if not _REPO_RE.match(repository) or (tag is not None and not _TAG_RE.match(tag)):
        raise RegistryImageNotFoundError(ref, "not a valid image reference")
    return Reference(registry, repository, tag, digest or None)


def tools_unavailable() -> str | None:
    """Why registry images cannot be pulled here (skopeo or umoci missing), or None."""
    missing = [tool for tool in ("skopeo", "umoci") if shutil.which(tool) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed (apt-get install skopeo umoci; "
            "scripts/setup-test-deps installs them as root)"
        )
    return None


def _cause(stderr: bytes) -> str:
    """The tool's last error line, without its log prefix."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    line = lines[-1] if lines else "no error message"
    line = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", line).replace('\\"', '"')
    line = line.removeprefix("FATA[0000] ").removeprefix("Error: ")
    # the tools' context ("Error parsing image name "docker://…": ") repeats the reference
    return re.sub(r'^(Error parsing image name "[^"]*"|initializing source \S+): ', "", line)


def _not_found(cause: str) -> bool:
    lowered = cause.lower()
    return any(
        s in lowered for s in ("manifest unknown", "name unknown", "not found", "blob unknown")
    )


def _user_key(instance_dir: Path) -> str:
    return hashlib.sha256(str(Path(instance_dir).absolute()).encode()).hexdigest()[:32]


def _overlay_lowers() -> set[str]:
    """The lower directories of the overlays mounted in this mount namespace."""
    lowers: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            _, _, after = line.partition(" - ")
            fields = after.split()
            if len(fields) >= 3 and fields[0] == "overlay":
                for opt in fields[2].split(","):
                    if opt.startswith("lowerdir="):
                        lowers.update(opt.removeprefix("lowerdir=").split(":"))
    return lowers


class RegistryImages:
    """The registry-image cache of one worker (see the module docstring). ``keep``: how many
    unpacked images no instance uses are kept (the most recently used) by :meth:`sweep`."""

    def __init__(self, path: str | Path, *, keep: int = DEFAULT_KEEP) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError("keep must be a whole number >= 0")
        self.path = Path(path).absolute() / "oci"
        self.layout = self.path / "layout"
        self.unpacked = self.path / "rootfs"
        self.users = self.path / "users"
        self.keep = keep
        self.unpacked.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _check_tools(image: str) -> None:
        why = tools_unavailable()
        if why is not None:
            raise ImagePullError(image, f"cannot pull registry images: {why}")

    def _skopeo(self, ref: Reference, *args: str) -> subprocess.CompletedProcess[bytes]:
        tls = "false" if ref.plain_http else "true"
        cmd = ["skopeo", "--insecure-policy", "--command-timeout", PULL_TIMEOUT]
        cmd += [args[0], f"--{_TLS_FLAG[args[0]]}={tls}", *args[1:]]
        return subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False)

    def _fail(self, ref: str, proc: subprocess.CompletedProcess[bytes], what: str) -> DriverError:
        cause = _cause(proc.stderr)
        if _not_found(cause):
            return RegistryImageNotFoundError(ref, cause)
        if "digest" in cause.lower() and ("match" in cause.lower() or "verif" in cause.lower()):
            return ImagePullError(ref, f"digest mismatch: {cause}")
        return ImagePullError(ref, f"{what}: {cause}")

    def pin(self, image: str) -> str:
        """``image`` with the digest its tag resolves to now (the manifest's sha256), so every
        later pull of it is by digest; an image already naming a digest is returned as is."""
        ref = parse_reference(image)
        if ref.digest:
            return str(ref)
        self._check_tools(image)
        proc = self._skopeo(ref, "inspect", "--raw", ref.transport)
        if proc.returncode != 0:
            raise self._fail(image, proc, f"cannot resolve the tag at {ref.registry}")
        digest = "sha256:" + hashlib.sha256(proc.stdout).hexdigest()
        return str(Reference(ref.registry, ref.repository, ref.tag or "latest", digest))

    def resolve(self, image: str) -> Image:
        """The unpacked image (pulled first unless cached). ``image`` should be pinned
        (:meth:`pin`); an unpinned one is resolved here."""
        with self._using():
            return self._resolve(image)

    def acquire(self, image: str, instance_dir: Path) -> Image:
        """:meth:`resolve`, and record that the instance at ``instance_dir`` uses the image:
        :meth:`sweep` leaves it alone until :meth:`release` (or until that directory is gone).
        Both happen under the cache's shared lock, so a sweep cannot slip in between."""
        with self._using():
            found = self._resolve(image)
            users = self.users / found.rootfs.parent.name
            users.mkdir(parents=True, exist_ok=True)
            record = users / _user_key(instance_dir)
            record.write_text(str(Path(instance_dir).absolute()))
            os.utime(found.rootfs.parent / "image.json")  # its last use, for the keep order
            return found

    def release(self, instance_dir: Path) -> None:
        """The instance at ``instance_dir`` no longer uses its image."""
        if self.users.exists():
            for record in self.users.glob(f"*/{_user_key(instance_dir)}"):
                record.unlink(missing_ok=True)

    def _in_use(self, hexdigest: str, lowers: set[str]) -> bool:
        """Whether an instance uses the image: a use recorded for a directory that still
        exists (a record whose directory is gone, left by a crash, is dropped), or an overlay
        mounted over it."""
        used = str(self.unpacked / hexdigest / "rootfs") in lowers
        records = self.users / hexdigest
        for record in records.iterdir() if records.exists() else ():
            with contextlib.suppress(OSError):
                if os.path.isdir(record.read_text()):
                    used = True
                else:
                    record.unlink()
        return used

    def sweep(self) -> list[str]:
        """Remove the unpacked images no instance uses beyond the ``keep`` most recently
        used, and the blobs only they needed; the references removed. An image in use is never
        removed (nor counted). Skipped (nothing removed) while a pull or a create holds the
        cache: the next sweep does it."""
        with open(self.path / "gc.lock", "a") as gc, open(self.path / "lock", "a") as pulls:
            try:
                fcntl.flock(gc, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(pulls, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
            images = [d for d in self.unpacked.iterdir()
                      if not d.name.startswith(".") and (d / "image.json").exists()]  # fmt: skip
            images.sort(key=lambda d: (d / "image.json").stat().st_mtime, reverse=True)
            lowers = _overlay_lowers()
            kept, removed = 0, []
            for d in images:
                if self._in_use(d.name, lowers):
                    continue
                if kept < self.keep:
                    kept += 1
                    continue
                reference = json.loads((d / "image.json").read_text()).get("reference", d.name)
                gone = self.unpacked / f".remove-{d.name}"
                os.rename(d, gone)  # whole or absent, as when it was unpacked
                shutil.rmtree(gone, ignore_errors=True)
                shutil.rmtree(self.users / d.name, ignore_errors=True)
                self._umoci("rm", "--image", f"{self.layout}:{d.name}")
                removed.append(reference)
                log.info("image cache: removed %s (unused; keeping the %d most recently used)",
                         reference, self.keep)  # fmt: skip
            if removed:
                self._umoci("gc", "--layout", str(self.layout))  # the blobs no image needs
            return removed

    def _umoci(self, *args: str) -> None:
        proc = subprocess.run(["umoci", *args], capture_output=True, stdin=subprocess.DEVNULL,
                              check=False)  # fmt: skip
        if proc.returncode != 0:
            log.warning("image cache: umoci %s failed: %s", args[0], _cause(proc.stderr))

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Shared with other resolves and creates; :meth:`sweep` takes it exclusively."""
        with open(self.path / "gc.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            yield

    def _resolve(self, image: str) -> Image:
        ref = parse_reference(image)
        if ref.digest is None:
            ref = parse_reference(self.pin(image))
        assert ref.digest is not None
        hexdigest = ref.digest.removeprefix("sha256:")
        dest = self.unpacked / hexdigest
        if not (dest / "image.json").exists():
            self._check_tools(image)
            with self._locked():
                if not (dest / "image.json").exists():
                    self._pull(image, ref, dest)
        meta = json.loads((dest / "image.json").read_text())
        user = meta.get("user")
        return Image(
            str(ref),
            dest / "rootfs",
            tuple(meta.get("cmd") or ()),
            tuple(meta.get("env") or ()),
            entrypoint=tuple(meta.get("entrypoint") or ()),
            cwd=meta.get("cwd") or "/",
            user=None if user is None else ImageUser(
                int(user["uid"]), int(user["gid"]), tuple(user.get("additional_gids") or ())
            ),
        )  # fmt: skip

    def _config(self, hexdigest: str) -> dict:
        """The image config (``config`` of the image's config blob: Entrypoint, Cmd, ...) of the
        manifest the layout holds under the name ``hexdigest``."""
        blobs = self.layout / "blobs" / "sha256"
        index = json.loads((self.layout / "index.json").read_text())
        for desc in index.get("manifests") or ():
            if (desc.get("annotations") or {}).get(REF_NAME) != hexdigest:
                continue
            manifest = json.loads((blobs / desc["digest"].removeprefix("sha256:")).read_text())
            config_blob = blobs / manifest["config"]["digest"].removeprefix("sha256:")
            return json.loads(config_blob.read_text()).get("config") or {}
        return {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _pull(self, image: str, ref: Reference, dest: Path) -> None:
        hexdigest = dest.name
        proc = self._skopeo(ref, "copy", "--quiet", ref.transport, f"oci:{self.layout}:{hexdigest}")
        if proc.returncode != 0:
            raise self._fail(image, proc, f"cannot pull from {ref.registry}")
        tmp = Path(tempfile.mkdtemp(dir=self.unpacked, prefix=".unpack-"))
        try:
            bundle = tmp / "bundle"
            cmd = ["umoci", "unpack", "--image", f"{self.layout}:{hexdigest}"]
            if os.geteuid() != 0:
                cmd.append("--rootless")
            proc = subprocess.run(
                [*cmd, str(bundle)], capture_output=True, stdin=subprocess.DEVNULL, check=False
            )
            if proc.returncode != 0:
                raise ImagePullError(image, f"cannot unpack: {_cause(proc.stderr)}")
            meta = image_meta(
                json.loads((bundle / "config.json").read_text()).get("process") or {},
                self._config(hexdigest),
            )
            meta["reference"] = str(ref)
            out = tmp / "image"
            out.mkdir()
            os.rename(bundle / "rootfs", out / "rootfs")
            (out / "image.json").write_text(json.dumps(meta))
            os.rename(out, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("image %s pulled and unpacked (%s)", ref, dest)


def image_meta(process: dict, config: dict) -> dict:
    """What ``image.json`` records of an unpacked image: its Entrypoint and Cmd apart (a
    machine's ``init.cmd`` replaces only the Cmd), and from the runtime config umoci derived —
    which resolved a ``User`` name through the image's ``/etc/passwd`` and ``/etc/group`` — the
    environment (with ``HOME``), working directory and numeric user."""
    user = process.get("user") or {}
    meta: dict = {
        "env": process.get("env") or [],
        "cwd": process.get("cwd") or "/",
        "user": None,
    }
    if config:
        meta["entrypoint"] = config.get("Entrypoint") or []
        meta["cmd"] = config.get("Cmd") or []
    else:  # no config found: the runtime's arguments are entrypoint and command together
        meta["entrypoint"], meta["cmd"] = [], process.get("args") or []
    if user.get("uid") or user.get("gid") or user.get("additionalGids"):
        meta["user"] = {
            "uid": int(user.get("uid") or 0),
            "gid": int(user.get("gid") or 0),
            "additional_gids": [int(g) for g in user.get("additionalGids") or ()],
        }
    return meta


# --- the per-instance writable root ----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def _mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> str | None:
    """Mount an overlay at ``target``; None when done, else why not."""
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if _libc.mount(b"overlay", bytes(target), b"overlay", 0, opts.encode()) == 0:
        return None
    err = ctypes.get_errno()
    return os.strerror(err)


def make_root(image: Image, directory: Path) -> tuple[Path, str]:
    """The instance's own root at ``directory/rootfs`` over ``image``: ``("overlay"|"copy")``.
    On failure nothing is left mounted or copied."""
    root = directory / "rootfs"
    why = "not root" if os.geteuid() != 0 else None
    if why is None:
        upper, work = directory / "upper", directory / "work"
        for d in (root, upper, work):
            d.mkdir(parents=True, exist_ok=True)
        marker = directory / "rootfs.mount"  # first: a crash after the mount still releases it
        marker.write_text("overlay\n")
        why = _mount_overlay(image.rootfs, upper, work, root)
        if why is None:
            log.info("instance %s: writable layer is an overlay on %s", directory.name, image.name)
            return root, "overlay"
        for d in (root, upper, work):
            shutil.rmtree(d, ignore_errors=True)
        marker.unlink()
    proc = subprocess.run(
        ["cp", "-a", "--", str(image.rootfs), str(root)], capture_output=True, check=False
    )
    if proc.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise DriverError(f"cannot copy image {image.name}: {_cause(proc.stderr)}")
    log.info(
        "instance %s: writable layer is a copy of %s (overlay unavailable: %s)",
        directory.name, image.name, why,
    )  # fmt: skip
    return root, "copy"


def release_root(directory: Path) -> None:
    """Unmount an instance's overlay root (if it has one); its files go with the directory."""
    marker = directory / "rootfs.mount"
    if not marker.exists():
        return
    root = directory / "rootfs"
    if os.path.ismount(root) and _libc.umount2(bytes(root), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise DriverError(f"cannot unmount {root}: {os.strerror(err)}")
    marker.unlink()


def mounts_under(path: str | Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    prefix = str(Path(path).absolute())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def release_roots_under(path: str | Path) -> None:
    """Lazily unmount every instance root below ``path`` (a host torn down with its machines
    still on it)."""
    for point in mounts_under(path):
        _libc.umount2(point.encode(), MNT_DETACH)
