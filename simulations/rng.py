"""Seeded randomness with named sub-streams.

A run has one seed. Every subsystem draws from its own ``random.Random`` derived from the seed and
a stable name (``"net.loss"``, ``"node3.boot1.swim"``, ``"faults"``), so extra draws in one
subsystem never shift another: adding a fault does not change which packets the network drops
before it, and a node restarted with a new RNG does not perturb its neighbours. Derivation hashes
the seed and the name with BLAKE2b, so it does not depend on ``PYTHONHASHSEED`` or on the order
in which streams are first used.
"""

from __future__ import annotations

import hashlib
import random

__all__ = ["Streams", "derive_seed"]


def derive_seed(seed: int, name: str) -> int:
    """A 64-bit seed for the sub-stream ``name`` of the run seeded with ``seed``."""
    h = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


class Streams:
    """The run's random sub-streams, created on first use and cached by name."""

    __slots__ = ("_streams", "seed")

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def __call__(self, name: str) -> random.Random:
        """The sub-stream ``name`` (the same object on every call)."""
        rng = self._streams.get(name)
        if rng is None:
            rng = random.Random(derive_seed(self.seed, name))
            self._streams[name] = rng
        return rng

    def fresh(self, name: str) -> random.Random:
        """A new generator for ``name``, not cached (for a core rebuilt at each boot)."""
        return random.Random(derive_seed(self.seed, name))
