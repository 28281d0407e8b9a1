"""Identifiers: ULIDs for runs and instances, short hex ids and nonces for machines and leases.

Every id comes from an injected clock and ``random.Random``, so a seeded simulation produces the
same ids on every run. ULIDs sort by creation time; within one millisecond the factory increments
the random part, so ids from one factory are strictly increasing.
"""

from __future__ import annotations

import random
import re

from .clock import Clock

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MACHINE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class IdFactory:
    """Makes run ids, instance ids, machine ids and lease nonces."""

    def __init__(self, clock: Clock, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng if rng is not None else random.SystemRandom()
        self._last_ms = -1
        self._last_rand = 0

    def ulid(self) -> str:
        """A 26-character ULID, strictly greater than the previous one from this factory."""
        ms = max(int(self._clock.now() * 1000), self._last_ms)
        if ms == self._last_ms:
            rand = (self._last_rand + 1) & ((1 << 80) - 1)
        else:
            rand = self._rng.getrandbits(80)
        self._last_ms, self._last_rand = ms, rand
        return _encode(ms, 10) + _encode(rand, 16)

    def machine_id(self) -> str:
        """14 lowercase hex characters, the shape of Fly machine ids."""
        return f"{self._rng.getrandbits(56):014x}"

    def nonce(self) -> str:
        return f"{self._rng.getrandbits(128):032x}"


def check_machine_id(machine_id: str) -> str:
    """Machine ids name files on disk: refuse anything that is not a plain short token."""
    if not isinstance(machine_id, str) or not MACHINE_ID_RE.match(machine_id):
        raise ValueError(
            f"invalid machine id {machine_id!r}: expected 1-64 characters of [a-z0-9_-], "
            "starting with a letter or digit"
        )
    return machine_id
