"""Agent extensions: code from a higher layer that an agent hosts, such as the orchestrator.

corrosion imports nothing above it. An extension brings the schema it needs, the routes it
serves next to the HTTP API, and its own start and close; ``Agent(config, extensions=[...])``
runs it. Which extension serves a config table is found through the entry points of the group
``corrosion.extensions`` (the package that provides one declares, in its pyproject.toml,
``[project.entry-points."corrosion.extensions"] <table> = "<module>:<factory>"``, the factory
taking the table and returning the extension), so the CLI can host an extension it does not
know: ``load_extensions(config)``.

An extension may also export Prometheus metrics: when it has a ``metric_families()`` method
(``MetricsExtension``), the agent's ``/metrics`` adds what it returns, read at every scrape.

corrosion keeps such a table raw (today the one such table is ``[orchestrator]``); the
extension's factory validates it and raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol

from anyio.abc import TaskGroup
from starlette.routing import BaseRoute

from ..config import Config, ConfigError
from .results import ExecResult

GROUP = "corrosion.extensions"


class ExtensionHost(Protocol):
    """What an extension may use of the agent that hosts it."""

    config: Config
    # the HTTP API's addresses as bound (a configured port 0 becomes the real one); empty until
    # the API serves, which is after extensions start
    api_addrs: list[tuple[str, int]]

    @property
    def actor_id(self) -> bytes: ...

    async def execute(self, statements: Sequence[Any], *, timeout: Any = ...) -> ExecResult: ...

    def query(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, batch: int = ...,
        timeout: Any = ...,
    ) -> AsyncIterator[tuple[Any, ...]]: ...  # fmt: skip


class AgentExtension(Protocol):
    """Something an agent hosts. ``start`` runs once the agent is up (before its HTTP API
    serves, so that ``routes`` can be mounted); ``close`` runs first when the agent stops."""

    @property
    def name(self) -> str: ...

    @property
    def section(self) -> str | None:
        """The config table it owns (kept raw by corrosion), or None."""
        ...

    @property
    def schema(self) -> str:
        """SQL added to the agent's schema files ("" for none)."""
        ...

    def routes(self) -> list[BaseRoute]: ...

    async def start(self, agent: ExtensionHost, tg: TaskGroup) -> None: ...

    async def close(self) -> None: ...


# a metric family as /metrics renders it: (name, type, help, samples); a sample is
# (labels, value), or for a histogram (suffix: "_bucket" / "_sum" / "_count", labels, value)
MetricSample = tuple[dict[str, str], float] | tuple[str, dict[str, str], float]
MetricFamily = tuple[str, str, str, list[MetricSample]]


class MetricsExtension(Protocol):
    """An extension that exports metrics (optional: ``/metrics`` looks for the method)."""

    def metric_families(self) -> list[MetricFamily]:
        """Its families, read at scrape time on the event loop (keep it cheap)."""
        ...


def extension_metrics(extensions: Sequence[Any]) -> list[MetricFamily]:
    """The metric families of those ``extensions`` that export some."""
    out: list[MetricFamily] = []
    for ext in extensions:
        families = getattr(ext, "metric_families", None)
        if callable(families):
            out.extend(families())
    return out


ExtensionFactory = Callable[[Mapping[str, Any]], AgentExtension]


def extension_sections(config: Config) -> dict[str, Mapping[str, Any]]:
    """The config tables corrosion keeps raw for an extension, by name."""
    return {} if config.orchestrator is None else {"orchestrator": config.orchestrator}


def load_extensions(config: Config, *, group: str = GROUP) -> list[AgentExtension]:
    """The extensions for the tables of ``config`` that an extension serves, built by the
    factories their packages declare as entry points. ``ConfigError`` (one line, naming the
    table) when no installed package serves a table, or when its factory refuses it."""
    found = {ep.name: ep for ep in entry_points(group=group)}
    out = []
    for name, table in extension_sections(config).items():
        ep = found.get(name)
        if ep is None:
            raise ConfigError(
                f"[{name}]: no installed extension serves this table (no entry point {name!r} "
                f"in the group {group!r}); install the package that provides it, or remove "
                "the table"
            )
        try:
            factory: ExtensionFactory = ep.load()
        except (ImportError, AttributeError) as exc:
            message = f"[{name}]: its extension {ep.value} cannot be loaded: {exc}"
            raise ConfigError(message) from None
        out.append(factory(table))
    return out


def check_extensions(config: Config, extensions: Sequence[AgentExtension]) -> None:
    """Refuse to start with a config table that none of ``extensions`` owns: it would be
    ignored silently."""
    served = {ext.section for ext in extensions}
    for name in extension_sections(config):
        if name not in served:
            raise ConfigError(
                f"[{name}]: no extension given for this table; pass "
                "extensions=corrosion.extensions.load_extensions(config) to Agent "
                "(the corrosion CLI does)"
            )
