"""Building worlds of SWIM members: the common case for tests, scenarios and benches."""

from __future__ import annotations

from collections.abc import Sequence

from swim import Config, Member, NodeId, State

from .checkers import Checker
from .network import LinkModel
from .node import CoreSpec, SimNode
from .swim_checkers import swim_checkers
from .swim_core import SWIM, SwimCore, swim
from .world import World

__all__ = ["SEEDS_PER_NODE", "add_swim_node", "swim_world", "warm_start"]

SEEDS_PER_NODE = 3
"""A node's bootstrap list: the first three nodes (its durable configuration)."""


def add_swim_node(
    world: World,
    config: Config,
    *,
    start: bool = True,
    extra: Sequence[CoreSpec] = (),
    seeds: Sequence | None = None,
    preload: Sequence[Member] = (),
) -> SimNode:
    """Add a node hosting a swim core (plus ``extra`` cores) that joins the first nodes."""
    index = len(world.nodes)
    if seeds is None:  # the first nodes, itself excluded (a node's durable bootstrap list)
        seeds = [world.address(i) for i in range(SEEDS_PER_NODE + 1) if i != index]
        seeds = seeds[:SEEDS_PER_NODE]
    return world.add_node([swim(config, seeds, preload=preload), *extra], start=start)


def swim_world(
    seed: int,
    n: int,
    *,
    config: Config | None = None,
    link: LinkModel | None = None,
    bootstrap: str = "join",
    stagger: float = 0.05,
    checkers: bool | Sequence[Checker] = True,
    extra: Sequence[CoreSpec] = (),
    files: bool = False,
) -> World:
    """A world of ``n`` swim members.

    ``bootstrap="join"``: node i boots at ``i * stagger`` seconds and joins through the first
    three other nodes (real join streams and gossip; seeds not up yet fail and are retried
    while the node is alone). ``"warm"``: every node boots at 0 already knowing
    every other as ALIVE (``Membership.restore``), the steady state without the join storm.
    ``checkers``: True for every SWIM checker, or a list.
    """
    if bootstrap not in ("join", "warm"):
        raise ValueError(f"bootstrap must be 'join' or 'warm', got {bootstrap!r}")
    config = config or Config.lan()
    world = World(seed, link=link, files=files)
    if checkers is True:
        checkers = swim_checkers()
    for c in checkers or ():
        world.add_checker(c)
    if bootstrap == "join":
        for i in range(n):
            node = add_swim_node(world, config, start=False, extra=extra)
            world.at(i * stagger, world.start, node)
    else:
        # Every first boot has generation 1 and incarnation 0, so the view is known up front.
        view = [Member(NodeId(*world.address(i), 1), 0, State.ALIVE) for i in range(n)]
        seeds = [world.address(i) for i in range(min(SEEDS_PER_NODE, n))]
        nodes = [
            add_swim_node(world, config, start=False, extra=extra, seeds=seeds, preload=view)
            for _ in range(n)
        ]
        for node in nodes:
            world.start(node)
    return world


def warm_start(world: World, nodes: Sequence[SimNode]) -> None:
    """Tell every node of ``nodes`` about every other, ALIVE at its current identity."""
    members = [
        Member(core.identity, core.membership.incarnation, State.ALIVE, core.membership.meta)
        for node in nodes
        if (core := node.core_of(SWIM, SwimCore)) is not None
    ]
    for node in nodes:
        core = node.core_of(SWIM, SwimCore)
        if core is not None:
            core.restore([m for m in members if m.addr != node.addr], world.now)
