"""Machines from images in a registry: Debian's docker-registry on loopback, a two-layer test
image (a whiteout and an opaque whiteout in the second layer) pushed to it, machines created from
it by reference through the Machines API with the process driver (chrooted, root only) and runc.

Checked: the whiteouts were applied; each machine's writes stay in its own writable layer (not in
the cached image, not in the other machine); a volume mounts inside the image's root; a stop and
start runs the image afresh without asking the registry; a second create pulls no blob;
concurrent pulls of one image fetch each blob once; a missing image, an unreachable registry and
a corrupted blob fail the create with an error naming the image and the cause, leaving nothing
behind.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import httpx
import pytest
from orch_helpers import require_runc
from registry_helpers import push_test_image, require_registry, run_registry
from support import free_port, wait_for

from orchestrator.api import create_app
from orchestrator.drivers import InstanceSpec, ProcessDriver, RuncDriver, oci
from orchestrator.drivers.oci import RegistryImages, mounts_under
from orchestrator.engine import Backoff
from orchestrator.service import Orchestrator

pytestmark = pytest.mark.anyio
BASE = "/v1/apps/app/machines"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def registry():
    """The registry with the test image pushed: ``(registry, image)``."""
    require_registry()
    with run_registry() as reg:
        yield reg, push_test_image(reg)


def _driver(kind: str, tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("registry images need root (runc, or the process driver's chroot)")
    if kind == "runc":
        require_runc()
        return RuncDriver(tmp_path / "instances", images=tmp_path / "images")
    return ProcessDriver(tmp_path / "instances", images=tmp_path / "images")


@pytest.fixture(params=["process", "runc"])
async def client(request, tmp_path, registry):
    driver = _driver(request.param, tmp_path)
    orch = Orchestrator(
        machines_path=tmp_path / "machines",
        driver=driver,
        worker="w1",
        backoff=Backoff(initial=0.001, maximum=0.01),
    )
    try:
        async with orch:
            transport = httpx.ASGITransport(app=create_app(orch, manage=False))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://orch", timeout=120
            ) as c:
                c.orch = orch  # type: ignore[attr-defined]
                c.driver = driver  # type: ignore[attr-defined]
                yield c
    finally:
        await driver.destroy_all()


async def exec_(client, mid: str, script: str) -> str:
    r = await client.post(f"{BASE}/{mid}/exec", json={"command": ["sh", "-c", script]})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    return r.json()["stdout"]


async def started(client, mid: str) -> None:
    r = await client.get(f"{BASE}/{mid}/wait", params={"state": "started", "timeout": 60})
    assert r.status_code == 200, r.text


async def test_machines_from_a_registry_image(client, registry, tmp_path, caplog):
    reg, image = registry
    caplog.set_level(logging.INFO, logger="orchestrator.drivers.oci")
    blobs_before = {d: reg.requests(f"/blobs/{d}") for d in image.layer_digests}
    script = (
        'echo "$FLY_MACHINE_ID" > /data/mine.txt; echo "$FLY_INSTANCE_ID" >> /vol/boots; '
        "exec sleep 3600"
    )
    config = {
        "image": image.reference,
        "init": {"exec": ["sh", "-c", script]},
        "mounts": [{"volume": "vol", "path": "/vol"}],  # inside the image's root
    }
    r = await client.post(BASE, json={"config": config})
    assert r.status_code == 200, r.text
    first = r.json()
    # the tag was resolved once, at create: the machine runs that digest from now on
    assert first["config"]["image"] == f"{image.reference}@{image.manifest_digest}"
    assert first["image_ref"]["digest"] == image.manifest_digest
    assert first["image_ref"]["tag"] == "v1"
    # the second machine runs the image's own command (sleep 3600) and environment
    by_tag, by_digest = "/manifests/v1", f"/manifests/{image.manifest_digest}"
    before = (reg.requests(by_tag), reg.requests(by_digest))
    r = await client.post(BASE, json={"config": {"image": image.reference}})
    assert r.status_code == 200, r.text
    second = r.json()
    # its create resolved the tag (one request) and found the image in the cache (none)
    assert (reg.requests(by_tag) - before[0], reg.requests(by_digest) - before[1]) == (1, 0)
    a, b = first["id"], second["id"]
    await started(client, a)
    await started(client, b)
    await exec_(client, b, 'echo "$IMAGE_VAR" > /data/mine.txt')
    # the image's blobs were fetched once, for both machines
    for digest in image.layer_digests:
        assert reg.requests(f"/blobs/{digest}") - blobs_before[digest] == 1, digest

    for mid in (a, b):
        # layer 2 deleted /data/gone.txt (whiteout) and replaced /cfg (opaque whiteout)
        assert (await exec_(client, mid, "ls /data")).split() == ["kept.txt", "mine.txt"]
        assert (await exec_(client, mid, "ls -R /cfg")).split() == ["/cfg:", "new.txt"]
    # each machine sees only its own write
    assert (await exec_(client, a, "cat /data/mine.txt")).strip() == a
    assert (await exec_(client, b, "cat /data/mine.txt")).strip() == "from-image"
    # and the cached image has neither
    cache = RegistryImages(tmp_path / "images")
    cached = cache.unpacked / image.manifest_digest.removeprefix("sha256:") / "rootfs"
    assert sorted(os.listdir(cached / "data")) == ["kept.txt"]
    assert sorted(os.listdir(cached / "cfg")) == ["new.txt"]
    # an overlay here (root, ext4); where the state directory cannot hold one, a copy (the next
    # test forces that path)
    assert "writable layer is an overlay" in caplog.text or "(overlay unavailable" in caplog.text
    volume = client.orch.volumes.directory("app", "vol")
    assert (volume / "boots").read_text().split() == [first["instance_id"]]

    # a stop and start runs the image afresh (the write is gone, the volume's is not), from the
    # cache: the registry is not asked for anything
    requests = reg.requests("/v2/")
    await exec_(client, a, "touch /data/by-exec")
    for action, state in (("stop", "stopped"), ("start", "started")):
        r = await client.post(f"{BASE}/{a}/{action}")
        assert r.status_code == 200, r.text
        r = await client.get(f"{BASE}/{a}/wait", params={"state": state, "timeout": 60})
        assert r.status_code == 200, r.text
    await wait_for(lambda: len((volume / "boots").read_text().split()) == 2, 60, "the reboot")
    assert (await exec_(client, a, "ls /data")).split() == ["kept.txt", "mine.txt"]
    assert (await exec_(client, a, "cat /vol/boots")).split() == [first["instance_id"]] * 2
    assert reg.requests("/v2/") == requests

    for mid in (a, b):
        r = await client.delete(f"{BASE}/{mid}", params={"force": "true"})
        assert r.status_code == 200, r.text
    await wait_for(lambda: not client.driver.instance_ids(), 60, "the instances to be destroyed")
    assert mounts_under(tmp_path) == []
    assert sorted(os.listdir(cached / "data")) == ["kept.txt"]  # the cache stays


async def test_copy_when_overlay_is_unavailable(client, registry, tmp_path, caplog, monkeypatch):
    _, image = registry
    caplog.set_level(logging.INFO, logger="orchestrator.drivers.oci")
    monkeypatch.setattr(oci, "_mount_overlay", lambda *args: "overlay refused by the test")
    mids = []
    for _ in range(2):
        r = await client.post(BASE, json={"config": {"image": image.reference}})
        assert r.status_code == 200, r.text
        mids.append(r.json()["id"])
    for mid in mids:
        await started(client, mid)
        await exec_(client, mid, f"echo {mid} > /cfg/new.txt; rm /data/kept.txt")
    for mid in mids:
        assert (await exec_(client, mid, "cat /cfg/new.txt; ls /data")).split() == [mid]
    cache = RegistryImages(tmp_path / "images")
    cached = cache.unpacked / image.manifest_digest.removeprefix("sha256:") / "rootfs"
    assert (cached / "cfg/new.txt").read_text() == "from layer 2\n"
    assert (cached / "data/kept.txt").exists()
    assert "writable layer is a copy" in caplog.text
    assert "overlay refused by the test" in caplog.text
    assert mounts_under(tmp_path) == []


def test_concurrent_pulls_fetch_each_blob_once(registry, tmp_path):
    reg, _ = registry
    image = push_test_image(reg, repo="test/concurrent", marker="concurrent")
    before = {d: reg.requests(f"/blobs/{d}") for d in image.layer_digests}
    pinned = f"{image.reference}@{image.manifest_digest}"
    results, errors = [], []

    def pull() -> None:
        try:  # each thread its own view of the same cache, as two drivers on one worker
            results.append(RegistryImages(tmp_path / "images").resolve(pinned).rootfs)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1, (errors, results)
    for digest in image.layer_digests:
        assert reg.requests(f"/blobs/{digest}") - before[digest] == 1, digest
    assert sorted(os.listdir(results[0] / "data")) == ["kept.txt"]


# an image with an entrypoint, a working directory and a user named in its /etc/passwd
USER_IMAGE_CONFIG = {
    "Entrypoint": ["sh", "-c"],
    "Cmd": ['echo "image-cmd $(id -u):$(id -g):$(id -G) $(pwd) $HOME $IMAGE_VAR"; exec sleep 3600'],
    "Env": ["PATH=/bin", "IMAGE_VAR=from-image"],
    "WorkingDir": "/srv/app",
    "User": "app",
}
USER_IMAGE_FILES = [
    ("dir", "srv", None),
    (
        "file",
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:app:/home/app:/bin/sh\n",
    ),
    ("file", "etc/group", "root:x:0:\napp:x:2345:\nextra:x:3456:app\n"),
]


async def _log_line(client, mid: str, prefix: str) -> str:
    """The first line of the machine's output starting with ``prefix``, once it is there."""
    found: list[str] = []

    async def written() -> bool:
        r = await client.get(f"{BASE}/{mid}/logs")
        found[:] = [ln for ln in r.json()["lines"] if ln.startswith(prefix)]
        return bool(found)

    await wait_for(written, 60, f"{mid} to write {prefix!r}")
    return found[0]


async def test_the_image_config_is_applied(client, registry):
    """Entrypoint + Cmd, Env, WorkingDir (made where the image lacks it) and User (a name
    resolved through the image's /etc/passwd and /etc/group) are the machine's defaults;
    ``init.cmd`` replaces only the Cmd, ``init.exec`` the whole command."""
    reg, _ = registry
    image = push_test_image(
        reg, repo="test/user", marker="user", config=USER_IMAGE_CONFIG, files=USER_IMAGE_FILES
    )
    script = 'echo "init-cmd $(id -u) $(pwd)"; exec sleep 3600'
    configs = {
        "image-cmd": {"image": image.reference},
        "init-cmd": {"image": image.reference, "init": {"cmd": [script]}},
        "init-exec": {"image": image.reference,
                      "init": {"exec": ["sh", "-c", script.replace("init-cmd", "init-exec")]}},
    }  # fmt: skip
    mids = {}
    for name, config in configs.items():
        r = await client.post(BASE, json={"config": config})
        assert r.status_code == 200, r.text
        mids[name] = r.json()["id"]
    for mid in mids.values():
        await started(client, mid)
    line = await _log_line(client, mids["image-cmd"], "image-cmd ")
    assert line.split() == ["image-cmd", "1234:2345:2345", "3456", "/srv/app", "/home/app",
                            "from-image"]  # fmt: skip
    assert (await _log_line(client, mids["init-cmd"], "init-cmd ")).split()[1:] == [
        "1234", "/srv/app"
    ]  # fmt: skip
    assert (await _log_line(client, mids["init-exec"], "init-exec ")).split()[1:] == [
        "1234", "/srv/app"
    ]  # fmt: skip
    # an exec in the machine runs where and as whom its command does
    assert (await exec_(client, mids["image-cmd"], "echo $(id -u):$(id -g) $(pwd)")).split() == [
        "1234:2345", "/srv/app"
    ]  # fmt: skip


async def test_a_working_directory_through_a_symlink_stays_in_the_image(client, registry, tmp_path):
    """An image whose WorkingDir goes through a symlink to an absolute path cannot make (or
    enter) that path on the host: it is resolved inside the machine's root, where it leads
    nowhere, and the machine does not run (a clear line in its log, or a failed create)."""
    reg, _ = registry
    host = tmp_path / "host-side"
    image = push_test_image(
        reg, repo="test/escape", marker="escape",
        config={"Cmd": ["sleep", "3600"], "Env": ["PATH=/bin"], "WorkingDir": "/escape/made"},
        files=[("link", "escape", str(host))],
    )  # fmt: skip
    r = await client.post(BASE, json={"config": {"image": image.reference}})
    assert r.status_code == 200, r.text
    mid = r.json()["id"]
    if isinstance(client.driver, ProcessDriver):  # the shim refuses it: the machine exits 1
        line = await _log_line(client, mid, "shim: cannot enter the working directory")
        assert "/escape/made" in line
    else:  # runc refuses to create the container ("mkdir /escape: file exists")

        async def failed() -> bool:
            return (await client.get(f"{BASE}/{mid}")).json()["state"] == "failed"

        await wait_for(failed, 60, f"{mid} to fail")
    assert not host.exists()


def test_image_meta_keeps_entrypoint_and_cmd_apart():
    process = {"args": ["/bin/app", "serve"], "env": ["PATH=/bin"], "cwd": "/w",
               "user": {"uid": 7, "gid": 8}}  # fmt: skip
    meta = oci.image_meta(process, {"Entrypoint": ["/bin/app"], "Cmd": ["serve"]})
    assert meta == {
        "env": ["PATH=/bin"],
        "cwd": "/w",
        "entrypoint": ["/bin/app"],
        "cmd": ["serve"],
        "user": {"uid": 7, "gid": 8, "additional_gids": []},
    }
    # root (uid 0, gid 0) is no user switch; without a config the arguments are the command
    meta = oci.image_meta({"args": ["sh"], "user": {"uid": 0, "gid": 0}}, {})
    assert (meta["entrypoint"], meta["cmd"], meta["user"], meta["cwd"]) == ([], ["sh"], None, "/")


def _unpacked(cache: RegistryImages) -> set[str]:
    return {p.name for p in cache.unpacked.iterdir() if not p.name.startswith(".")}


def _layout_blobs(cache: RegistryImages) -> set[str]:
    return {f"sha256:{p.name}" for p in (cache.layout / "blobs" / "sha256").iterdir()}


def test_the_cache_keeps_images_in_use_and_the_most_recently_used(registry, tmp_path, caplog):
    reg, _ = registry
    caplog.set_level(logging.INFO, logger="orchestrator.drivers.oci")
    images = [push_test_image(reg, repo=f"test/keep{i}", marker=f"keep{i}") for i in range(3)]
    pinned = [f"{im.reference}@{im.manifest_digest}" for im in images]
    hexes = [im.manifest_digest.removeprefix("sha256:") for im in images]
    cache = RegistryImages(tmp_path / "images", keep=1)
    instance = tmp_path / "instance-a"
    instance.mkdir()
    cache.acquire(pinned[0], instance)  # in use, the least recently used
    cache.resolve(pinned[1])
    cache.resolve(pinned[2])
    os.utime(cache.unpacked / hexes[2] / "image.json")  # the most recently used, whatever mtimes
    shared = images[0].layer_digests[0]  # the base layer all three share
    assert {shared, *(im.layer_digests[-1] for im in images)} <= _layout_blobs(cache)

    with cache._using():  # a create (or a pull) holds the cache: the sweep leaves it be
        assert cache.sweep() == []
    assert _unpacked(cache) == set(hexes)

    # in use (kept, not counted) + the most recently used of the others (keep=1); 1 goes
    assert cache.sweep() == [pinned[1]]
    assert _unpacked(cache) == {hexes[0], hexes[2]}
    blobs = _layout_blobs(cache)
    assert images[1].layer_digests[-1] not in blobs and images[1].manifest_digest not in blobs
    assert {shared, images[0].layer_digests[-1], images[2].layer_digests[-1]} <= blobs
    assert f"image cache: removed {pinned[1]}" in caplog.text
    # a use whose instance directory is gone (a crash before release) does not count
    instance.rmdir()
    assert cache.sweep() == [pinned[0]]
    assert _unpacked(cache) == {hexes[2]}
    # what is left still runs: a fresh acquire finds it without the registry
    before = reg.requests("/blobs/")
    assert (cache.acquire(pinned[2], tmp_path).rootfs / "marker.txt").read_text() == "keep2"
    assert reg.requests("/blobs/") == before


async def test_destroying_the_last_machine_of_an_image_sweeps_it(client, registry, tmp_path):
    reg, image = registry
    other = push_test_image(reg, repo="test/swept", marker="swept")
    client.driver.registry.keep = 0  # keep no unused image
    mids = []
    for ref in (image.reference, other.reference):
        r = await client.post(BASE, json={"config": {"image": ref}})
        assert r.status_code == 200, r.text
        mids.append(r.json()["id"])
    for mid in mids:
        await started(client, mid)
    cache = client.driver.registry
    hexes = {im.manifest_digest.removeprefix("sha256:") for im in (image, other)}
    assert _unpacked(cache) == hexes
    r = await client.delete(f"{BASE}/{mids[1]}", params={"force": "true"})
    assert r.status_code == 200, r.text
    gone = other.manifest_digest.removeprefix("sha256:")

    def swept() -> bool:  # the image goes first, then its blobs (umoci gc)
        return gone not in _unpacked(cache) and other.layer_digests[-1] not in _layout_blobs(cache)

    await wait_for(swept, 60, "the unused image and its own blobs to be removed")
    assert _unpacked(cache) == {image.manifest_digest.removeprefix("sha256:")}  # in use: kept
    assert (await exec_(client, mids[0], "cat /cfg/new.txt")) == "from layer 2\n"


def _leftovers(tmp_path: Path) -> list[str]:
    """What a failed create could have left: machine databases, instance dirs, unpacked or
    half-unpacked images, mounts."""
    out = [f"machine db {p.name}" for p in (tmp_path / "machines").glob("*.db*")]
    instances = tmp_path / "instances"
    out += [f"instance {p.name}" for p in instances.iterdir() if not p.name.startswith("_")]
    unpacked = tmp_path / "images" / "oci" / "rootfs"
    if unpacked.exists():
        out += [f"image dir {p.name}" for p in unpacked.iterdir()]
    return out + [f"mount {m}" for m in mounts_under(tmp_path)]


async def test_bad_images_fail_the_create_and_leave_nothing(client, registry, tmp_path):
    reg, image = registry
    corrupt = push_test_image(reg, repo="test/corrupt", marker="corrupt")
    blob = reg.blob_path(corrupt.layer_digests[-1])
    data = blob.read_bytes()
    blob.write_bytes(data[:-8] + bytes(8))  # the registry serves it; its sha256 is wrong now
    repo = image.reference.rsplit(":", 1)[0]
    cases = [
        (f"{repo}:no-such-tag", "not found"),
        (f"{reg.address}/test/no-such-repo:v1", "not found"),
        (f"{repo}@sha256:{'0' * 64}", "not found"),
        (f"127.0.0.1:{free_port()}/test/app:v1", "connection refused"),
        (corrupt.reference, "digest mismatch"),
    ]
    for ref, cause in cases:
        r = await client.post(BASE, json={"config": {"image": ref}})
        assert r.status_code == 400, (ref, r.text)
        error = r.json()["error"]
        assert ref in error and cause in error, (ref, error)
        assert (await client.get(BASE)).json() == []
        assert _leftovers(tmp_path) == [], ref


# --- without a registry ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("127.0.0.1:5000/test/app:v1", ("127.0.0.1:5000", "test/app", "v1", None, True)),
        ("localhost/app", ("localhost", "app", None, None, True)),
        (f"reg.example.com/a/b@sha256:{'a' * 64}",
         ("reg.example.com", "a/b", None, f"sha256:{'a' * 64}", False)),
        (f"10.1.0.1:5000/app:v2@sha256:{'b' * 64}",
         ("10.1.0.1:5000", "app", "v2", f"sha256:{'b' * 64}", True)),
    ],
)  # fmt: skip
def test_registry_references_parse(ref, parsed):
    r = oci.parse_reference(ref)
    assert (r.registry, r.repository, r.tag, r.digest, r.plain_http) == parsed
    assert str(r) == ref


@pytest.mark.parametrize("ref", ["busybox", "app:v1", "team/app:v1", "busybox@sha256:" + "c" * 64])
def test_names_without_a_registry_host_are_local_images(ref):
    assert not oci.is_registry_reference(ref)


@pytest.mark.parametrize(
    ("ref", "cause"),
    [
        ("127.0.0.1:5000/app@sha256:abc", "invalid digest"),
        ("127.0.0.1:5000/App:v1", "not a valid image reference"),
        ("127.0.0.1:5000/app:bad tag", "not a valid image reference"),
    ],
)
def test_bad_references_are_refused_with_the_reason(ref, cause):
    with pytest.raises(oci.RegistryImageNotFoundError, match=cause) as e:
        oci.parse_reference(ref)
    assert ref in str(e.value)


async def test_missing_tools_and_no_root_are_clear_errors(tmp_path, monkeypatch):
    ref = "127.0.0.1:1/app:v1"
    driver = ProcessDriver(tmp_path / "instances", namespaces=False, images=tmp_path / "images")
    spec = InstanceSpec("i1", "m1", f"{ref}@sha256:{'d' * 64}")
    with pytest.raises(oci.DriverError, match="only as root with namespaces") as e:
        await driver.prepare(spec)
    assert not e.value.transient and ref in str(e.value)
    monkeypatch.setenv("PATH", str(tmp_path))  # no skopeo, no umoci
    with pytest.raises(oci.ImagePullError, match="skopeo and umoci not installed") as e:
        await driver.pin_image(ref)
    assert ref in str(e.value)
