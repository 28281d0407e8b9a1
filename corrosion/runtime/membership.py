"""The bridge from SWIM membership to replication: member events become replication peers
(``Replicator.member_event``, the same call the simulator makes), members are remembered in
the database for the next start, and the join loop finds the cluster again.
"""

from __future__ import annotations

from typing import Any

import anyio

import swim

from ..addresses import Address, format_addr
from ..config import parse_addr
from ..core.replication import Replicator, decode_meta, peer_address
from ..core.store import Store
from .activity import GossipWarnings, log_member_event
from .results import MemberInfo
from .spans import AgentSpans

REMEMBERED_SEEDS = 20  # members from the last run tried as seeds, besides the configured ones


class Membership:
    """One agent's view of the cluster, on its event loop."""

    def __init__(
        self,
        node: swim.SwimNode,
        replicator: Replicator,
        store: Store,
        db_lock: anyio.Lock,
        gossip_warnings: GossipWarnings,
        spans: AgentSpans | None = None,
    ) -> None:
        self.node = node
        self._replicator = replicator
        self._store = store
        self._db_lock = db_lock
        self._gossip_warnings = gossip_warnings
        self._spans = spans

    async def follow(self, events: Any) -> None:
        """Log each SWIM event, give it to the replicator, remember the members it changed."""
        async with events:
            async for ev in events:
                log_member_event(ev, _describe_member)
                if self._spans is not None:
                    self._spans.member_event(ev, _describe_member)
                for m in self._replicator.member_event(ev):
                    await self._remember(m)

    async def _remember(self, m: swim.Member) -> None:
        info = decode_meta(m.meta)
        if info is None:
            return
        store = self._store
        async with self._db_lock:
            await anyio.to_thread.run_sync(
                store.save_member, info[0], format_addr(m.addr), m.state.name, m.meta
            )

    async def join(self, bootstrap: list[Address], closing: anyio.Event) -> None:
        """Join through the configured seeds and the members remembered from the last run;
        retry with backoff until someone answers, there is no one to ask, or ``closing``."""
        seeds = list(bootstrap)
        async with self._db_lock:
            remembered = await anyio.to_thread.run_sync(self._store.load_members)
        own = self.node.address
        for _actor, address, _state, _meta in remembered[:REMEMBERED_SEEDS]:
            try:
                addr = parse_addr(address, "member")
            except ValueError:
                continue
            if addr not in seeds and addr != own:
                seeds.append(addr)
        seeds = [s for s in seeds if s != own]
        if not seeds:
            return
        delay = 0.5
        attempts = 0
        while not closing.is_set():
            try:
                joined = await self.node.join(seeds, timeout=5)
            except OSError:  # a seed unreachable right now: retried below
                joined = 0
            if joined:
                return
            attempts += 1
            self._gossip_warnings.join_unanswered([format_addr(s) for s in seeds], attempts)
            with anyio.move_on_after(delay):
                await closing.wait()
            delay = min(delay * 2, 30)

    def members(self, actor: bytes, peer_addr: Address) -> list[MemberInfo]:
        """This node first (``is_self``), then every member it knows, with its SWIM state."""
        node, core = self.node, self.node.core
        out = [
            MemberInfo(
                actor.hex(),
                format_addr(node.address),
                format_addr(peer_addr),
                "left" if core.leaving else "alive",
                core.incarnation,
                is_self=True,
            )
        ]
        for m in sorted(node.all_members(), key=lambda m: m.addr):
            info = decode_meta(m.meta)
            out.append(
                MemberInfo(
                    info[0].hex() if info else "",
                    format_addr(m.addr),
                    format_addr(peer_address(m.addr, info[1])) if info else None,
                    m.state.name.lower(),
                    m.incarnation,
                )
            )
        return out

    def alive(self) -> int:
        return sum(1 for m in self.node.members() if m.state == swim.State.ALIVE)


def _describe_member(m: swim.Member) -> tuple[str, str]:
    info = decode_meta(m.meta)
    return (info[0].hex() if info else "", format_addr(m.addr))
