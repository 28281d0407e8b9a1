"""``python -m orchestrator``: small operator commands.

* ``schema-path`` — where the shipped ``machines`` schema file is, for ``db.schema_paths`` of
  every node's corrosion config.
* ``proxy --replica DB --listen HOST:PORT [--domain D] [--default-app A]`` — the proxy over a
  node's replica file, until SIGINT/SIGTERM.
* ``gateway --replica DB --listen HOST:PORT [--token-file F]`` — one Machines API over every
  worker in the replica's ``workers`` table (see :mod:`.gateway`), until SIGINT/SIGTERM. It
  exports traces where the ``OTEL_EXPORTER_OTLP_*`` environment says (off without).
* ``hosts up [--hosts N] [--driver process|runc] [--base-dir DIR]`` / ``hosts down [LAB...]`` /
  ``hosts list`` / ``hosts clean`` — worker hosts as network namespaces on this machine (root),
  see :mod:`.hosts`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from corrosion.ops.pipes import closed_stdout_exits

USAGE = "usage: python -m orchestrator {schema-path,proxy,gateway,hosts} ..."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("schema-path", help="print the path of the machines schema file")
    proxy = sub.add_parser("proxy", help="serve the proxy over a replica file")
    proxy.add_argument("--replica", required=True, help="the node's database file")
    proxy.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    proxy.add_argument("--domain", help="route <app>.<domain> to the app's machines")
    proxy.add_argument("--default-app", help="the app for any other Host")
    gw = sub.add_parser("gateway", help="serve one Machines API over the replica's workers")
    gw.add_argument("--replica", required=True, help="the node's database file")
    gw.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    gw.add_argument("--token-file", help="a file holding the workers' API bearer token")
    gw.add_argument(
        "--replication-wait",
        type=float,
        default=5.0,
        help="seconds to wait for a machine the replica lacks (default 5)",
    )
    hosts = sub.add_parser("hosts", help="worker hosts as network namespaces (root)")
    hsub = hosts.add_subparsers(dest="action", required=True)
    up = hsub.add_parser("up", help="start a lab of namespace hosts and leave it running")
    up.add_argument("--hosts", type=int, default=3, help="how many hosts (1-9, default 3)")
    up.add_argument("--driver", default="process", choices=("process", "runc"))
    up.add_argument("--base-dir", help="keep the hosts' data here (default: a temp dir)")
    down = hsub.add_parser("down", help="tear labs down (all of them without a name)")
    down.add_argument("labs", nargs="*")
    hsub.add_parser("list", help="the labs on this machine")
    hsub.add_parser("clean", help="tear down labs whose owner died, and unrecorded debris")
    return parser


def _serve_over_replica(
    what: str, replica: Any, app: Any, host: str, port: int, replica_path: str
) -> int:
    """Serve ``app`` (an ASGI app reading ``replica``) until SIGINT/SIGTERM; the exit code."""
    import anyio

    from corrosion.errors import sole_error
    from corrosion.runtime.listening import ListenError, listening
    from corrosion.surfaces.asgi_server import serve_asgi

    async def serve() -> None:
        try:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with anyio.create_task_group() as tg:
                    with listening("--listen", (host, port)):
                        server = await serve_asgi(app, tg, host, port, lifespan=True)
                    print(f"{what} on {host}:{server.address[1]} over {replica_path}", flush=True)
                    async for _ in signals:
                        break
                    server.close()
        finally:
            replica.close()

    try:
        anyio.run(serve)
    except Exception as e:  # the task group wraps it: say the one error inside, in one line
        error = sole_error(e)
        if isinstance(error, ListenError):  # names --listen, the cause and the remedy
            print(f"error: {error.strerror}", file=sys.stderr)
        elif isinstance(error, OSError):
            print(f"error: the {what} could not start: {error}", file=sys.stderr)
        else:
            raise
        return 1
    return 0


def _open_replica(path: str, make: Callable[[str], Any]) -> Any:
    """``make(path)`` for ``--replica`` (the proxy's and the gateway's), or ValueError naming
    the flag: no file there (it is never created: a typo must not serve an empty replica), or
    a file that is not a SQLite database."""
    import apsw

    if not os.path.isfile(path):
        raise ValueError(f"--replica: no database at {path} (is the agent running?)")
    try:
        return make(path)
    except (apsw.NotADBError, apsw.CorruptError):
        raise ValueError(
            f"--replica: {path} is not a SQLite database (give the agent's db.path)"
        ) from None
    except apsw.Error as e:  # gone since, not readable, locked
        raise ValueError(f"--replica: cannot open {path} ({e})") from None


def _read_file(flag: str, path: str) -> str:
    """The text of the file ``flag`` names, or ValueError naming the flag and what is wrong."""
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path} is a directory, not a file")
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{flag}: no file at {path}") from None
    except PermissionError:
        raise ValueError(f"{flag}: {path} is not readable by this user") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: cannot read {path} ({e})") from None


def _proxy(args: argparse.Namespace) -> int:
    from corrosion.config import parse_addr

    from .proxy import Proxy, SqliteReplica

    try:
        host, port = parse_addr(args.listen, "--listen")
        replica = _open_replica(args.replica, SqliteReplica)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    proxy = Proxy(replica, domain=args.domain, default_app=args.default_app)
    return _serve_over_replica("proxy", replica, proxy, host, port, args.replica)


def _gateway(args: argparse.Namespace) -> int:
    from corrosion.config import parse_addr
    from corrosion.runtime.tracing import resolve, start_tracing

    from .gateway import Gateway, GatewayReplica

    try:
        host, port = parse_addr(args.listen, "--listen")
        if args.replication_wait < 0:
            raise ValueError("--replication-wait: expected seconds >= 0")
        token = None
        if args.token_file is not None:
            token = _read_file("--token-file", args.token_file).strip()
            if not token:
                raise ValueError(f"--token-file: {args.token_file} is empty")
        tracing = resolve(None)  # the OTEL_* environment (a bad value: ConfigError, one line)
        replica = _open_replica(args.replica, GatewayReplica)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gateway = Gateway(replica, token=token, replication_wait=args.replication_wait)
    handle = start_tracing(tracing, "orchestrator-gateway")
    try:
        return _serve_over_replica("gateway", replica, gateway, host, port, args.replica)
    finally:
        handle.shutdown()  # the last spans go out


def _base_dir(path: str | None) -> str | None:
    """``hosts up --base-dir``, checked before a lab is made: the lab's hosts keep their data
    under it (created if missing), so it, or its nearest existing parent, must be a directory."""
    if path is None:
        return None
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--base-dir: {existing} is a file, not a directory")
    return path


def _hosts(args: argparse.Namespace) -> int:
    from . import hosts

    try:
        if args.action == "up":
            try:
                base_dir = _base_dir(args.base_dir)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            lab = hosts.HostLab(args.hosts, drivers=args.driver, base_dir=base_dir,
                                owned=False)  # fmt: skip
            lab.up()
            for host in lab.hosts:
                lab.start_gateway(host)
            print("\n".join(hosts.describe(lab)))
        elif args.action == "down":
            torn = hosts.teardown_named(args.labs)
            if not torn:  # only without names (an unknown name is an error)
                print("no labs to tear down (python -m orchestrator hosts list)", file=sys.stderr)
            for name in torn:
                print(f"{name}: torn down")
        elif args.action == "list":
            labs = hosts.list_labs()
            if not labs:  # said on stderr: stdout has one line per lab, for scripts
                print("no labs (start one: python -m orchestrator hosts up)", file=sys.stderr)
            for rec in labs:
                owner = "stale" if rec["stale"] else ("owned" if rec.get("owner") else "up")
                names = " ".join(f"{h['name']}={h['address']}" for h in rec["hosts"])
                print(f"{rec['name']}  {owner}  10.{rec['octet']}.0.0/16  {names}  {rec['base']}")
        else:
            for name in hosts.clean_stale():
                print(f"removed {name}")
    except (hosts.LabError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    if args.command == "schema-path":
        from .publish import MACHINES_SCHEMA_PATH

        print(MACHINES_SCHEMA_PATH)
        return 0
    if args.command == "proxy":
        return _proxy(args)
    if args.command == "gateway":
        return _gateway(args)
    return _hosts(args)


if __name__ == "__main__":
    with closed_stdout_exits():  # `python -m orchestrator schema-path | head`: exit 1, quietly
        sys.exit(main(sys.argv[1:]))
