"""AES-GCM keyring: the primary key encrypts, every installed key decrypts.

Rotation without downtime, as memberlist does it: install the new key on every member
(:meth:`Keyring.add`), then make it primary everywhere (:meth:`Keyring.use`), then remove the old
one (:meth:`Keyring.remove`). At each step every member can still read every other member.

Sealed layout: ``nonce (12 B) | ciphertext | tag (16 B)``; the caller's header (version and
cluster label) is the associated data, so a label cannot be swapped. Nonces are 96 random bits
per message. They come from ``nonce_source`` (``os.urandom`` by default): a simulator that needs
byte-identical traces can inject a seeded source, never reused across real keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["NONCE_SIZE", "OVERHEAD", "TAG_SIZE", "Keyring"]

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
_KEY_SIZES = (16, 24, 32)


class Keyring:
    """Keys for AES-GCM; 32-byte keys (AES-256) are the recommended size."""

    __slots__ = ("_ciphers", "_keys", "_nonce")

    def __init__(
        self, keys: Iterable[bytes], *, nonce_source: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._keys: list[bytes] = []
        self._ciphers: list[AESGCM] = []
        self._nonce = nonce_source
        for key in keys:
            self.add(key)
        if not self._keys:
            raise ValueError("a keyring needs at least one key")

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    @property
    def keys(self) -> list[bytes]:
        """Installed keys, primary first."""
        return list(self._keys)

    def add(self, key: bytes) -> None:
        """Install ``key`` for decryption (a new keyring's first key becomes primary)."""
        key = bytes(key)
        if len(key) not in _KEY_SIZES:
            raise ValueError(f"an AES key must be 16, 24 or 32 bytes, got {len(key)}")
        if key not in self._keys:
            self._keys.append(key)
            self._ciphers.append(AESGCM(key))

    def use(self, key: bytes) -> None:
        """Make an installed ``key`` the primary (encrypting) key."""
        i = self._index(key)
        self._keys.insert(0, self._keys.pop(i))
        self._ciphers.insert(0, self._ciphers.pop(i))

    def remove(self, key: bytes) -> None:
        """Uninstall ``key``; the primary key cannot be removed (make another primary first)."""
        i = self._index(key)
        if i == 0:
            raise ValueError("cannot remove the primary key; use() another key first")
        del self._keys[i]
        del self._ciphers[i]

    def _index(self, key: bytes) -> int:
        try:
            return self._keys.index(bytes(key))
        except ValueError:
            raise ValueError("key is not installed in this keyring") from None

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = self._nonce(NONCE_SIZE)
        return nonce + self._ciphers[0].encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None when no installed key authenticates ``sealed``."""
        if len(sealed) < OVERHEAD:
            return None
        nonce, body = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:]
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        return None
