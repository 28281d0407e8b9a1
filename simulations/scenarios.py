"""Named scenarios: a seed, a size and a duration become a full run configuration.

Everything a run does is derived from ``(seed, nodes, duration, scenario)`` through the
``scenario`` random stream and printed by :meth:`RunConfig.describe` - the whole option set, not
just the seed (a VOPR lesson). A run has two phases: the *safety* phase (``duration`` virtual
seconds, faults on, every safety invariant checked) and the *liveness* phase (every fault
healed, the link clean, run until the liveness checkers are satisfied or their deadline).

Scenarios: ``steady`` (no faults), ``lossy`` (loss, duplication, reordering throughout),
``partition`` (one split that heals), ``crash`` (crashes, half of them restarted), ``clog``
(stressed nodes), ``chaos`` (all of the above at random, VOPR style).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from swim import Config

from .faults import FaultEvent
from .network import Delay, LinkModel

__all__ = ["PRESETS", "SCENARIOS", "RunConfig", "derive"]

PRESETS: dict[str, tuple[Callable[..., Config], LinkModel]] = {
    "lan": (Config.lan, LinkModel(Delay("exponential", 0.0002, 0.0005, 0.01))),
    "wan": (Config.wan, LinkModel(Delay("exponential", 0.02, 0.05, 0.3))),
    "local": (Config.local, LinkModel(Delay("exponential", 0.00005, 0.0001, 0.002))),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; derived from the seed by :func:`derive`."""

    seed: int
    nodes: int
    duration: float
    scenario: str
    preset: str
    bootstrap: str
    swim: Config
    link: LinkModel  # the clean base link (liveness phase)
    start_link: LinkModel  # the link during the safety phase
    faults: tuple[FaultEvent, ...] = field(default=())
    stagger: float = 0.05

    @property
    def repro(self) -> str:
        return (
            f"python -m simulations run --seed {self.seed} --nodes {self.nodes} "
            f"--duration {self.duration:g} --scenario {self.scenario} --preset {self.preset} "
            f"--bootstrap {self.bootstrap}"
        )

    def describe(self) -> str:
        c = self.swim
        n = self.nodes
        low, high, k = c.suspicion_bounds(n)
        d, s = self.link.delay, self.start_link
        lines = [
            f"seed            = {self.seed}",
            f"scenario        = {self.scenario}",
            f"nodes           = {n}",
            f"safety phase    = {self.duration:g} s (then heal, liveness phase)",
            f"bootstrap       = {self.bootstrap}"
            + (f" (node i boots at i * {self.stagger:g} s)" if self.bootstrap == "join" else ""),
            f"swim preset     = {self.preset}",
            "swim config     = "
            + ", ".join(f"{k}={v!r}" for k, v in sorted(_config_items(c).items())),
            f"derived         = suspicion min {low:g} s, max {high:g} s, k={k}; retransmit "
            f"limit {c.retransmit_limit(n)}; push/pull every {c.push_pull_period(n):g} s",
            f"base link       = delay {d.kind}(low={d.low:g}, mean={d.mean:g}, high={d.high:g})",
            f"safety link     = loss={s.loss:g} dup={s.duplicate:g} reorder={s.reorder:g} "
            f"(reorder delay {s.reorder_delay:g} s)",
            f"faults          = {len(self.faults)}",
        ]
        lines += [f"  {e.describe()}" for e in self.faults]
        return "\n".join(lines)


def _config_items(c: Config) -> dict[str, object]:
    return {f: getattr(c, f) for f in c.__dataclass_fields__}


def derive(
    seed: int,
    nodes: int,
    duration: float,
    scenario: str,
    *,
    preset: str = "lan",
    bootstrap: str = "join",
    overrides: dict[str, object] | None = None,
) -> RunConfig:
    """The run configuration of ``scenario`` for this seed (deterministic)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if nodes < 1:
        raise ValueError("nodes must be >= 1")
    make, link = PRESETS[preset]
    swim = make(**(overrides or {}))
    from .rng import Streams

    rng = Streams(seed)(f"scenario.{scenario}")
    stagger = 0.05 if nodes <= 200 else 10.0 / nodes
    warmup = (nodes * stagger if bootstrap == "join" else 0.0) + 2.0
    start_link, faults = SCENARIOS[scenario](rng, nodes, warmup, max(duration, warmup), link)
    return RunConfig(
        seed=seed,
        nodes=nodes,
        duration=duration,
        scenario=scenario,
        preset=preset,
        bootstrap=bootstrap,
        swim=swim,
        link=link,
        start_link=start_link,
        faults=tuple(sorted(faults, key=lambda e: (e.time, e.action, e.node))),
        stagger=stagger,
    )


Generator = Callable[[random.Random, int, float, float, LinkModel], tuple[LinkModel, list]]


def _steady(rng, n, t0, t1, link):
    return link, []


def _lossy_link(rng: random.Random, link: LinkModel) -> LinkModel:
    return LinkModel(
        link.delay,
        loss=rng.choice([0.01, 0.02, 0.05, 0.1]),
        duplicate=rng.choice([0.0, 0.01, 0.05]),
        reorder=rng.choice([0.0, 0.05]),
        reorder_delay=0.05,
    )


def _lossy(rng, n, t0, t1, link):
    return _lossy_link(rng, link), []


def _groups(rng: random.Random, n: int, kind: str) -> tuple[tuple[int, ...], ...]:
    order = list(range(n))
    rng.shuffle(order)
    if kind == "isolate":
        return ((order[0],), tuple(sorted(order[1:])))
    if kind == "random" and n >= 3:
        cut = sorted(rng.sample(range(1, n), 2))
        parts = (order[: cut[0]], order[cut[0] : cut[1]], order[cut[1] :])
        return tuple(tuple(sorted(p)) for p in parts if p)
    half = max(1, n // 2)
    return (tuple(sorted(order[:half])), tuple(sorted(order[half:])))


def _partition_events(rng, n, start, end, tag) -> list[FaultEvent]:
    if n < 2:
        return []
    kind = rng.choice(["halves", "isolate", "asymmetric", "random"])
    groups = _groups(rng, n, "halves" if kind == "asymmetric" else kind)
    return [
        FaultEvent(start, "partition", groups=groups, symmetric=kind != "asymmetric", tag=tag),
        FaultEvent(end, "heal", tag=tag),
    ]


def _partition(rng, n, t0, t1, link):
    span = t1 - t0
    start = t0 + span * rng.uniform(0.1, 0.3)
    end = t0 + span * rng.uniform(0.6, 0.85)
    return link, _partition_events(rng, n, start, end, "p1")


def _crash(rng, n, t0, t1, link):
    span = t1 - t0
    victims = rng.sample(range(n), max(1, n // 5)) if n > 1 else []
    events = []
    for i, v in enumerate(victims):
        at = t0 + span * rng.uniform(0.05, 0.5)
        events.append(FaultEvent(at, "crash", node=v))
        if i % 2 == 1:
            events.append(FaultEvent(at + span * rng.uniform(0.1, 0.4), "restart", node=v))
    return link, events


def _clog_lag(rng: random.Random) -> Delay:
    low = rng.choice([0.5, 1.0, 2.0, 4.0])
    return Delay("uniform", low, 1.5 * low, 2 * low)


def _clog(rng, n, t0, t1, link):
    span = t1 - t0
    events = []
    for v in rng.sample(range(n), max(1, n // 10)):
        start = t0 + span * rng.uniform(0.05, 0.3)
        events.append(FaultEvent(start, "clog", node=v, lag=_clog_lag(rng)))
        events.append(FaultEvent(start + span * rng.uniform(0.2, 0.6), "unclog", node=v))
    return link, events


def _chaos(rng, n, t0, t1, link):
    """A random walk of faults, one every ~8 s, keeping at least half the nodes up."""
    events: list[FaultEvent] = []
    down: dict[int, None] = {}
    t = t0
    np = 0
    partitioned_until = t0
    while True:
        t += rng.expovariate(1 / 8.0)
        if t >= t1:
            break
        kind = rng.choice(["crash", "restart", "partition", "clog", "loss", "loss"])
        if kind == "crash" and n > 2 and len(down) < n // 2:
            v = rng.choice([i for i in range(n) if i not in down])
            down[v] = None
            events.append(FaultEvent(t, "crash", node=v))
        elif kind == "restart" and down:
            v = rng.choice(sorted(down))
            del down[v]
            events.append(FaultEvent(t, "restart", node=v))
        elif kind == "partition" and t >= partitioned_until and n >= 2:
            np += 1
            end = min(t1, t + rng.uniform(5.0, 40.0))
            events += _partition_events(rng, n, t, end, f"p{np}")
            partitioned_until = end
        elif kind == "clog":
            v = rng.randrange(n)
            events.append(FaultEvent(t, "clog", node=v, lag=_clog_lag(rng)))
            events.append(FaultEvent(min(t1, t + rng.uniform(5.0, 30.0)), "unclog", node=v))
        elif kind == "loss":
            events.append(FaultEvent(t, "link", link=_lossy_link(rng, link)))
            events.append(FaultEvent(min(t1, t + rng.uniform(5.0, 20.0)), "link", link=link))
    return link, events


SCENARIOS: dict[str, Generator] = {
    "steady": _steady,
    "lossy": _lossy,
    "partition": _partition,
    "crash": _crash,
    "clog": _clog,
    "chaos": _chaos,
}
