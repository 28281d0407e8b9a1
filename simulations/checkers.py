"""The checker interface: how invariants watch a world.

A checker subscribes to what it needs in :meth:`Checker.attach` - the world's ``send_hooks``
(every datagram, with its fate), ``event_hooks`` (every notification a core publishes),
``lifecycle_hooks`` (boot, crash) and periodic audits (``world.every``) - and records violations
with ``world.fail(name, message)``. :meth:`Checker.check` runs at the end of a phase
(``final=False`` after a step, ``True`` at the end of the run).

*Liveness* checkers also say, through :meth:`Checker.settled`, whether the property they
wait for holds yet ("all live views are equal"); :func:`run_liveness` heals the world and runs
it until every liveness checker is settled or a deadline passes, VOPR style. A new protocol adds
its own checkers the same way: the CRDT convergence checker (``simulations.crdt_checks``) only
needs a way to read each node's database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .network import LinkModel
    from .world import World

__all__ = ["Checker", "run_liveness"]


class Checker:
    """Base class: a named invariant over a world."""

    name = "checker"
    liveness = False
    """True for checkers whose property only holds after a heal and a quiet period."""

    def attach(self, world: World) -> None:
        """Subscribe to the world's hooks."""

    def check(self, world: World, final: bool) -> None:
        """Record violations with ``world.fail``; ``final`` at the end of the run."""

    def settled(self, world: World) -> bool:
        """(Liveness checkers) whether the awaited property holds now."""
        return True

    def deadline(self, world: World) -> float:
        """(Liveness checkers) the longest quiet period after which the property must hold."""
        return 0.0


class SettlingChecker(Checker):
    """A liveness property stated as a list of ``problems``: settled when it is empty, and what
    is left ``deadline`` seconds after the heal is reported as violations."""

    liveness = True

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def problems(self, world: World) -> list[str]:
        raise NotImplementedError

    def settled(self, world: World) -> bool:
        return not self.problems(world)

    def deadline(self, world: World) -> float:
        return self._deadline

    def check(self, world: World, final: bool) -> None:
        if not final or world.liveness is None:
            return
        start, end, _ = world.liveness
        for p in self.problems(world):
            world.fail(self.name, f"{p} ({end - start:.1f}s after heal)")


def run_liveness(
    world: World, *, link: LinkModel | None = None, timeout: float | None = None, step: float = 1.0
) -> float:
    """Heal every fault (``link`` replaces the default link model), then run until every
    liveness checker is settled or ``timeout`` (default: the largest checker deadline) passes.
    Returns the virtual seconds it took. The caller then runs ``world.check(final=True)``."""
    world.heal_all(link)
    start = world.now
    lively = [c for c in world.checkers if c.liveness]
    if timeout is None:
        timeout = max([c.deadline(world) for c in lively] + [0.0])
    ok = world.run_until_true(lambda: all(c.settled(world) for c in lively), timeout, step)
    world.liveness = (start, world.now, ok)
    return world.now - start
