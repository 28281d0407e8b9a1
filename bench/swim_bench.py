"""SWIM benchmarks: the core's packet rate, and a real 20-process cluster on loopback.

* ``swim_packets_per_s`` / ``swim_packets_per_s_encrypted``: datagrams one core handles per
  second, each a ping carrying three piggybacked alive updates that change state (decode, apply,
  re-queue, then encode the piggybacked ack); the baseline is the same bytes through a bare
  msgpack unpack + pack (plus AES-GCM open + seal for the encrypted figure) - the floor any
  Python implementation of this wire pays.
* ``swim_join_convergence_s_20``: N = 20 processes (LAN preset, encrypted, uvloop), 19 join
  through one seed at once; time from the join command until the last one sees all 19 others.
  Baseline: the same with ``join_announce=0`` (memberlist's join: the seed's gossip spreads us).
* ``swim_detection_median_s_20`` (and ``_max_``): ``kill -9`` of one member; per survivor the
  time until it marks it down; median and max over survivors, pooled over the runs (the victim
  is restarted between runs so N stays 20). Baseline: the in-memory network with the same
  config (zero latency, no CPU contention), median over many kills - the protocol's own
  figure. It is first-probe delay (about Exp(1 s): probes of one member arrive about once a
  second) + one probe period + Lifeguard's Min (5.2 s at n = 20), so single runs vary from
  about 6.3 s to 8.5 s. ``swim_false_positives_20`` counts live members declared down meanwhile
  (must be 0).
* ``swim_bytes_per_node_per_s``: steady state, encrypted: UDP payload + TCP stream bytes sent
  per node per second over a window (IP/UDP/TCP headers excluded). Baseline: the in-memory
  network's figure for the same config and window.

Targets (issue 3; the Python peers on this machine): detection median <= 7.5 s with no false
positive, join <= 0.5 s, <= 235 B/node/s encrypted.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import msgpack
from _common import Report, parse_args
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swim import codec
from swim.config import Config
from swim.core import Membership
from swim.events import MemberDown
from swim.keyring import Keyring
from swim.member import NodeId, State
from swim.testing import LocalNetwork, Peer

ROOT = Path(__file__).resolve().parents[1]
KEY = bytes(range(32))


# -- the core's packet rate ------------------------------------------------------------------


def packets_per_s(encrypted: bool, seconds: float) -> tuple[float, float]:
    """(core packets/s, baseline packets/s) for pings with three changing piggybacked updates."""
    ring = Keyring([KEY]) if encrypted else None
    config = Config.lan()
    core = Membership(("10.0.0.1", 7000), config, random.Random(1), gen=1, keyring=ring)
    core.start(0.0)
    peers = [Peer(NodeId("10.0.0.2", 8000 + i, 1), config, ring) for i in range(20)]
    for p in peers:
        core.handle_datagram(p.addr, p.packet(codec.alive(p.id, 0, b"meta")), 0.0)

    def batch(round_no: int) -> list[tuple[tuple[str, int], bytes]]:
        # Every update carries a fresh incarnation, so each one changes state and is re-queued.
        out = []
        for i in range(1000):
            src = peers[i % 20]
            inc = 1000 * round_no + i // 20
            ups = [codec.alive(peers[(i + j) % 20].id, inc + j, b"meta") for j in (1, 2, 3)]
            out.append((src.addr, src.packet(codec.ping(i, core.identity), *ups)))
        return out

    for addr, data in batch(10**6):  # warm up (caches, allocator) outside the timing
        core.handle_datagram(addr, data, 0.5)
    handled, spent, round_no, now = 0, 0.0, 0, 1.0
    while spent < seconds:
        round_no += 1
        packets = batch(round_no)
        t0 = time.perf_counter()
        for addr, data in packets:
            core.handle_datagram(addr, data, now)
        spent += time.perf_counter() - t0
        handled += len(packets)
        now += 0.1
    assert core.stats.malformed == 0 and core.stats.packets_out >= handled
    rate = handled / spent

    framer = codec.Framer(b"", ring)
    bodies = [framer.open(d) for _, d in batch(0)]
    aead = AESGCM(KEY)
    nonce = bytes(12)
    m, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for body in bodies:
            raw = aead.decrypt(nonce, aead.encrypt(nonce, body, b""), b"") if encrypted else body
            reply = msgpack.packb(msgpack.unpackb(raw))
            if encrypted:
                aead.encrypt(nonce, reply, b"")
        m += len(bodies)
    return rate, m / (time.perf_counter() - t0)


# -- one node of the multi-process cluster ---------------------------------------------------


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def node_main(n: int, port: int, announce: int) -> None:
    import anyio

    from swim.events import MemberSuspect
    from swim.runtime import SwimNode

    config = Config.lan(join_announce=announce)
    async with SwimNode(config, port=port, keyring=Keyring([KEY])) as node:
        emit({"ev": "ready", "port": node.address[1], "pid": os.getpid()})
        events = node.subscribe(100_000)
        reported_all = False

        async def watch() -> None:
            nonlocal reported_all
            async for ev in events:
                t = time.monotonic()
                if isinstance(ev, MemberDown):
                    emit({"ev": "down", "port": ev.member.addr[1], "t": t})
                elif isinstance(ev, MemberSuspect):
                    emit({"ev": "suspect", "port": ev.member.addr[1], "t": t})
                alive = sum(m.state is State.ALIVE for m in node.members())
                if not reported_all and alive >= n - 1:
                    reported_all = True
                    emit({"ev": "all", "t": t})

        async def commands() -> None:
            stdin = anyio.wrap_file(sys.stdin)
            async for line in stdin:
                cmd = line.split()
                if not cmd:
                    continue
                if cmd[0] == "join":
                    got = await node.join([("127.0.0.1", int(cmd[1]))])
                    emit({"ev": "joined", "ok": got, "t": time.monotonic()})
                elif cmd[0] == "stats":
                    rs = node.runtime_stats
                    emit(
                        {
                            "ev": "stats",
                            "bytes": rs.udp_bytes_out + rs.tcp_bytes_out,
                            "t": time.monotonic(),
                            "malformed": node.stats.malformed,
                        }
                    )
                elif cmd[0] == "quit":
                    break
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            tg.start_soon(commands)


# -- the coordinator ---------------------------------------------------------------------------


class Proc:
    """One node process, its stdout parsed into a shared queue."""

    def __init__(self, idx: int, n: int, port: int, announce: int, inbox: queue.Queue) -> None:
        self.idx = idx
        cmd = [sys.executable, __file__, "--node", str(n), "--port", str(port)]
        cmd += ["--announce", str(announce)]
        self.p = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            cwd=ROOT,
        )
        self.port = 0
        self.alive = True
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox: queue.Queue) -> None:
        for line in self.p.stdout:
            with contextlib.suppress(ValueError):
                inbox.put((self, json.loads(line)))
        inbox.put((self, {"ev": "exit"}))

    def send(self, line: str) -> None:
        if self.alive:
            self.p.stdin.write(line + "\n")
            self.p.stdin.flush()

    def kill(self) -> None:
        self.alive = False
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()

    def close(self) -> None:
        if self.alive:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.send("quit")
            self.alive = False
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Cluster:
    def __init__(self, n: int, announce: int) -> None:
        self.n, self.announce = n, announce
        self.inbox: queue.Queue = queue.Queue()
        self.procs: list[Proc] = []
        self.log: list[tuple[Proc, dict]] = []

    def wait(self, pred, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            with contextlib.suppress(queue.Empty):
                self.log.append(self.inbox.get(timeout=0.05))
        return pred()

    def events(self, ev: str, since: float = 0.0) -> list[tuple[Proc, dict]]:
        return [(p, e) for p, e in self.log if e["ev"] == ev and e.get("t", since) >= since]

    def spawn(self, port: int = 0) -> Proc:
        p = Proc(len(self.procs), self.n, port, self.announce, self.inbox)
        self.procs.append(p)
        return p

    def start(self) -> None:
        for _ in range(self.n):
            self.spawn()
        ok = self.wait(lambda: len(self.events("ready")) >= self.n, 120)
        if not ok:
            raise RuntimeError("nodes did not start")
        for p, e in self.events("ready"):
            p.port = e["port"]

    def join_all(self) -> float:
        """All but the seed join it at once; seconds until the last sees everyone."""
        seed = self.procs[0]
        t0 = time.monotonic()
        for p in self.procs[1:]:
            p.send(f"join {seed.port}")
        if not self.wait(lambda: len(self.events("all", t0)) >= self.n, 60):
            raise RuntimeError("cluster did not converge")
        return max(e["t"] for _, e in self.events("all", t0)) - t0

    def bytes_rate(self, window: float) -> float:
        live = [p for p in self.procs if p.alive]

        def snapshot(since: float) -> dict:
            for p in live:
                p.send("stats")
            self.wait(lambda: len(self.events("stats", since)) >= len(live), 30)
            return {p: e for p, e in self.events("stats", since)}

        t0 = time.monotonic()
        first = snapshot(t0)
        time.sleep(window)
        t1 = time.monotonic()
        second = snapshot(t1)
        rates = [
            (second[p]["bytes"] - first[p]["bytes"]) / (second[p]["t"] - first[p]["t"])
            for p in live
            if p in first and p in second
        ]
        return statistics.fmean(rates)

    def kill_and_detect(self, victim: Proc) -> tuple[list[float], int]:
        """Per-survivor detection times and false positives (downs of live members)."""
        t0 = time.monotonic()
        victim.kill()
        survivors = [p for p in self.procs if p.alive]

        def detected() -> list[tuple[Proc, dict]]:
            return [(p, e) for p, e in self.events("down", t0) if e["port"] == victim.port]

        self.wait(lambda: len({p for p, _ in detected()}) >= len(survivors), 120)
        times = {}
        for p, e in detected():
            times.setdefault(p, e["t"] - t0)
        live_ports = {p.port for p in survivors}
        false = [e for _, e in self.events("down", t0) if e["port"] in live_ports]
        return sorted(times.values()), len(false)

    def restart(self, victim: Proc) -> None:
        t0 = time.monotonic()
        p = self.spawn(victim.port)
        self.wait(lambda: any(q is p for q, _ in self.events("ready", 0)), 60)
        p.port = victim.port
        p.send(f"join {self.procs[0].port}")
        self.wait(lambda: any(q is p for q, _ in self.events("all", t0)), 60)
        time.sleep(2.0)  # let the renewed identity reach everyone before the next kill

    def close(self) -> None:
        for p in self.procs:
            p.close()


def _all_down(net: LocalNetwork, victim) -> bool:
    return all(c.member(victim).state is State.DOWN for c in net.nodes.values())


def simulated(n: int, window: float, seeds: int) -> tuple[float, float]:
    """(bytes/node/s, detection median s) of the same config on the in-memory network: the
    protocol's own figures (zero latency, no CPU contention). The detection figure is the
    median over ``seeds`` kills of each kill's median over survivors."""
    rates, medians = [], []
    ring = Keyring([KEY])
    for seed in range(seeds):
        net = LocalNetwork(seed=seed, config=Config.lan(), jitter=0.002)
        first = net.add(keyring=ring)
        nodes = [first] + [net.add(seeds=[first.addr], keyring=ring) for _ in range(n - 1)]
        net.run_for(3.0 + 0.37 * seed)
        if seed == 0:
            before = {c.addr: c.stats.bytes_out + c.stats.stream_bytes_out for c in nodes}
            net.run_for(window)
            after = {c.addr: c.stats.bytes_out + c.stats.stream_bytes_out for c in nodes}
            rates.append(statistics.fmean((after[a] - before[a]) / window for a in before))
        victim = nodes[1 + seed % (n - 1)].addr
        net.crash(victim)
        t0 = net.now
        net.run_until_true(partial(_all_down, net, victim), timeout=60.0, step=0.5)
        downs = [
            t - t0
            for t, _, ev in net.notifications
            if isinstance(ev, MemberDown) and ev.member.addr == victim
        ]
        medians.append(statistics.median(downs))
    return rates[0], statistics.median(medians)


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--node", type=int, help=argparse_hidden)
        p.add_argument("--port", type=int, default=0, help=argparse_hidden)
        p.add_argument("--announce", type=int, default=64, help=argparse_hidden)
        p.add_argument("--n", type=int, default=20, help="cluster size (default 20)")
        p.add_argument("--runs", type=int, default=0, help="kill runs (default 1 quick, 5 full)")

    argparse_hidden = "internal: run one cluster node"
    args = parse_args("SWIM benchmarks", extra)
    if args.node:
        from swim.runtime import run

        run(node_main, args.node, args.port, args.announce)
        return

    report = Report(args.json)
    quick = args.quick
    n = args.n
    runs = args.runs or (1 if quick else 8)
    window = 12.0 if quick else 90.0

    for encrypted, name in ((False, "swim_packets_per_s"), (True, "swim_packets_per_s_encrypted")):
        rate, floor = packets_per_s(encrypted, 0.7 if quick else 3.0)
        what = "msgpack unpack+pack" + (" + AES-GCM open+seal" if encrypted else "")
        report.metric(
            name,
            rate,
            "packets/s",
            f"{what} of the same bytes: {floor:,.0f}/s",
            baseline_value=round(floor),
            ratio=round(rate / floor, 3),
        )

    sim_bytes, sim_detect = simulated(n, window, 20 if quick else 60)
    if not quick:
        base = Cluster(n, announce=0)
        try:
            base.start()
            base_join = base.join_all()
        finally:
            base.close()
    cluster = Cluster(n, announce=64)
    try:
        cluster.start()
        join = cluster.join_all()
        report.metric(
            f"swim_join_convergence_s_{n}",
            join,
            "s",
            "target <= 0.5 s (kinship 0.3-0.5 s, swim-protocol 4.1 s)"
            + ("" if quick else f"; memberlist-style join (no announce): {base_join:.3f} s"),
            **({} if quick else {"baseline_value": round(base_join, 4)}),
        )
        time.sleep(1.5)
        rate = cluster.bytes_rate(window)
        report.metric(
            "swim_bytes_per_node_per_s",
            rate,
            "B/node/s",
            f"target <= 235 B/node/s (kinship 233-254); in-memory model: {sim_bytes:.0f}",
            baseline_value=round(sim_bytes, 1),
            window_s=window,
        )
        times: list[float] = []
        maxes: list[float] = []
        false_total = 0
        rng = random.Random(7)
        for r in range(runs):
            victim = rng.choice([p for p in cluster.procs[1:] if p.alive])
            got, false = cluster.kill_and_detect(victim)
            times += got
            maxes.append(max(got) if got else float("nan"))
            false_total += false
            report.info(
                f"  run {r + 1}: median {statistics.median(got):.2f} s, max {max(got):.2f} s"
            )
            if r + 1 < runs:
                cluster.restart(victim)
        report.metric(
            f"swim_detection_median_s_{n}",
            statistics.median(times),
            "s",
            f"target <= 7.5 s (kinship 7.3-8.3 s); in-memory model (median of kills): "
            f"{sim_detect:.2f} s",
            baseline_value=round(sim_detect, 3),
            runs=runs,
            samples=len(times),
        )
        report.metric(
            f"swim_detection_max_s_{n}",
            max(maxes),
            "s",
            "max over survivors and runs",
        )
        report.metric(
            f"swim_false_positives_{n}",
            false_total,
            "members",
            "target 0: live members declared down during the runs",
        )
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
