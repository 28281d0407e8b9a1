"""Workloads that reach the replication core's hard paths: versions of many chunks.

The agent cuts a version into chunks of about ``corrosion.core.changeset.MAX_CHUNK_BYTES`` (8 KiB)
and a receiver buffers them (``__corro_buffered_changes``, ``__corro_seq_bookkeeping``) until it
holds every seq, in any order; sync completes a version left partial by lost chunks. Single-row
writes never get there. These writes do, at the agent's own chunk size:

- :func:`big_transaction`: tens of rows with values of hundreds of bytes (2 to 8 chunks);
- :func:`large_value`: one value larger than a chunk (a chunk holding one change over the limit),
  with small rows around it;
- :func:`overwrite`: small writes to rows of earlier big transactions, so the versions a node
  serves later have holes in their seqs (superseded changes) and are cut differently from what
  their origin broadcast.

:func:`chunked_run` drives a small world of agents with them (``agent_core.agent_world``) while
the replication channel loses, duplicates and reorders datagrams (chunks arrive in any order or
not at all), some directed links carry no replication datagrams at all (muted for the whole run,
heal included: sync alone must deliver across them), and a node crashes and restarts with
versions held in part. After heal every checker of ``agent_world`` must hold: equal databases
(byte for byte), no partial or missing version, equal heads, bookkeeping tables in step with
memory (that one after every event too); and every node's subscriptions (corrosion's own code,
``subscription_core``) must hold what a fresh run of their queries returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from corrosion.core.changeset import peek_changeset
from corrosion.core.statements import Statement

from .agent_core import AGENT, AgentCore, agent_of, agent_world
from .checkers import run_liveness
from .network import LinkModel
from .scenarios import PRESETS
from .subscription_core import SubscriptionsMatch, subscriptions, subscriptions_of
from .world import World

__all__ = [
    "UPSERT",
    "ChunkedRun",
    "big_transaction",
    "chunk_link",
    "chunked_run",
    "large_value",
    "overwrite",
]

UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"
BIG_KEYS = 96  # rows b0..b95 are shared by big transactions and overwrites

BASE_LINK = PRESETS["lan"][1]


def _text(rng: random.Random, size: int) -> str:
    return rng.randbytes((size + 1) // 2).hex()[:size]


def big_transaction(rng: random.Random, rows: int, value_size: int) -> list[Statement]:
    """``rows`` upserts of distinct rows ``b*`` with values of ``value_size`` characters (about
    ``rows * value_size / 8 KiB`` chunks)."""
    keys = rng.sample(range(BIG_KEYS), min(rows, BIG_KEYS))
    return [(UPSERT, (f"b{k}", _text(rng, value_size))) for k in keys]


def large_value(rng: random.Random, size: int) -> list[Statement]:
    """One value of ``size`` characters (over a chunk: a chunk of its own) between small rows."""
    return [
        (UPSERT, (f"s{rng.randrange(8)}", _text(rng, 16))),
        (UPSERT, (f"L{rng.randrange(4)}", _text(rng, size))),
        (UPSERT, (f"s{rng.randrange(8)}", _text(rng, 16))),
    ]


def overwrite(rng: random.Random, rows: int) -> list[Statement]:
    """Small writes (a delete among them) to rows of earlier big transactions: their versions'
    superseded changes leave holes in the seqs served later."""
    out: list[Statement] = []
    for k in rng.sample(range(BIG_KEYS), rows):
        if rng.random() < 0.2:
            out.append(("DELETE FROM kv WHERE k = ?", (f"b{k}",)))
        else:
            out.append((UPSERT, (f"b{k}", _text(rng, 8))))
    return out


def chunk_link(rng: random.Random) -> LinkModel:
    """A replication link that loses, duplicates and reorders chunks (heavily: reordering holds
    a datagram back by up to 0.2 s, far more than the spread of a version's chunks)."""
    return LinkModel(
        BASE_LINK.delay,
        loss=rng.choice([0.1, 0.2, 0.35]),
        duplicate=rng.choice([0.1, 0.25]),
        reorder=rng.choice([0.3, 0.6]),
        reorder_delay=0.2,
    )


@dataclass
class ChunkedRun:
    """What :func:`chunked_run` did (for reports and tests)."""

    seed: int
    nodes: int
    link: LinkModel
    muted: list[tuple[int, int]] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    crashed: int | None = None
    chunked_versions: int = 0  # versions broadcast or served in more than one chunk
    chunk_frames: int = 0  # datagrams carrying a chunk of such a version
    chunk_frames_lost: int = 0  # of those, dropped by loss, a partition or a mute
    chunk_frames_doubled: int = 0  # of those, delivered twice
    partial_peak: int = 0  # most versions held in part at once (all nodes)
    partial_at_heal: int = 0  # versions held in part when the faults stopped: sync's job
    subscription_events: int = 0  # events the live nodes' subscriptions produced (live_queries)
    digest: str = ""  # the world's trace digest at the end (same seed, same digest)

    def watch(self, world: World) -> None:
        """Count chunks on the wire and partial versions (``world.send_hooks``, an audit)."""
        ranges: dict[tuple[bytes, int], set[tuple[int, int]]] = {}
        counts: dict[tuple[bytes, int], list[int]] = {}  # frames, lost, doubled per version

        def on_send(node, channel, dst, data, info, fate) -> None:
            header = peek_changeset(data) if channel == AGENT else None
            if header is None:
                return
            key = header[:2]
            seen = ranges.setdefault(key, set())
            was_multi = len(seen) > 1
            seen.add(header[2:])
            frame = [1, int(not fate), int(len(fate) == 2)]
            mine = counts.setdefault(key, [0, 0, 0])
            for i, x in enumerate(frame):
                mine[i] += x
            if len(seen) < 2:
                return
            add = frame if was_multi else mine  # a version seen in two chunks: count it all
            self.chunked_versions += 0 if was_multi else 1
            self.chunk_frames += add[0]
            self.chunk_frames_lost += add[1]
            self.chunk_frames_doubled += add[2]

        world.send_hooks.append(on_send)
        world.every(0.05, lambda now: self._count_partials(world))

    def _count_partials(self, world: World) -> int:
        count = sum(_partials(a) for node in world.nodes if (a := agent_of(node)) is not None)
        self.partial_peak = max(self.partial_peak, count)
        return count

    def describe(self) -> str:
        m = self.link
        lines = [
            f"chunked run seed {self.seed}: {self.nodes} agents",
            f"replication link loss={m.loss:g} dup={m.duplicate:g} reorder={m.reorder:g} "
            f"(hold-back up to {m.reorder_delay:g} s) until heal",
            "muted replication links (whole run): "
            + (", ".join(f"n{a}->n{b}" for a, b in self.muted) or "none"),
            f"crash and restart: {'none' if self.crashed is None else f'n{self.crashed}'}",
            "then a big version on a link losing half its datagrams, every node cut off",
            f"chunked versions {self.chunked_versions}: {self.chunk_frames} chunk datagrams, "
            f"{self.chunk_frames_lost} lost, {self.chunk_frames_doubled} doubled; versions held "
            f"in part: at most {self.partial_peak} at once, {self.partial_at_heal} at heal",
            "writes:",
            *(f"  {w}" for w in self.writes),
        ]
        return "\n".join(lines)


def chunked_run(
    seed: int,
    *,
    writes: int = 12,
    liveness_timeout: float | None = None,
    files_dir: str | None = None,
    live_queries: bool = True,
) -> ChunkedRun:
    """Build and run one seeded chunked workload to the end of its liveness phase and check it
    (raises ``SimulationFailure`` carrying the seed and this run's description).
    ``liveness_timeout``: virtual seconds after heal before what is left is a violation (default:
    the checkers' deadlines; a run that settles ends sooner either way). ``live_queries``:
    every node also hosts corrosion's subscriptions (``subscription_core``), whose rows must
    equal a fresh run of their queries after heal."""
    rng = random.Random(seed)
    world, run = _build(seed, rng, files_dir, live_queries)
    try:
        _drive(world, run, rng, writes)
        run.partial_at_heal = run._count_partials(world)
        world.config_text = run.describe()
        run_liveness(world, link=BASE_LINK, timeout=liveness_timeout)
        run.digest = world.digest()
        run.subscription_events = sum(
            c.events for node in world.nodes if (c := subscriptions_of(node)) is not None
        )
        world.check()
    finally:
        world.close()
    return run


def _build(
    seed: int, rng: random.Random, files_dir: str | None, live_queries: bool
) -> tuple[World, ChunkedRun]:
    n = 4 + seed % 3
    extra = [subscriptions()] if live_queries else []
    world = agent_world(seed, n, link=BASE_LINK, files_dir=files_dir, extra=extra)
    if live_queries:
        world.add_checker(SubscriptionsMatch(deadline=180.0))
    world.repro = f"simulations.agent_load.chunked_run({seed})"
    run = ChunkedRun(seed, n, chunk_link(rng))
    # a node that hears no replication datagram from anyone, and a few more muted links
    deaf = rng.randrange(n)
    muted = {(src, deaf) for src in range(n) if src != deaf}
    others = [(a, b) for a in range(n) for b in range(n) if a != b and b != deaf]
    muted.update(rng.sample(others, rng.randint(1, 3)))
    run.muted = sorted(muted)
    world.config_text = run.describe()
    return world, run


def _drive(world: World, run: ChunkedRun, rng: random.Random, writes: int) -> None:
    world.run_until(2.0)
    nodes = world.nodes
    for src, dst in run.muted:
        world.mute(AGENT, nodes[src], nodes[dst])
    world.set_link(run.link, channel=AGENT)
    run.watch(world)
    crash_at = rng.randrange(writes // 3, writes - 2)
    restart_at = crash_at + rng.randint(1, 2)
    victim = None
    for i in range(writes):
        if i == crash_at:  # preferably a node holding versions in part: buffered across a restart
            holding = [n for n in nodes if (a := agent_of(n)) and _partials(a)]
            victim = rng.choice(holding or nodes)
            run.crashed = victim.index
            world.crash(victim)
        if i == restart_at and victim is not None:
            world.restart(victim)
        _write(world, run, rng, rng.choice(["big", "big", "big", "large", "overwrite"]))
        world.run_for(rng.uniform(0.02, 0.6))
    # the tail: a big version on a very lossy link, then every node cut off from every other
    # while its chunks fly (no relay, no sync); whoever got only some of them holds it in part
    # at heal, and sync must finish the job
    world.set_link(LinkModel(run.link.delay, loss=0.5, reorder=0.5, reorder_delay=0.2),
                   channel=AGENT)  # fmt: skip
    _write(world, run, rng, "big")
    world.run_for(0.01)
    world.partition([[node] for node in nodes])
    run.writes.append(f"t={world.now:.2f}s every node cut off from the others until heal")
    world.run_for(1.0)


def _write(world: World, run: ChunkedRun, rng: random.Random, kind: str) -> int:
    """One write of ``kind`` on a random live node; returns the node's index."""
    live = world.live_nodes()
    node = live[rng.randrange(len(live))]
    if kind == "big":
        stmts = big_transaction(rng, rng.randint(15, 80), rng.choice([200, 400, 700]))
    elif kind == "large":
        stmts = large_value(rng, rng.choice([9_000, 20_000, 40_000]))
    else:
        stmts = overwrite(rng, rng.randint(2, 10))
    core = agent_of(node)
    assert core is not None
    version = core.execute(stmts, world.now)
    run.writes.append(f"t={world.now:.2f}s n{node.index} {kind} x{len(stmts)} -> v{version}")
    world.config_text = run.describe()
    return node.index


def _partials(core: AgentCore) -> int:
    return sum(len(b.partials) for b in core.store.bookie.actors.values())
