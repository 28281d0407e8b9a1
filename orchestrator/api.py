"""The Machines API over HTTP: Fly's paths and JSON shapes, as a Starlette app.

``create_app(orch)`` is a standalone app whose lifespan runs the orchestrator; ``routes(orch)``
gives the bare routes for an application that runs the orchestrator itself (the corrosion agent
mounts them next to its own API when its config has an ``[orchestrator]`` section: see
``extension``).

Errors are ``{"error": "<message>"}`` with: 400 bad input, 401 bad token, 404 unknown machine,
408 wait timed out, 409 invalid transition / already running (with ``run_id``) / lease conflict,
501 unsupported (suspend). Mutating calls take the lease nonce in ``fly-machine-lease-nonce``.
Beyond Fly's paths: ``GET .../{id}/runs`` lists the machine's live FSM runs,
``GET .../{id}/runs/{run_id}/wait?timeout=`` waits for one to finish (its result, or 408) and
``DELETE .../{id}/runs/{run_id}`` cancels one (flyd's admin view); ``GET .../{id}/logs?lines=N``
tails the instance's stdout/stderr (Fly serves logs elsewhere, through NATS); ``GET
.../{id}/events`` is every run the machine had with its step events, compacted ones included.
An operation while a run of the same action is live answers 409 with that run's id, unless
asked with ``?queue=true``.

Every call is a span (``POST /v1/apps/{app}/machines/{machine_id}/stop``) continuing the caller's
W3C ``traceparent``; the run an operation starts is traced under it (see :mod:`.tracing`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import tracing
from .errors import AlreadyRunningError, InvalidRequestError, OrchestratorError
from .service import Orchestrator

NONCE_HEADER = "fly-machine-lease-nonce"
BASE = "/v1/apps/{app}/machines"

Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _json(request: Request, *, required: bool = True) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise InvalidRequestError("request body: expected a JSON object")
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"request body: invalid JSON ({e})") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body: expected a JSON object")
    return body


def _flag(request: Request, *names: str) -> bool:
    for name in names:
        value = request.query_params.get(name)
        if value is not None:
            if value.lower() in ("1", "true", "yes", ""):
                return True
            if value.lower() in ("0", "false", "no"):
                continue
            raise InvalidRequestError(f"{name}: expected true or false, got {value!r}")
    return False


def _number(request: Request, name: str, default: float) -> float:
    value = request.query_params.get(name)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except ValueError:
        raise InvalidRequestError(f"{name}: expected a number of seconds, got {value!r}") from None


def routes(orch: Orchestrator, *, token: str | None = None) -> list[Route]:
    """The Machines API routes bound to a running orchestrator."""

    def endpoint(fn: Callable[[Request, str, str], Awaitable[Response]], route: str) -> Handler:
        async def handle(request: Request) -> Response:
            attrs = {"fly.app": request.path_params["app"]}
            if "machine_id" in request.path_params:
                attrs["machine.id"] = request.path_params["machine_id"]
            with tracing.server_span(request.method, route, request.headers, attrs) as span:
                response = await answer(request)
                tracing.responded(span, response.status_code)
                return response

        async def answer(request: Request) -> Response:
            if token is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    return _error(401, "missing or invalid bearer token")
            if orch.engine is None:
                return _error(503, "the orchestrator is not running")
            app = request.path_params["app"]
            mid = request.path_params.get("machine_id", "")
            try:
                return await fn(request, app, mid)
            except AlreadyRunningError as e:
                return _error(e.status, str(e), run_id=e.run_id)
            except OrchestratorError as e:
                return _error(e.status, str(e))

        return handle

    def queued(request: Request) -> bool:
        """``?queue=true``: run after a live run of the same action instead of answering 409
        "already running"."""
        return _flag(request, "queue")

    def nonce(request: Request) -> str | None:
        return request.headers.get(NONCE_HEADER)

    async def list_machines(request: Request, app: str, _: str) -> Response:
        return JSONResponse(orch.list_machines(app, state=request.query_params.get("state")))

    async def create(request: Request, app: str, _: str) -> Response:
        return JSONResponse(await orch.create_machine(app, await _json(request)))

    async def get(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(orch.get_machine(app, mid))

    async def update(request: Request, app: str, mid: str) -> Response:
        body = await _json(request)
        return JSONResponse(
            await orch.update_machine(app, mid, body, nonce=nonce(request), queue=queued(request))
        )

    async def destroy(request: Request, app: str, mid: str) -> Response:
        force = _flag(request, "force", "kill")
        return JSONResponse(
            await orch.destroy_machine(
                app, mid, force=force, nonce=nonce(request), queue=queued(request)
            )
        )

    async def start(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(
            await orch.start_machine(app, mid, nonce=nonce(request), queue=queued(request))
        )

    async def stop(request: Request, app: str, mid: str) -> Response:
        body = await _json(request, required=False)
        unknown = sorted(set(body) - {"signal", "timeout"})
        if unknown:
            raise InvalidRequestError(f"unknown field(s) {', '.join(unknown)}")
        result = await orch.stop_machine(
            app, mid, signal=body.get("signal"), timeout=body.get("timeout"),
            nonce=nonce(request), queue=queued(request),
        )  # fmt: skip
        return JSONResponse(result)

    async def restart(request: Request, app: str, mid: str) -> Response:
        q = request.query_params
        body = await _json(request, required=False)
        signal = q.get("signal") or body.get("signal")
        timeout = q.get("timeout") or body.get("timeout")
        if isinstance(timeout, str) and timeout.isdigit():
            timeout = int(timeout)
        result = await orch.restart_machine(
            app, mid, signal=signal, timeout=timeout, nonce=nonce(request), queue=queued(request)
        )
        return JSONResponse(result)

    async def suspend(request: Request, app: str, mid: str) -> Response:
        orch.get_machine(app, mid)
        return _error(
            501, "suspend is not supported: this host cannot snapshot machine memory (no CRIU)"
        )

    async def wait(request: Request, app: str, mid: str) -> Response:
        state = request.query_params.get("state", "started")
        timeout = _number(request, "timeout", 60.0)
        instance_id = request.query_params.get("instance_id") or None
        ok = await orch.wait_machine(
            app, mid, state=state, timeout=timeout, instance_id=instance_id
        )
        if not ok:
            return _error(408, f"timed out after {timeout:g} s waiting for machine {mid} to be "
                               f"{state}")  # fmt: skip
        return JSONResponse({"ok": True})

    async def lease_acquire(request: Request, app: str, mid: str) -> Response:
        body = await _json(request, required=False)
        unknown = sorted(set(body) - {"ttl", "description"})
        if unknown:
            raise InvalidRequestError(f"unknown field(s) {', '.join(unknown)}")
        view, new = await orch.acquire_lease(
            app,
            mid,
            ttl=body.get("ttl", 30),
            description=body.get("description", ""),
            nonce=nonce(request),
        )
        return JSONResponse(view, status_code=201 if new else 200)

    async def lease_get(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(orch.get_lease(app, mid))

    async def lease_release(request: Request, app: str, mid: str) -> Response:
        await orch.release_lease(app, mid, nonce=nonce(request))
        return JSONResponse({"ok": True})

    async def cordon(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(
            await orch.cordon_machine(app, mid, nonce=nonce(request), queue=queued(request))
        )

    async def uncordon(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(
            await orch.uncordon_machine(app, mid, nonce=nonce(request), queue=queued(request))
        )

    async def metadata_get(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(orch.get_metadata(app, mid))

    async def metadata_set(request: Request, app: str, mid: str) -> Response:
        body = await _json(request)
        if set(body) != {"value"}:
            raise InvalidRequestError('request body: expected {"value": "..."}')
        key = request.path_params["key"]
        await orch.set_metadata(app, mid, key, body["value"], nonce=nonce(request))
        return Response(status_code=204)

    async def metadata_delete(request: Request, app: str, mid: str) -> Response:
        key = request.path_params["key"]
        await orch.delete_metadata(app, mid, key, nonce=nonce(request))
        return Response(status_code=204)

    async def runs(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(orch.list_runs(app, mid))

    async def run_wait(request: Request, app: str, mid: str) -> Response:
        timeout = _number(request, "timeout", 60.0)
        run_id = request.path_params["run_id"]
        result = await orch.wait_run(app, mid, run_id, timeout=timeout)
        if result is None:
            return _error(408, f"timed out after {timeout:g} s waiting for run {run_id}")
        return JSONResponse(result)

    async def run_cancel(request: Request, app: str, mid: str) -> Response:
        await orch.cancel_run(app, mid, request.path_params["run_id"], nonce=nonce(request))
        return JSONResponse({"ok": True})

    async def signal(request: Request, app: str, mid: str) -> Response:
        body = await _json(request)
        if set(body) != {"signal"}:
            raise InvalidRequestError('request body: expected {"signal": "SIGUSR1"}')
        return JSONResponse(await orch.signal_machine(app, mid, body["signal"]))

    async def exec_(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(await orch.exec_machine(app, mid, await _json(request)))

    async def ps(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(await orch.ps_machine(app, mid))

    async def events(request: Request, app: str, mid: str) -> Response:
        return JSONResponse(await orch.machine_events(app, mid))

    async def logs(request: Request, app: str, mid: str) -> Response:
        lines = request.query_params.get("lines", "100")
        if not lines.isdigit():
            raise InvalidRequestError(f"lines: expected a whole number, got {lines!r}")
        return JSONResponse({"lines": await orch.machine_logs(app, mid, int(lines))})

    one = BASE + "/{machine_id}"
    table: list[tuple[str, str, Callable[[Request, str, str], Awaitable[Response]]]] = [
        (BASE, "GET", list_machines),
        (BASE, "POST", create),
        (one, "GET", get),
        (one, "POST", update),
        (one, "DELETE", destroy),
        (one + "/start", "POST", start),
        (one + "/stop", "POST", stop),
        (one + "/restart", "POST", restart),
        (one + "/suspend", "POST", suspend),
        (one + "/wait", "GET", wait),
        (one + "/lease", "POST", lease_acquire),
        (one + "/lease", "GET", lease_get),
        (one + "/lease", "DELETE", lease_release),
        (one + "/cordon", "POST", cordon),
        (one + "/uncordon", "POST", uncordon),
        (one + "/metadata", "GET", metadata_get),
        (one + "/metadata/{key}", "POST", metadata_set),
        (one + "/metadata/{key}", "DELETE", metadata_delete),
        (one + "/signal", "POST", signal),
        (one + "/exec", "POST", exec_),
        (one + "/ps", "GET", ps),
        (one + "/events", "GET", events),
        (one + "/logs", "GET", logs),
        (one + "/runs", "GET", runs),
        (one + "/runs/{run_id}", "DELETE", run_cancel),
        (one + "/runs/{run_id}/wait", "GET", run_wait),
    ]
    by_path: dict[str, dict[str, Handler]] = {}
    for path, method, fn in table:
        by_path.setdefault(path, {})[method] = endpoint(fn, path)

    def dispatch(methods: dict[str, Handler]) -> Handler:
        async def handle(request: Request) -> Response:
            return await methods[request.method](request)

        return handle

    return [Route(path, dispatch(ms), methods=list(ms)) for path, ms in by_path.items()]


def create_app(orch: Orchestrator, *, token: str | None = None, manage: bool = True) -> Starlette:
    """A Starlette app serving the Machines API; with ``manage`` its lifespan runs ``orch``."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if manage:
            async with orch:
                yield
        else:
            yield

    return Starlette(routes=routes(orch, token=token), lifespan=lifespan)
