"""Generic test helpers shared by every test area (importable as ``support`` through pytest's
``pythonpath``): waiting on a condition with a generous deadline (the machines are shared and
noisy), free loopback ports, background processes, starting a machine through the Machines API,
a self-signed certificate.
Area-specific helpers stay next to their tests (agent_helpers, cli_helpers, orch_helpers)."""

from __future__ import annotations

import datetime
import inspect
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import pytest

POLL_INTERVAL = 0.02
T = TypeVar("T")


async def wait_for(
    predicate: Callable[[], Awaitable[T] | T],
    timeout: float = 60.0,
    what: str = "",
    *,
    interval: float = POLL_INTERVAL,
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something true, and return that; fail
    with ``what`` after ``timeout`` seconds.

    Polling is the point: a test observes the system from outside, through state that offers
    no event to wait on."""
    with anyio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            await anyio.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")


def wait_for_sync(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """``wait_for`` for synchronous tests."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(POLL_INTERVAL)


def require(missing: str | None, variable: str) -> None:
    """Skip the running test because a dependency is ``missing`` (the reason), or fail it when
    the environment variable ``variable`` is 1: the CI sets it, so that a broken set-up cannot
    pass by skipping the tests that need the dependency."""
    if missing is None:
        return
    if os.environ.get(variable) == "1":
        pytest.fail(f"{missing} ({variable}=1 requires it)", pytrace=False)
    pytest.skip(missing)


def free_port() -> int:
    """A loopback port free right now (for a server the test starts next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A background process with its output in files (no pipe to fill up), always reaped."""

    def __init__(self, args: list[str], out_dir: Path, env: dict[str, str] | None = None) -> None:
        self.out_path, self.err_path = out_dir / "stdout.txt", out_dir / "stderr.txt"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            env = env or {**os.environ, "PYTHONUNBUFFERED": "1"}  # its logs readable as it runs
            self.p = subprocess.Popen(args, stdout=out, stderr=err, env=env)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    async def wait(self, timeout: float = 60.0) -> int:
        """The exit code (waited for in a worker thread); fails the test after ``timeout`` s."""
        try:
            return await anyio.to_thread.run_sync(lambda: self.p.wait(timeout))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.p.args!r} still running after {timeout}s")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


async def start_machine(api_addr: tuple[str, int], app: str = "web") -> str:
    """Create a machine through the Machines API at ``api_addr`` and wait until it is started;
    its id."""
    host, port = api_addr
    config: dict[str, Any] = {"image": "busybox", "init": {"cmd": ["sleep", "60"]}}
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as api:
        resp = await api.post(f"/v1/apps/{app}/machines", json={"config": config})
        assert resp.status_code == 200, resp.text
        mid: str = resp.json()["id"]
        resp = await api.get(
            f"/v1/apps/{app}/machines/{mid}/wait", params={"state": "started", "timeout": 30}
        )
        assert resp.status_code == 200, resp.text
    return mid


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, written in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corrosion test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path
