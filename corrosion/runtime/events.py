"""What tests and the health numbers read of a running agent (``AgentEvents``), and the fault a
test can set on it (``Faults``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import swim

from .telemetry import SyncTelemetry


@dataclass
class AgentEvents:
    """Counters a test or the health endpoint can read."""

    applied_versions: int = 0
    peer_stream_errors: int = 0
    frames_dropped: int = 0
    peer_streams_unauthenticated: int = 0  # cut: no gossip key opened their frames
    peer_tls_failures: int = 0  # peer streams whose TLS handshake failed (either side)
    # changes (rows of changesets) received and sent in sync sessions, received by broadcast
    sync_changes_recv: int = 0
    sync_changes_sent: int = 0
    broadcast_changes_recv: int = 0
    sync: SyncTelemetry = field(default_factory=SyncTelemetry)  # sessions' durations and sizes


class Faults:
    """Test hook: ``isolated`` cuts this node off, as a network partition would: peer traffic
    (broadcast and sync) both ways, and its SWIM datagrams and streams, so the others mark it
    down and the two sides must find each other again after the heal."""

    def __init__(self) -> None:
        self._isolated = False
        self.swim: swim.SwimNode | None = None

    @property
    def isolated(self) -> bool:
        return self._isolated

    @isolated.setter
    def isolated(self, value: bool) -> None:
        self._isolated = value
        if self.swim is not None:
            self.swim.isolated = value
