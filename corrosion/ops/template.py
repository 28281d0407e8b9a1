"""``corrosion template``: files rendered from the replicated database, kept up to date.

Each template is a Jinja2 file that reads with ``sql("SELECT ...")`` (or ``sql(query, params)``);
its output is written atomically (a temporary file in the same directory, then a rename) and an
optional shell command runs after each render that changed the file (as consul-template does).
The template re-renders when the result of any query it read changes (each distinct query is
watched through a ``/v1/subscriptions`` stream that carries only changes), when the template file
itself changes, and after the agent comes back from a restart; renders are debounced
(``DEBOUNCE``). ``--once`` renders every template once and exits.

Ordering that loses nothing: a render reads with ``/v1/queries``; a query seen for the first time
is then watched, and when its watch is established (its end-of-query event) one more render runs,
so a change that landed between the read and the watch is rendered too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import jinja2

from ..errors import CorrosionError
from ..files import write_durably
from ..surfaces.client import AsyncClient, Client, ClientError, SubscriptionLost

log = logging.getLogger("corrosion.template")

DEBOUNCE = 0.1  # seconds: changes closer together than this render once
TEMPLATE_POLL = 1.0  # seconds between checks of the template files for edits
RECONNECT_MAX = 10.0  # seconds: the longest wait between attempts to watch a query again

Query = tuple[str, str]  # (sql, params as JSON): what a template read, hashable


class TemplateError(CorrosionError):
    """A template spec, file or render failed; the message names the file."""


@dataclass(frozen=True)
class TemplateSpec:
    """``src:dst[:command]`` as corrosion spells it (the command may hold colons)."""

    source: Path
    destination: Path
    command: str | None = None

    @classmethod
    def parse(cls, spec: str) -> TemplateSpec:
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise TemplateError(
                f"template {spec!r}: expected SOURCE:DESTINATION[:COMMAND], "
                "e.g. 'hosts.j2:/etc/hosts.d/cluster:systemctl reload dnsmasq'"
            )
        command = parts[2] if len(parts) == 3 and parts[2].strip() else None
        return cls(Path(parts[0]), Path(parts[1]), command)


# -- what a template sees ------------------------------------------------------------------------


class Row(Sequence[Any]):
    """One row: by position (``row[0]``), by column (``row.name``, ``row["name"]``), iterable."""

    def __init__(self, columns: dict[str, int], values: list[Any]) -> None:
        self._columns = columns
        self._values = values

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._values[self._columns[key]]
        return self._values[key]

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[self._columns[name]]
        except KeyError:
            raise AttributeError(name) from None

    def __len__(self) -> int:
        return len(self._values)

    def as_dict(self) -> dict[str, Any]:
        return {name: self._values[i] for name, i in self._columns.items()}


class Rows(list[Row]):
    """A query's rows, with ``columns``, ``to_json()`` and ``to_csv()``."""

    def __init__(self, columns: list[str], rows: list[Row]) -> None:
        super().__init__(rows)
        self.columns = columns

    def to_json(self, pretty: bool = False, rows_as_arrays: bool = False) -> str:
        data = [list(r) if rows_as_arrays else r.as_dict() for r in self]
        return json.dumps(data, indent=2 if pretty else None)

    def to_csv(self, header: bool = True) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if header:
            writer.writerow(self.columns)
        writer.writerows(list(r) for r in self)
        return out.getvalue()


def read_rows(client: Client, sql: str, params: Any) -> Rows:
    columns: list[str] = []
    index: dict[str, int] = {}
    rows: list[Row] = []
    for kind, payload in client.query_events(sql, params):
        if kind == "columns":
            columns = list(payload)
            index = {name: i for i, name in enumerate(columns)}
        elif kind == "row":
            rows.append(Row(index, payload[1]))
    return Rows(columns, rows)


def _environment(source: Path) -> jinja2.Environment:
    # Templates write config files, not HTML: no autoescaping; a misspelt name is an error,
    # not an empty string in a config file.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(source.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(spec: TemplateSpec, client: Client) -> tuple[str, set[Query]]:
    """Render ``spec``'s template (blocking: run it in a worker thread); return the text and
    the queries it read."""
    read: set[Query] = set()

    def sql(query: str, params: Any = None) -> Rows:
        read.add((query, json.dumps(params)))
        try:
            return read_rows(client, query, params)
        except ClientError as exc:
            if exc.status is None:  # the agent is unreachable: not the template's fault
                raise
            raise TemplateError(f"{spec.source}: sql({query!r}): {exc}") from None

    try:
        template = _environment(spec.source).get_template(spec.source.name)
        text = template.render(sql=sql, hostname=socket.gethostname)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{spec.source}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateNotFound:
        raise TemplateError(f"{spec.source}: no such template file") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{spec.source}: {exc.message}") from None
    return text, read


def write_atomically(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` durably (``corrosion.files``), keeping the file's mode; return
    False (and touch nothing) when the file already holds exactly ``text``."""
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
        mode: int | None = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    write_durably(path, data, mode=mode)
    return True


def run_command(spec: TemplateSpec) -> None:
    """The spec's command, through the shell, after a render that changed the file."""
    if spec.command is None:
        return
    result = subprocess.run(spec.command, shell=True, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        log.info("%s: ran %r", spec.destination, spec.command)
    else:
        log.warning(
            "%s: command %r exited with %d: %s",
            spec.destination,
            spec.command,
            result.returncode,
            (result.stderr or result.stdout).strip()[-500:],
        )


def render_once(spec: TemplateSpec, client: Client) -> set[Query]:
    """Render, write if changed (then run the command); return the queries read."""
    text, read = render(spec, client)
    if write_atomically(spec.destination, text):
        log.info("%s: rendered from %s", spec.destination, spec.source)
        run_command(spec)
    return read


# -- keeping them up to date ---------------------------------------------------------------------


@dataclass
class _Watched:
    spec: TemplateSpec
    queries: set[Query] = field(default_factory=set)
    dirty: anyio.Event = field(default_factory=anyio.Event)
    mtime: float = 0.0
    retry: float = 0.5  # seconds before the next attempt while the agent is unreachable


class Templates:
    """Renders ``specs`` and keeps them rendered until cancelled."""

    def __init__(self, specs: Sequence[TemplateSpec], addr: str, token: str | None = None) -> None:
        self._specs = list(specs)
        self._addr = addr
        self._token = token
        self._watches: dict[Query, anyio.CancelScope] = {}
        self._interested: dict[Query, list[_Watched]] = {}
        self._agent_lost = False  # said once while the watches cannot reach the agent

    def _client(self) -> Client:
        return Client(self._addr, self._token)

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        watched = [_Watched(spec) for spec in self._specs]
        async with anyio.create_task_group() as tg:
            for w in watched:
                w.dirty.set()  # the first render
                tg.start_soon(self._keep_rendered, w, tg)
            tg.start_soon(self._poll_templates, watched)
            task_status.started()

    async def _keep_rendered(self, w: _Watched, tg: anyio.abc.TaskGroup) -> None:
        failing = False
        while True:
            await w.dirty.wait()
            await anyio.sleep(DEBOUNCE)  # let a burst of changes land first
            w.dirty = anyio.Event()
            w.mtime = _mtime(w.spec.source)
            client = self._client()
            try:
                read = await anyio.to_thread.run_sync(render_once, w.spec, client)
            except (TemplateError, ClientError, OSError) as exc:
                if not failing:
                    log.error("%s: %s (the file keeps its last render)", w.spec.destination, exc)
                failing = True
                if isinstance(exc, ClientError) and exc.status is None:
                    tg.start_soon(self._retry_later, w)  # the agent is away: try again
                continue  # a broken template: rendered again once the file changes
            finally:
                client.close()
            if failing:
                log.info("%s: rendering again", w.spec.destination)
            failing, w.retry = False, 0.5
            self._watch(w, read, tg)

    async def _retry_later(self, w: _Watched) -> None:
        await anyio.sleep(w.retry)
        w.retry = min(w.retry * 2, RECONNECT_MAX)
        w.dirty.set()

    def _watch(self, w: _Watched, read: set[Query], tg: anyio.abc.TaskGroup) -> None:
        for query in w.queries - read:
            self._interested[query].remove(w)
            if not self._interested[query]:
                del self._interested[query]
                self._watches.pop(query).cancel()
        for query in read - w.queries:
            self._interested.setdefault(query, []).append(w)
            if query not in self._watches:
                scope = anyio.CancelScope()
                self._watches[query] = scope
                tg.start_soon(self._follow, query, scope)
        w.queries = read

    def _connected(self, query: Query) -> None:
        if self._agent_lost:
            self._agent_lost = False
            log.info("the agent at %s answers again: rendering again", self._addr)
        self._changed(query)

    def _unreachable(self, exc: Exception) -> None:
        if not self._agent_lost:
            self._agent_lost = True
            log.warning("%s: the files keep their last render; watching again once it answers", exc)

    def _changed(self, query: Query) -> None:
        for w in self._interested.get(query, []):
            w.dirty.set()

    async def _follow(self, query: Query, scope: anyio.CancelScope) -> None:
        """Watch one query's changes through a subscription that resumes after breaks
        (``AsyncClient.subscribe``, ``skip_rows``: no rows, only changes); each time its stream
        is (re)established, render again, so that what changed before the watch began, or while
        it was broken, is read too."""
        sql, params = query[0], json.loads(query[1])
        with scope:
            async with AsyncClient(self._addr, self._token) as client:
                while True:
                    sub = client.subscribe(
                        sql,
                        params,
                        skip_rows=True,
                        max_backoff=RECONNECT_MAX,
                        on_connect=lambda: self._connected(query),
                        on_unreachable=self._unreachable,
                    )
                    try:
                        async with sub:
                            async for _change in sub:
                                self._changed(query)
                    except SubscriptionLost:
                        continue  # the agent no longer has it: subscribe again
                    except ClientError as exc:  # refused (bad SQL, token): the render says so
                        log.error("watching %r: %s", sql, exc)
                        await anyio.sleep(RECONNECT_MAX)

    async def _poll_templates(self, watched: list[_Watched]) -> None:
        while True:
            await anyio.sleep(TEMPLATE_POLL)
            for w in watched:
                if _mtime(w.spec.source) != w.mtime:
                    w.dirty.set()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def render_all_once(specs: Sequence[TemplateSpec], client: Client) -> None:
    for spec in specs:
        render_once(spec, client)


def parse_specs(specs: Sequence[str]) -> list[TemplateSpec]:
    return [TemplateSpec.parse(s) for s in specs]
