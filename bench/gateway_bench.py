"""Gateway numbers: create through the gateway → machine reachable through another host's proxy.

Three namespace hosts (``orchestrator.hosts.HostLab``, process driver; needs root), a gateway
(``python -m orchestrator gateway``) on h1. Each sample creates a machine serving HTTP, then polls
the proxy of a host other than the machine's owner (pinned to the machine with
``fly-force-instance-id``) until the machine itself answers.

* ``gateway_create_to_reachable_p50_ms`` / ``gateway_create_to_reachable_p90_ms`` — through the
  gateway on h1 (placement over the three workers, forward, start, publish, replicate, route).
* ``direct_create_to_reachable_p90_ms`` — the baseline, measured in the same run, interleaved:
  the same create sent straight to a worker's Machines API (round robin), same reach check.
* ``gateway_create_overhead_ratio_p90`` — gateway p90 / direct p90.

``--quick`` finishes in under a minute; ``--json`` prints one JSON object per metric and line.
Machines are destroyed after each sample (not timed).
"""

from __future__ import annotations

import itertools
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import httpx
from _common import Report, parse_args

from orchestrator.hosts import DOMAIN, HostLab, hosts_unavailable

TARGET = "target p90 < 300 ms (Fly flaps: create P90 < 5 s)"
PORT = 8080
# the smallest HTTP server that starts fast: no http.server import, one canned answer
SERVER = (
    "import os, socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {PORT})); s.listen(64)\n"
    "body = os.environ['FLY_MACHINE_ID'].encode()\n"
    "head = b'HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\nconnection: close\\r\\n\\r\\n'\n"
    "while True:\n"
    "    c, _ = s.accept(); c.recv(65536); c.sendall(head % len(body) + body); c.close()\n"
)


def machine_config(www: Path) -> dict:
    """A machine serving HTTP: busybox's httpd (starts in a millisecond, so the figure is the
    platform's, not an interpreter's start-up) serving ``www``, else the Python server above."""
    busybox = shutil.which("busybox")
    command = ([busybox, "httpd", "-f", "-p", str(PORT), "-h", str(www)] if busybox
               else [sys.executable, "-I", "-S", "-c", SERVER])  # fmt: skip
    return {
        "image": "busybox",
        "init": {"exec": command},
        "services": [{"protocol": "tcp", "internal_port": PORT}],
        "stop_config": {"timeout": "2s"},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"error: timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def sample(client: httpx.Client, lab: HostLab, api: str, config: dict) -> float:
    """Milliseconds from POST create to the machine answering through another host's proxy."""
    t0 = time.perf_counter()
    r = client.post(f"{api}/v1/apps/bench/machines", json={"config": config})
    if r.status_code != 200:
        raise SystemExit(f"error: create failed: {r.status_code} {r.text}")
    mid = r.json()["id"]
    owner = r.headers.get("fly-worker") or next(h.name for h in lab.hosts if h.api_url == api)
    proxy = next(h for h in lab.hosts if h.name != owner).proxy_url
    headers = {"host": f"bench.{DOMAIN}", "fly-force-instance-id": mid}
    deadline = time.monotonic() + 60
    while True:
        try:
            got = client.get(proxy, headers=headers, timeout=5)
            if got.status_code == 200 and got.headers.get("fly-machine-id") == mid:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"error: machine {mid} never answered through {proxy}")
        time.sleep(0.002)
    elapsed = (time.perf_counter() - t0) * 1000
    client.delete(f"{api}/v1/apps/bench/machines/{mid}", params={"force": "true"})
    return elapsed


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    report = Report(args.json)
    why = hosts_unavailable()
    if why is not None:
        raise SystemExit(f"error: the gateway bench needs namespace hosts: {why}")
    n = 10 if args.quick else 40
    with HostLab(3) as lab, httpx.Client(timeout=60) as client:
        gateway = lab.start_gateway(lab.hosts[0])
        www = lab.base / "www"
        www.mkdir()
        (www / "index.html").write_text("hello\n")
        config = machine_config(www)

        def all_live() -> bool:
            try:
                workers = client.get(f"{gateway}/v1/workers").json()
            except (httpx.HTTPError, ValueError):
                return False
            return sum(1 for w in workers if w["live"]) == len(lab.hosts)

        wait_until(all_live, 60, "the three workers in h1's replica")
        report.info(f"lab {lab.name}: gateway {gateway}, {n} samples each")
        direct_apis = itertools.cycle([h.api_url for h in lab.hosts])
        sample(client, lab, gateway, config)  # warm-up: first imports, first connections
        via_gateway, direct = [], []
        for _ in range(n):
            via_gateway.append(sample(client, lab, gateway, config))
            direct.append(sample(client, lab, next(direct_apis), config))
    for q in (50, 90):
        report.metric(f"gateway_create_to_reachable_p{q}_ms", percentile(via_gateway, q), "ms",
                      TARGET, samples=n)  # fmt: skip
    report.metric("direct_create_to_reachable_p90_ms", percentile(direct, 90), "ms",
                  "same create sent straight to a worker, same run", samples=n,
                  p50=round(percentile(direct, 50), 3))  # fmt: skip
    report.metric("gateway_create_overhead_ratio_p90",
                  percentile(via_gateway, 90) / percentile(direct, 90), "x",
                  "direct to a worker, same run")  # fmt: skip


if __name__ == "__main__":
    main()
