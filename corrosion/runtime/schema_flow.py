"""The cluster schema on a running agent (``corrosion.core.cluster_schema`` has the rules).

What this adds to the core: start-up (follow the versions this node runs, or its files), the
proposal of a schema (``corrosion schema apply``, ``corrosion reload``) and the wait for the
cluster's answer, what the apply loop installs when versions arrive, drift between this node's
files and the cluster schema, and the version each member advertises in its SWIM metadata
(``encode_meta``), which ``cluster members`` shows and a proposer waits on.

Threads: like the rest of the runtime, database work runs in a worker thread under the
runtime's ``db_lock``; ``ClusterSchemaStatus`` and everything here belong to the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import anyio

import swim
from crdt.errors import DestructiveChangeRefused, SchemaError
from crdt.schema import load_schema_paths

from ..core.cluster_schema import (
    Advance,
    ClusterSchemaStatus,
    ProposalRefused,
    SchemaVersion,
    normalize,
    schema_hash,
)
from ..core.replication import decode_meta, decode_schema, encode_meta
from ..core.store import ApplyResult, SchemaProposal
from ..errors import CorrosionError
from .schema_errors import for_operator

DESTRUCTIVE_REMEDY = (
    "this loses data, so it is refused unless allowed: `corrosion schema apply "
    "--allow-destructive` (or `corrosion reload --allow-destructive`)"
)

log = logging.getLogger("corrosion.schema")


class SchemaConflict(CorrosionError):
    """A concurrent proposal won the version this node proposed: its proposal is ignored."""


class SchemaFlow:
    def __init__(self, rt: Any) -> None:
        self.rt = rt  # the AgentRuntime that owns this (not imported: it imports this module)
        self.follow = rt.config.db.schema_source == "cluster"
        self.status = ClusterSchemaStatus(log, follow=self.follow)

    # -- start-up ----------------------------------------------------------------------------

    def extra_schema(self) -> str:
        """Schema this node adds to every version: its extensions' (node-local needs)."""
        return "\n;\n".join(ext.schema for ext in self.rt.extensions if ext.schema)

    async def open(self, allow_destructive: bool) -> None:
        """At start-up: a node that runs a cluster version follows the cluster (its files only
        compared); any other applies its files, as without a cluster schema."""
        rt = self.rt
        store = rt.store
        assert store is not None
        await anyio.to_thread.run_sync(store.set_schema_source, self.follow, self.extra_schema())
        state = await anyio.to_thread.run_sync(store.schema_state)
        cfg = rt.config
        if self.follow and state.running.version > 0:
            adv, kept, pending = await anyio.to_thread.run_sync(store.follow_schema)
            self.installed(adv, kept)
            rt.pending_schema.install(pending)
        elif cfg.db.schema_paths or any(ext.schema for ext in rt.extensions):
            await rt._apply_schema_files(cfg.db.schema_paths, allow_destructive)
            adv, kept, pending = await anyio.to_thread.run_sync(store.follow_schema)
            self.installed(adv, kept)
        else:
            rt.pending_schema.install(await anyio.to_thread.run_sync(store.pending_summary))
            self.installed(state, ApplyResult())
        self.check_drift(cfg.db.schema_paths)

    def check_drift(self, paths: Sequence[os.PathLike[str] | str]) -> None:
        """Say (WARNING, health) whether this node's files disagree with the cluster schema it
        follows (cluster) or the cluster's latest version (files)."""
        status = self.status
        target = status.running.hash if self.follow else (status.head.hash if status.head else "")
        if not paths or not target:
            status.set_drift(None)
            return
        try:
            text = load_schema_paths(list(paths))
        except (OSError, SchemaError) as exc:
            status.set_drift(f"the schema files cannot be read: {exc}")
            return
        if schema_hash(normalize(text)) == target:
            status.set_drift(None)
        elif self.follow:
            status.set_drift(
                f"the schema files differ from cluster schema version {status.running.version}, "
                "which this node runs (db.schema_source = 'cluster'); `corrosion reload` "
                "proposes the files as the next version"
            )
        else:
            assert status.head is not None
            status.set_drift(
                f"the schema files differ from cluster schema version {status.head.version} "
                "(db.schema_source = 'files': this node follows its files)"
            )

    # -- installing ----------------------------------------------------------------------------

    def installed(self, adv: Advance, kept: ApplyResult | None) -> None:
        """Install what following the versions did (on the loop, in commit order)."""
        rt = self.rt
        before = self.status.running
        self.status.install(adv)
        if kept is not None and (kept.applied or kept.emptied):
            rt.pending_schema.applied(len(kept.applied) + kept.emptied)
            rt.events.applied_versions += len(kept.applied) + kept.emptied
        if kept is not None and kept.changes:
            rt._changed(kept.changes)
        if adv.changes:
            rt.subscriptions.rerun_all()
        if self.status.running != before:
            self.advertise()

    def apply_result(self, result: ApplyResult) -> None:
        """An apply transaction brought schema versions (``ApplyResult.schema``)."""
        assert result.schema is not None
        self.installed(result.schema, result.kept_applied)
        if result.pending is not None:
            self.rt.pending_schema.install(result.pending)
        self.check_drift(self.rt.config.db.schema_paths)  # the version run, or the latest

    def meta(self) -> bytes:
        rt = self.rt
        running = self.status.running
        schema = (running.version, running.hash) if running.version else None
        return encode_meta(rt.actor_id, 0, rt.config.gossip.cluster_id, schema)

    def advertise(self) -> None:
        rt = self.rt
        if rt.swim is not None and rt._tg is not None:
            rt._tg.start_soon(rt.swim.set_meta, self.meta())

    # -- proposing -------------------------------------------------------------------------

    async def propose(
        self,
        sql: str,
        *,
        allow_destructive: bool = False,
        wait: float = 0.0,
        files: Sequence[os.PathLike[str] | str] | None = None,
        remedy: str | None = DESTRUCTIVE_REMEDY,
    ) -> dict[str, Any]:
        """Write ``sql`` as the cluster's next schema version and apply it here; then wait up
        to ``wait`` seconds for every member (but those that left) to run it. Raises
        ``ProposalRefused`` or ``SchemaError`` (nothing written), ``SchemaConflict`` (a
        concurrent proposal won).
        ``files``: the schema files to compare with the result (default ``db.schema_paths``);
        ``remedy``: what a refused destructive change says to do (None: the bare error)."""
        rt = self.rt
        store, rep = rt.store, rt.replicator
        assert store is not None and rep is not None
        ts = rep.hlc.now()
        async with rt.db_lock:
            with anyio.CancelScope(shield=True):  # booked before the lock is free
                if self.status.blocked is not None:  # fixed since? try the versions again
                    adv, kept, pending = await anyio.to_thread.run_sync(store.follow_schema)
                    self.installed(adv, kept)
                    rt.pending_schema.install(pending)
                try:
                    done: SchemaProposal = await anyio.to_thread.run_sync(
                        lambda: store.propose_schema(sql, ts, allow_destructive=allow_destructive)
                    )
                except SchemaError as exc:
                    if isinstance(exc, DestructiveChangeRefused) and remedy is not None:
                        raise ProposalRefused(f"{exc.what}; {remedy}") from None
                    raise
                effects = rep.install_commit(done.commit, rt._now())
                state = await anyio.to_thread.run_sync(store.schema_state)
                self.installed(state, done.applied)
                rt.pending_schema.install(done.pending)
        rt._perform(effects)
        rt.not_in_schema = list(done.proposal.unlisted)
        for table in rt.not_in_schema:
            log.warning(
                "table %s is in the database but not in the schema: left alone "
                "(--allow-destructive drops it)",
                table,
            )
        for change in done.proposal.changes:
            log.info("schema applied: %s", change, extra={"fields": {"change": change}})
        mine = done.proposal.version
        if done.proposal.new:
            log.info("proposed cluster schema %s", mine.describe())
        self.check_drift(rt.config.db.schema_paths if files is None else files)
        unconfirmed = await self._confirm(mine, wait)
        return {
            **mine.to_json(),
            "new": done.proposal.new,
            "changes": list(done.proposal.changes),
            "not_in_schema": list(done.proposal.unlisted),
            "kept_applied": len(done.applied.applied) + done.applied.emptied,
            "unconfirmed": unconfirmed,
            "pending_schema": rt.pending_schema.to_json(),
        }

    async def _confirm(self, mine: SchemaVersion, wait: float) -> list[str]:
        """Wait until every member (but those that left) runs ``mine`` (or a later version on
        top of it); the actor ids of those that do not yet when ``wait`` runs out.
        ``SchemaConflict`` as soon as a concurrent proposal is seen to win."""
        with anyio.move_on_after(wait):
            while True:
                self._check_lost(mine)
                missing = self._unconfirmed(mine)
                if not missing:
                    return []
                await anyio.sleep(0.1)
        self._check_lost(mine)
        return self._unconfirmed(mine)

    def _check_lost(self, mine: SchemaVersion) -> None:
        status = self.status
        winner = status.at(mine.version)
        if winner is None or winner.hash == mine.hash:
            return
        raise SchemaConflict(
            f"schema version {mine.version} went to a concurrent proposal: {winner.describe()} "
            f"won (earliest proposal first, then lowest actor id), and this proposal "
            f"({mine.hash[:12]}) is ignored by every node. This node now runs version "
            f"{status.running.version}; re-base the schema on it (`corrosion schema show`) and "
            "apply again"
        )

    def _unconfirmed(self, mine: SchemaVersion) -> list[str]:
        rt = self.rt
        assert rt.swim is not None
        out = []
        for m in sorted(rt.swim.all_members(), key=lambda m: m.addr):
            if m.state == swim.State.LEFT:
                continue  # a member down or cut off is waited for: it may hold a rival
            info, runs = decode_meta(m.meta), decode_schema(m.meta)
            if info is None or info[2] != rt.config.gossip.cluster_id:
                continue
            ok = runs is not None and (
                runs == (mine.version, mine.hash)
                or (runs[0] > mine.version and self.status.at(mine.version) is not None)
            )
            if not ok:
                out.append(info[0].hex())
        return out

    async def reload_files(
        self, paths: Sequence[os.PathLike[str] | str], allow_destructive: bool
    ) -> list[str]:
        """``corrosion reload`` with ``db.schema_source = "cluster"``: the files become the
        cluster's next version (unless they are its current one)."""
        rt = self.rt
        sql = load_schema_paths(list(paths))
        if not normalize(sql):
            return await rt._apply_schema_files(paths, allow_destructive)  # no files: local
        try:
            result = await self.propose(
                sql, allow_destructive=allow_destructive, files=paths, remedy=None
            )
        except SchemaError as exc:  # name the file at fault, and reload's flag
            raise for_operator(exc, paths) from None
        except ProposalRefused as exc:  # said as reload's other refusals are
            raise SchemaError(str(exc)) from None
        done = list(result["changes"])
        if not done:
            log.info("schema unchanged (%s)", ", ".join(map(str, paths)))
        if result["kept_applied"]:
            done.append(
                f"applied {result['kept_applied']} kept versions that waited for this schema"
            )
        return done
