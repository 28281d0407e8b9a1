"""Shared pytest configuration.

One hypothesis profile, the same locally and in CI: every property test states its own example
count (``SOAK=n`` multiplies the crdt differential tests' for a long run). No deadline: the
machines are shared and noisy, and a test must not fail because one example ran slowly. The
generic helpers are in tests/support (importable as ``support``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "corrosion",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("corrosion")


def _accepted_nodelay(peer: tuple[str, int]) -> bool | None:
    """TCP_NODELAY of the socket this process accepted from ``peer`` (a client's local address),
    read from the socket itself through a duplicate of its descriptor; None until accepted."""
    import socket

    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:  # closed meanwhile (the directory listing's own descriptor)
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            continue
        with sock:
            try:
                if sock.getpeername()[:2] != tuple(peer[:2]):
                    continue
                return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            except OSError:  # not connected, or not TCP
                continue
    return None


@pytest.fixture
def accepted_nodelay():
    """``accepted_nodelay(client_local_address)``: whether the server side of a connection made
    to a listener in this process has TCP_NODELAY (None if it was not accepted yet)."""
    return _accepted_nodelay


@pytest.fixture
def otlp_receiver():
    """A running OTLP/HTTP trace receiver on loopback (``support.otlp_receiver``)."""
    from support.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as receiver:
        yield receiver
