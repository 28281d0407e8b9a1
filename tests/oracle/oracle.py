"""Python side of the cr-sqlite oracle: drives oracle.mjs (the real cr-sqlite, WASM) under node.

    with Oracle.start() as oracle:
        db = oracle.open("n1")
        db.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b)")
        rows = db.execute("SELECT * FROM crsql_changes")

Values come back with their SQLite types (int, float, str, bytes, None), like apsw returns them.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "node_modules" / "@vlcn.io" / "wa-sqlite" / "dist" / "crsqlite-sync.wasm"


class OracleError(Exception):
    """The reference cr-sqlite reported an SQL error."""


def unavailable_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed, so the real cr-sqlite (WASM) oracle cannot run"
    if not PACKAGE.exists():
        return "npm package @vlcn.io/wa-sqlite is not installed (run scripts/setup-test-deps)"
    return None


def _encode(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return {"i": str(int(v))}
    if isinstance(v, int):
        return {"i": str(v)}
    if isinstance(v, float):
        return {"f": v if math.isfinite(v) else str(v)}
    if isinstance(v, bytes | bytearray | memoryview):
        return {"b": bytes(v).hex()}
    raise TypeError(f"cannot send {type(v).__name__} to the oracle")


def _decode(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if "i" in v:
        return int(v["i"])
    if "f" in v:
        return float(v["f"])
    return bytes.fromhex(v["b"])


class Oracle:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    @classmethod
    def start(cls) -> Oracle:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        proc = subprocess.Popen(
            ["node", str(HERE / "oracle.mjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        return cls(proc)

    def request(self, **req: Any) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the oracle process exited")
        reply = json.loads(line)
        if "error" in reply:
            raise OracleError(reply["error"])
        return reply

    def open(self, name: str) -> OracleDb:
        self.request(op="open", db=name)
        return OracleDb(self, name)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OracleDb:
    def __init__(self, oracle: Oracle, name: str) -> None:
        self.oracle = oracle
        self.name = name

    def execute(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        reply = self.oracle.request(
            op="exec", db=self.name, sql=sql, params=[_encode(p) for p in params]
        )
        return [tuple(_decode(v) for v in row) for row in reply["rows"]]

    def close(self) -> None:
        self.oracle.request(op="close", db=self.name)
