"""Hypothesis strategies and a stateful machine whose rules are operations and faults.

``SwimMachine`` (a ``RuleBasedStateMachine``) builds a small world of swim members and lets
hypothesis choose a sequence of steps - advance time, crash, restart, partition (halves, one
isolated node, asymmetric), heal, clog, change loss, broadcast - checking every safety invariant
after each step; its teardown heals everything, runs the liveness phase and checks the rest. A
failing sequence shrinks to a short one, and the failure message carries the world's seed and
the steps taken so far (as its configuration). ``CrdtMachine`` adds real databases, the reference
pull-sync core and writes on random nodes, and checks that the databases converge;
``AgentMachine`` does the same with the agent's own replication core
(``corrosion.core.replication``);
``OrchestratorMachine`` adds orchestrator workers, their API calls and their faults.

Use them in a test module as ``TestX = SwimMachine.TestCase`` (with ``settings``), or build your
own from :func:`link_models` and :func:`fault_schedules`.
"""

from __future__ import annotations

import random

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from swim import Config

from .checkers import run_liveness
from .cluster import swim_world
from .crdt_checks import CrdtConvergence
from .crdt_sync import CRDT, CrdtSyncCore, crdt_sync
from .faults import FaultEvent
from .network import Delay, LinkModel
from .scenarios import PRESETS
from .world import World

__all__ = [
    "AgentMachine",
    "CrdtMachine",
    "OrchestratorMachine",
    "SwimMachine",
    "delays",
    "fault_schedules",
    "link_models",
]

BASE_LINK = PRESETS["lan"][1]


def delays(max_high: float = 0.05) -> st.SearchStrategy[Delay]:
    """One-way delay distributions up to ``max_high`` seconds."""

    @st.composite
    def build(draw) -> Delay:
        kind = draw(st.sampled_from(["fixed", "uniform", "exponential"]))
        low = draw(st.floats(0.0, max_high / 4))
        high = draw(st.floats(low, max_high))
        mean = draw(st.floats(low, high))
        return Delay(kind, low, mean, high)

    return build()


def link_models(max_loss: float = 0.2) -> st.SearchStrategy[LinkModel]:
    """Link models with loss up to ``max_loss`` and some duplication and reordering."""
    return st.builds(
        LinkModel,
        delay=delays(),
        loss=st.floats(0.0, max_loss),
        duplicate=st.floats(0.0, 0.1),
        reorder=st.floats(0.0, 0.2),
        reorder_delay=st.floats(0.0, 0.1),
    )


def fault_schedules(n: int, duration: float, max_events: int = 12):
    """Lists of :class:`FaultEvent` for ``n`` nodes within ``duration`` seconds (healed and
    restarted by their own events or by the liveness phase)."""
    node = st.integers(0, n - 1)
    t = st.floats(0.0, duration)
    lag = st.sampled_from([0.5, 1.0, 2.0, 4.0]).map(lambda x: Delay("uniform", x, 1.5 * x, 2 * x))
    event = st.one_of(
        st.builds(FaultEvent, t, st.just("crash"), node),
        st.builds(FaultEvent, t, st.just("restart"), node),
        st.builds(FaultEvent, t, st.just("clog"), node, lag=lag),
        st.builds(FaultEvent, t, st.just("unclog"), node),
        st.builds(
            FaultEvent,
            t,
            st.just("link"),
            link=st.floats(0.0, 0.3).map(lambda p: LinkModel(BASE_LINK.delay, loss=p)),
        ),
        st.builds(
            lambda at, k, sym: FaultEvent(
                at,
                "partition",
                groups=(tuple(range(k)), tuple(range(k, n))),
                symmetric=sym,
                tag=f"p{at:.3f}",
            ),
            t,
            st.integers(1, max(1, n - 1)),
            st.booleans(),
        ),
    )
    return st.lists(event, max_size=max_events)


def machine_config() -> Config:
    """LAN timings with push/pull every 10 s, so healing a partition takes seconds, not
    minutes, in a short simulated run."""
    return Config.lan(push_pull_interval=10.0)


class SwimMachine(RuleBasedStateMachine):
    """Operations and faults on a small swim world; invariants after every step."""

    max_nodes = 6
    extra_cores: tuple = ()
    files = False

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.steps: list[str] = []

    # -- setup ----------------------------------------------------------------------------------

    @initialize(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 6))
    def build(self, seed: int, n: int) -> None:
        n = min(n, self.max_nodes)
        self.world = self.make_world(seed, n)
        self.world.repro = "the hypothesis steps below (rerun the test to replay them)"
        self.world.fail_fast = True
        self._log(f"swim_world(seed={seed}, n={n}, config=lan(push_pull_interval=10))")
        self.setup_world(self.world)
        self.world.run_until(n * 0.05 + 3.0)

    def make_world(self, seed: int, n: int) -> World:
        """Hook for subclasses: the world to drive."""
        return swim_world(
            seed,
            n,
            config=machine_config(),
            link=BASE_LINK,
            extra=self.extra_cores,
            files=self.files,
        )

    def setup_world(self, world: World) -> None:
        """Hook for subclasses: attach more checkers."""

    @property
    def sim(self) -> World:
        """The world ``build`` made (hypothesis runs it before any rule)."""
        assert self.world is not None
        return self.world

    def _log(self, text: str) -> None:
        w = self.world
        self.steps.append(f"t={w.now if w else 0.0:.2f}s {text}")
        if w is not None:
            w.config_text = "steps so far:\n" + "\n".join(f"  {s}" for s in self.steps)

    def _node(self, i: int):
        return self.sim.nodes[i % len(self.sim.nodes)]

    # -- rules ----------------------------------------------------------------------------------

    @rule(dt=st.floats(0.1, 20.0))
    def advance(self, dt: float) -> None:
        self._log(f"advance {dt:.2f}s")
        self.sim.run_for(dt)

    @precondition(lambda self: len(self.world.live_nodes()) > 2)
    @rule(i=st.integers(0, 5))
    def crash(self, i: int) -> None:
        node = self._node(i)
        self._log(f"crash {node.name}")
        self.sim.crash(node)

    @precondition(lambda self: len(self.world.live_nodes()) < len(self.world.nodes))
    @rule(i=st.integers(0, 5))
    def restart(self, i: int) -> None:
        down = [n for n in self.sim.nodes if not n.up]
        node = down[i % len(down)]
        self._log(f"restart {node.name}")
        self.sim.restart(node)

    @rule(k=st.integers(1, 5), symmetric=st.booleans(), isolate=st.booleans())
    def partition(self, k: int, symmetric: bool, isolate: bool) -> None:
        nodes = self.sim.nodes
        k = 1 if isolate else 1 + k % (len(nodes) - 1)
        self._log(f"partition first {k} | rest ({'symmetric' if symmetric else 'asymmetric'})")
        self.sim.partition([nodes[:k], nodes[k:]], symmetric=symmetric)

    @rule()
    def heal(self) -> None:
        self._log("heal all partitions")
        self.sim.heal()

    @rule(i=st.integers(0, 5), lag=st.sampled_from([0.5, 1.0, 3.0, 8.0]))
    def clog(self, i: int, lag: float) -> None:
        node = self._node(i)
        self._log(f"clog {node.name} lag {lag:g}..{2 * lag:g}s")
        self.sim.clog(node, Delay("uniform", lag, 1.5 * lag, 2 * lag))

    @rule(i=st.integers(0, 5))
    def unclog(self, i: int) -> None:
        node = self._node(i)
        self._log(f"unclog {node.name}")
        self.sim.unclog(node)

    @rule(loss=st.sampled_from([0.0, 0.01, 0.05, 0.2]), dup=st.sampled_from([0.0, 0.05]))
    def set_loss(self, loss: float, dup: float) -> None:
        self._log(f"link loss {loss:g} dup {dup:g}")
        self.sim.set_link(LinkModel(BASE_LINK.delay, loss=loss, duplicate=dup, reorder=0.05))

    @rule(i=st.integers(0, 5), size=st.integers(0, 200))
    def broadcast(self, i: int, size: int) -> None:
        node = self._node(i)
        core = node.cores.get("swim") if node.up else None
        if core is None:
            return
        self._log(f"broadcast {size} B from {node.name}")
        core.broadcast(bytes(size), self.sim.now)

    # -- invariants and the end -----------------------------------------------------------------

    @invariant()
    def safe(self) -> None:
        if self.world is not None:
            self.world.check(final=False)

    def teardown(self) -> None:
        world = self.world
        if world is None:
            return
        try:
            if world.violations:  # already failing: report that, skip the liveness phase
                world.check(final=False)
            self._log("heal everything, run the liveness phase")
            run_liveness(world, link=BASE_LINK)
            world.check(final=True)
        finally:
            world.close()


class CrdtMachine(SwimMachine):
    """:class:`SwimMachine` plus real databases, the reference sync core and writes."""

    max_nodes = 5
    extra_cores = (crdt_sync(interval=1.0),)
    files = True

    def setup_world(self, world: World) -> None:
        world.add_checker(
            CrdtConvergence(
                lambda node: None if (c := node.core_of(CRDT, CrdtSyncCore)) is None else c.conn
            )
        )

    @rule(i=st.integers(0, 5), key=st.integers(0, 7), value=st.integers(0, 3), delete=st.booleans())
    def write(self, i: int, key: int, value: int, delete: bool) -> None:
        node = self._node(i)
        core = node.cores.get(CRDT) if node.up else None
        if core is None:
            return
        if delete:
            self._log(f"write on {node.name}: delete k{key}")
            core.execute("DELETE FROM kv WHERE k = ?", (f"k{key}",))
        else:
            self._log(f"write on {node.name}: k{key} = v{value}")
            core.execute(
                "INSERT INTO kv (k, v, n) VALUES (?, ?, 1) "
                "ON CONFLICT(k) DO UPDATE SET v = excluded.v, n = n + 1",
                (f"k{key}", f"v{value}"),
            )


class AgentMachine(SwimMachine):
    """Agents (the real replication core over real stores, ``simulations.agent_core``) under
    the same faults, plus writes on random nodes - small ones, and versions of many chunks
    (``agent_load``) - while the replication channel loses, doubles and reorders datagrams and
    some of its links are muted (healing keeps them muted: sync alone crosses them); at the end
    every database must be equal and no node may hold a version in part or miss one."""

    max_nodes = 5

    def make_world(self, seed: int, n: int) -> World:
        from .agent_core import agent_world

        return agent_world(seed, n, swim_config=machine_config(), link=BASE_LINK)

    @rule(i=st.integers(0, 5), key=st.integers(0, 7), value=st.integers(0, 3), delete=st.booleans())
    def write(self, i: int, key: int, value: int, delete: bool) -> None:
        from .agent_core import agent_of

        node = self._node(i)
        core = agent_of(node)
        if core is None:
            return
        if delete:
            self._log(f"write on {node.name}: delete k{key}")
            stmt: tuple[str, tuple[str, ...]] = ("DELETE FROM kv WHERE k = ?", (f"k{key}",))
        else:
            self._log(f"write on {node.name}: k{key} = v{value}")
            stmt = (
                "INSERT INTO kv (k, v, n) VALUES (?, ?, 1) "
                "ON CONFLICT(k) DO UPDATE SET v = excluded.v, n = n + 1",
                (f"k{key}", f"v{value}"),
            )
        core.execute([stmt], self.sim.now)

    # versions of many chunks (``agent_load``): lost, doubled, reordered, or only synced

    @rule(
        i=st.integers(0, 5),
        rows=st.integers(10, 80),
        size=st.sampled_from([200, 700]),
        salt=st.integers(0, 2**16),
    )
    def big_write(self, i: int, rows: int, size: int, salt: int) -> None:
        from .agent_core import agent_of
        from .agent_load import big_transaction

        core = agent_of(self._node(i))
        if core is not None:
            self._log(f"big write on {self._node(i).name}: {rows} rows of {size} chars ({salt})")
            core.execute(big_transaction(random.Random(salt), rows, size), self.sim.now)

    @rule(i=st.integers(0, 5), size=st.sampled_from([9_000, 40_000]), salt=st.integers(0, 2**16))
    def large_write(self, i: int, size: int, salt: int) -> None:
        from .agent_core import agent_of
        from .agent_load import large_value

        core = agent_of(self._node(i))
        if core is not None:
            self._log(f"large value on {self._node(i).name}: {size} chars ({salt})")
            core.execute(large_value(random.Random(salt), size), self.sim.now)

    @rule(
        loss=st.sampled_from([0.0, 0.2, 0.5]),
        dup=st.sampled_from([0.0, 0.2]),
        reorder=st.sampled_from([0.0, 0.5]),
    )
    def replication_link(self, loss: float, dup: float, reorder: float) -> None:
        from .agent_core import AGENT

        self._log(f"replication link loss {loss:g} dup {dup:g} reorder {reorder:g}")
        model = LinkModel(BASE_LINK.delay, loss=loss, duplicate=dup, reorder=reorder,
                          reorder_delay=0.2)  # fmt: skip
        self.sim.set_link(model, channel=AGENT)

    @rule()
    def isolate_every_node(self) -> None:
        """Chunks in flight stop where they are: no relay, no sync until the heal."""
        self._log("partition every node from every other")
        self.sim.partition([[node] for node in self.sim.nodes])

    @rule(src=st.integers(0, 5), dst=st.integers(0, 5), muted=st.booleans())
    def mute_replication(self, src: int, dst: int, muted: bool) -> None:
        from .agent_core import AGENT

        a, b = self._node(src), self._node(dst)
        if a is not b:
            self._log(f"{'mute' if muted else 'unmute'} replication {a.name}->{b.name}")
            self.sim.mute(AGENT, a, b, muted)


class OrchestratorMachine(SwimMachine):
    """Orchestrator workers beside agents (``simulations.orch_world``): API calls, process
    kills (now, or at the k-th kill point inside a run), driver faults and agent outages on top
    of the swim faults. After every step: one active run per (machine, action); at the end,
    after recovery and heal: every run finished and every replica holds each worker's truth."""

    max_nodes = 4

    def make_world(self, seed: int, n: int) -> World:
        from .orch_world import orchestrator_world

        return orchestrator_world(seed, n)

    def setup_world(self, world: World) -> None:
        from .orch_world import Workload

        self.load = Workload(world)

    @rule(
        i=st.integers(0, 5),
        op=st.sampled_from(["create", "start", "stop", "restart", "destroy", "cordon"]),
        pick=st.integers(0, 7),
        force=st.booleans(),
    )
    def api(self, i: int, op: str, pick: int, force: bool) -> None:
        self._log(self.load.op(i, op, pick, force))

    @rule(
        kind=st.sampled_from(["kill", "killpoint", "driver", "outage"]),
        pick=st.integers(0, 1 << 12),
        u=st.floats(0.0, 0.99),
    )
    def orchestrator_fault(self, kind: str, pick: int, u: float) -> None:
        self._log(self.load.fault(kind, pick, u))

    def teardown(self) -> None:
        from .orch_world import recover

        if self.world is not None and not self.world.violations:
            self._log("restart every node and orchestrator process")
            recover(self.world)
        super().teardown()
