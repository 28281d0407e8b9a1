"""A local OCI registry for the orchestrator tests: Debian's ``docker-registry`` (the reference
registry server) on a given address with its own storage, and a small test image written as an
OCI layout in Python and pushed to it with skopeo.

The image has two layers; the second deletes ``/data/gone.txt`` of the first (a whiteout) and
replaces the directory ``/cfg`` (an opaque whiteout). Its root holds a static busybox, so runc and
the process driver (chrooted) can both run commands in it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from support import free_port, require, wait_for_sync

from orchestrator.drivers.images import static_busybox
from orchestrator.drivers.oci import tools_unavailable

# the test image's own command and environment (``push_test_image(config=...)`` replaces them)
DEFAULT_CONFIG = {"Cmd": ["sleep", "3600"], "Env": ["PATH=/bin", "IMAGE_VAR=from-image"]}
APPLETS = ("sh", "sleep", "cat", "ls", "echo", "touch", "test", "nc", "httpd", "mkdir", "id", "pwd")


def registry_unavailable() -> str | None:
    """Why the registry tests cannot run here, or None."""
    if shutil.which("docker-registry") is None:
        return "docker-registry is not installed (scripts/setup-test-deps installs it as root)"
    if static_busybox() is None:
        return "busybox-static is not installed (scripts/setup-test-deps installs it as root)"
    return tools_unavailable()


def require_registry() -> None:
    """Skip where the registry tools are missing, or fail when the CI requires them
    (CORROSION_REQUIRE_REGISTRY=1)."""
    require(registry_unavailable(), "CORROSION_REQUIRE_REGISTRY")


@dataclass
class Registry:
    address: str  # host:port
    storage: Path
    log_path: Path

    def requests(self, fragment: str, method: str = "GET") -> int:
        """How many ``method`` requests whose path contains ``fragment`` the registry logged."""
        text = self.log_path.read_text(errors="replace")
        return sum(
            1
            for line in text.splitlines()
            if f"http.request.method={method} " in line and fragment in line
        )

    def blob_path(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


@contextlib.contextmanager
def run_registry(host: str = "127.0.0.1", *, netns: str | None = None) -> Iterator[Registry]:
    """``docker-registry serve`` on ``host`` (a free port), stopped and its storage removed on
    exit; ``netns`` runs it inside that network namespace."""
    tmp = Path(tempfile.mkdtemp(prefix="corro-registry-"))
    port = free_port()
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}:{port}\n"
    )
    log_path = tmp / "registry.log"
    cmd = ["docker-registry", "serve", str(config)]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    registry = Registry(f"{host}:{port}", tmp / "storage", log_path)
    url = f"http://{host}:{port}/v2/"
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"docker-registry exited: {log_path.read_text()}")
            if netns is not None:
                fetch = f"import urllib.request; urllib.request.urlopen('{url}')"
                probe = ["ip", "netns", "exec", netns, sys.executable, "-c", fetch]
                return subprocess.run(probe, capture_output=True).returncode == 0
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for_sync(up, 60, "the registry to listen")
        yield registry
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# --- the test image ---------------------------------------------------------------------------


def _tar(entries: list[tuple[str, str, bytes | str | None]]) -> bytes:
    """A layer tar from ``(kind, path, content)``: kind ``dir``, ``file``, ``exe``, ``link``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, path, content in entries:
            info = tarfile.TarInfo(path)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, str(content)
                tar.addfile(info)
            else:
                data = content if isinstance(content, bytes) else str(content or "").encode()
                info.size, info.mode = len(data), 0o755 if kind == "exe" else 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest[7:]).write_bytes(data)
    return digest, len(data)


@dataclass
class TestImage:
    reference: str  # registry/repo:tag
    manifest_digest: str
    layer_digests: list[str]


def test_image_layers(marker: str = "") -> list[list[tuple[str, str, bytes | str | None]]]:
    """The image's two layers; ``marker`` (a file in the second) makes an image whose top layer
    no other image shares (the registry stores each blob once, whatever the repository)."""
    busybox = Path(static_busybox() or "/bin/busybox").read_bytes()
    base: list[tuple[str, str, bytes | str | None]] = [
        ("dir", d, None)
        for d in (
            "bin",
            "etc",
            "tmp",
            "proc",
            "dev",
            "sys",
            "run",
            "root",
            "data",
            "cfg",
            "cfg/sub",
        )
    ]
    base += [("exe", "bin/busybox", busybox)]
    base += [("link", f"bin/{a}", "busybox") for a in APPLETS]
    base += [
        ("file", "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("file", "etc/hosts", "127.0.0.1 localhost\n"),
        ("file", "data/gone.txt", "deleted by layer 2\n"),
        ("file", "data/kept.txt", "kept\n"),
        ("file", "cfg/old.txt", "replaced by layer 2\n"),
        ("file", "cfg/sub/deep.txt", "replaced by layer 2\n"),
    ]
    top: list[tuple[str, str, bytes | str | None]] = [
        ("dir", "data", None),
        ("file", "data/.wh.gone.txt", ""),
        ("dir", "cfg", None),
        ("file", "cfg/.wh..wh..opq", ""),
        ("file", "cfg/new.txt", "from layer 2\n"),
    ]
    if marker:
        top.append(("file", "marker.txt", marker))
    return [base, top]


def push_test_image(
    registry: Registry,
    repo: str = "test/app",
    tag: str = "v1",
    *,
    marker: str = "",
    config: dict[str, Any] | None = None,
    files: Sequence[tuple[str, str, bytes | str | None]] = (),
) -> TestImage:
    """Write the test image as an OCI layout and push it with skopeo. ``config`` replaces
    the image config's ``config`` (its Cmd, Env, Entrypoint, WorkingDir, User); ``files`` are
    added to the top layer."""
    with tempfile.TemporaryDirectory(prefix="corro-image-") as tmp:
        layout = Path(tmp) / "layout"
        (layout / "blobs/sha256").mkdir(parents=True)
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        layers, diff_ids = [], []
        base, top = test_image_layers(marker)
        for entries in (base, [*top, *files]):
            raw = _tar(entries)
            diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
            digest, size = _blob(layout, gzip.compress(raw, mtime=0))
            layers.append(
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                 "digest": digest, "size": size}
            )  # fmt: skip
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": config if config is not None else DEFAULT_CONFIG,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cdigest, csize = _blob(layout, json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cdigest, "size": csize},
            "layers": layers,
        }  # fmt: skip
        mdigest, msize = _blob(layout, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
                 "size": msize, "annotations": {"org.opencontainers.image.ref.name": tag}}
            ],
        }  # fmt: skip
        (layout / "index.json").write_text(json.dumps(index))
        ref = f"{registry.address}/{repo}:{tag}"
        subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
             f"oci:{layout}:{tag}", f"docker://{ref}"],
            check=True, capture_output=True,
        )  # fmt: skip
    pushed = TestImage(ref, mdigest, [d["digest"] for d in layers])
    # skopeo keeps the manifest's bytes, so the registry serves the digest computed here
    got = subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{ref}",
        ],
        check=True,
        capture_output=True,
    ).stdout
    assert "sha256:" + hashlib.sha256(got).hexdigest() == mdigest
    return pushed


__all__ = ["Registry", "TestImage", "push_test_image", "require_registry", "run_registry"]
