"""Running health checks: each started machine's ``config.checks`` on the worker that owns it,
their results in the machine document (so GET shows them and the publisher replicates them).

While a machine is ``started``, each of its checks runs on its own task: nothing before
``grace_period`` (results read ``warning`` until then), then one probe every ``interval``
(counted from the start of the previous probe), each bounded by ``timeout``. A result is written
to the document only when its status or output changes, so ``updated_at`` is when it last
changed (as Fly's ``fly checks list`` shows it) and an unchanged check costs no write and no
replication. A status change is logged at INFO on ``orchestrator.health``. The checks stop when
the machine leaves ``started`` (their results are then cleared); a worker that restarts picks up
every started machine again and keeps the results of the same boot.

Time is the injected clock's (grace, interval and timeout alike) and the probe is injected, so
the scheduler runs on virtual time in tests.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from . import machine as m
from .checks import CRITICAL, WARNING, CheckSpec, Probe, specs
from .clock import Clock, wait_until
from .documents import Documents
from .errors import NotFoundError
from .tracing import detached

log = logging.getLogger(__name__)


def _boot(doc: Mapping[str, Any]) -> list[Any]:
    return [doc["instance_id"], doc.get("boot")]


@dataclass
class _Run:
    """The checks of one boot of one machine."""

    boot: list[Any]
    scope: anyio.CancelScope
    results: dict[str, dict[str, Any]]


class HealthChecks:
    """The checks of one running service, on tasks in its task group. ``sync(machine_id)``
    after every change of a machine's document starts, keeps or stops its checks."""

    def __init__(
        self, docs: Documents, clock: Clock, tg: anyio.abc.TaskGroup, probe: Probe
    ) -> None:
        self._docs = docs
        self._clock = clock
        self._tg = tg
        self._probe = probe
        self._runs: dict[str, _Run] = {}
        self._clearing: set[str] = set()

    def running(self, machine_id: str) -> bool:
        return machine_id in self._runs

    def sync(self, machine_id: str) -> None:
        doc = self._docs.find(machine_id)
        wanted = doc is not None and doc["state"] == m.STARTED and bool(specs(doc["config"]))
        run = self._runs.get(machine_id)
        if run is not None:
            if wanted and doc is not None and run.boot == _boot(doc):
                return
            run.scope.cancel()
            del self._runs[machine_id]
        if wanted and doc is not None:
            self._start(machine_id, doc)
        elif (
            doc is not None
            and doc.get("checks")
            and doc["state"] != m.STARTED
            and machine_id not in self._clearing
        ):
            self._clearing.add(machine_id)
            self._tg.start_soon(
                detached, self._clear, machine_id, name=f"checks-clear:{machine_id}"
            )

    def _start(self, machine_id: str, doc: Mapping[str, Any]) -> None:
        checks = specs(doc["config"])
        boot = _boot(doc)
        # the results of this boot survive a worker restart; a new boot starts from "warning"
        kept = (
            {c["name"]: c for c in doc.get("checks") or []}
            if doc.get("checks_boot") == boot
            else {}
        )
        now = self._clock.now()
        results = {
            s.name: kept.get(s.name)
            or {"name": s.name, "status": WARNING, "output": _waiting(s), "updated_at": m.iso(now)}
            for s in checks
        }
        run = _Run(boot, anyio.CancelScope(), results)
        self._runs[machine_id] = run
        # the checks outlive the run that started the machine: their changes trace on their own
        self._tg.start_soon(
            detached, self._run, machine_id, run, checks, now, name=f"checks:{machine_id}"
        )

    async def _run(self, machine_id: str, run: _Run, checks: list[CheckSpec], since: float) -> None:
        with run.scope:
            await self._write(machine_id, run)
            async with anyio.create_task_group() as tg:
                for spec in checks:
                    tg.start_soon(self._loop, machine_id, run, spec, since)

    async def _loop(self, machine_id: str, run: _Run, spec: CheckSpec, since: float) -> None:
        if run.results[spec.name]["status"] == WARNING:  # not run yet in this boot
            await self._clock.sleep(since + spec.grace_period - self._clock.now())
        while True:
            began = self._clock.now()
            doc = self._docs.find(machine_id)
            host = (doc or {}).get("private_ip") or ""
            status, output = await self._check(host, spec)
            await self._record(machine_id, run, spec, status, output)
            await self._clock.sleep(began + spec.interval - self._clock.now())

    async def _check(self, host: str, spec: CheckSpec) -> tuple[str, str]:
        if not host:
            return CRITICAL, "the machine has no private address"
        result: tuple[str, str] = (CRITICAL, f"timed out after {spec.timeout:g}s")

        async def attempt() -> None:
            nonlocal result
            try:
                result = await self._probe(host, spec)
            except Exception as e:  # noqa: BLE001 — a probe's failure is the check's failure
                result = (CRITICAL, f"{type(e).__name__}: {e}")

        await wait_until(self._clock, attempt, spec.timeout)
        return result

    async def _record(
        self, machine_id: str, run: _Run, spec: CheckSpec, status: str, output: str
    ) -> None:
        old = run.results[spec.name]
        if (old["status"], old["output"]) == (status, output):
            return
        run.results[spec.name] = {"name": spec.name, "status": status, "output": output,
                                  "updated_at": m.iso(self._clock.now())}  # fmt: skip
        if old["status"] != status:
            fields = {"machine_id": machine_id, "check": spec.name, "status": status,
                      "previous": old["status"], "output": output}  # fmt: skip
            log.info("check %s of machine %s: %s -> %s (%s)", spec.name, machine_id,
                     old["status"], status, output, extra={"fields": fields})  # fmt: skip
        await self._write(machine_id, run)

    async def _write(self, machine_id: str, run: _Run) -> None:
        """Put the run's current results in the document (if it is still this boot's)."""

        def change(doc: dict[str, Any]) -> None:
            if doc["state"] == m.STARTED and _boot(doc) == run.boot:
                doc["checks"] = [dict(r) for r in run.results.values()]
                doc["checks_boot"] = run.boot

        doc = self._docs.find(machine_id)
        if doc is None or doc["state"] != m.STARTED or _boot(doc) != run.boot:
            return
        if doc.get("checks") == list(run.results.values()):
            return
        # shielded: a write that reached the database must also reach the in-memory document
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(NotFoundError):
                await self._docs.update(machine_id, change)

    async def _clear(self, machine_id: str) -> None:
        """A machine that is not running has no check results."""

        def change(doc: dict[str, Any]) -> None:
            if doc["state"] != m.STARTED:
                doc["checks"] = []
                doc.pop("checks_boot", None)

        try:
            with anyio.CancelScope(shield=True):
                await self._docs.update(machine_id, change)
        except NotFoundError:
            pass
        finally:
            self._clearing.discard(machine_id)


def _waiting(spec: CheckSpec) -> str:
    if spec.grace_period:
        return f"waiting for the grace period ({spec.grace_period:g}s)"
    return "not run yet"


__all__ = ["HealthChecks"]
