"""``python -m orchestrator``'s mistakes: each one line naming the problem and the remedy, and
nothing created by it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from orchestrator import hosts
from orchestrator.__main__ import main
from orchestrator.config import ConfigError, OrchestratorConfig
from orchestrator.documents import APP_RE, check_app
from orchestrator.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parents[2]


def replica(path: Path) -> str:
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return str(path)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m orchestrator ARGS`` as a stranger runs it: a proxy or gateway that starts when
    it should not serves until the timeout fails the test, rather than hanging it."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
        timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("command", ["proxy", "gateway"])
def test_a_port_in_use_is_one_line(tmp_path, capsys, command):
    db = replica(tmp_path / "replica.db")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main([command, "--replica", db, "--listen", f"127.0.0.1:{port}"])
    assert code == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: --listen: cannot listen on 127.0.0.1:{port}: ")
    assert "address already in use" in line and "choose another port" in line


@pytest.mark.parametrize("command", ["proxy", "gateway"])
def test_a_missing_replica_is_refused_and_not_created(tmp_path, command):
    missing = tmp_path / "typo.db"
    result = cli(command, "--replica", str(missing), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr == f"error: --replica: no database at {missing} (is the agent running?)\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["proxy", "gateway"])
def test_a_replica_that_is_not_a_database_is_refused(tmp_path, command):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database, but long enough to have a header's worth of bytes " * 4)
    result = cli(command, "--replica", str(notes), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: --replica: {notes} is not a SQLite database")
    assert "db.path" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_replica_connection_never_creates_a_file(tmp_path):
    from orchestrator.gateway import GatewayReplica
    from orchestrator.proxy import SqliteReplica

    for make in (SqliteReplica, GatewayReplica):
        with pytest.raises(apsw.CantOpenError):
            make(tmp_path / "nosuch.db")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_token_file_names_the_flag(tmp_path, capsys):
    db = replica(tmp_path / "replica.db")
    missing = tmp_path / "nosuchtok"
    args = ["gateway", "--replica", db, "--listen", "127.0.0.1:0", "--token-file", str(missing)]
    assert main(args) == 2
    assert one_error_line(capsys) == f"error: --token-file: no file at {missing}"
    assert not missing.exists()
    args[-1] = str(tmp_path)  # a directory
    assert main(args) == 2
    assert one_error_line(capsys) == f"error: --token-file: {tmp_path} is a directory, not a file"


def test_a_hosts_base_dir_under_a_file_names_the_flag(tmp_path, monkeypatch, capsys):
    def started(self, timeout=0.0):
        raise AssertionError("a lab was started")

    monkeypatch.setattr(hosts.HostLab, "up", started)
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert main(["hosts", "up", "--base-dir", str(a_file / "sub")]) == 2
    assert one_error_line(capsys) == f"error: --base-dir: {a_file} is a file, not a directory"
    assert main(["hosts", "up", "--base-dir", str(a_file)]) == 2
    assert one_error_line(capsys) == f"error: --base-dir: {a_file} is a file, not a directory"


def test_a_misspelt_orchestrator_key_gets_a_suggestion():
    with pytest.raises(ConfigError) as caught:
        OrchestratorConfig.from_mapping({"machines_path": "/tmp/x", "drivr": "process"})
    assert str(caught.value) == (
        "orchestrator.drivr: unknown configuration key; did you mean orchestrator.driver?"
    )
    with pytest.raises(ConfigError) as caught:
        OrchestratorConfig.from_mapping({"machines_path": "/tmp/x", "zzz": 1})
    assert str(caught.value) == "orchestrator.zzz: unknown configuration key"


def test_an_invalid_app_name_says_what_a_valid_one_is():
    with pytest.raises(InvalidRequestError) as caught:
        check_app("Bad_App!")
    message = str(caught.value)
    assert message.startswith("invalid app name 'Bad_App!': ")
    assert "1 to 63" in message and "lowercase letters, digits and hyphens" in message
    assert "starting with a letter or digit" in message
    # the rule said is the rule applied
    for good in ("a", "9", "web-2", "a" * 63):
        assert APP_RE.match(good) and check_app(good) == good
    for bad in ("", "-web", "Web", "web_2", "a" * 64):
        with pytest.raises(InvalidRequestError):
            check_app(bad)


def test_hosts_list_without_labs_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hosts, "REGISTRY", tmp_path / "registry")
    assert main(["hosts", "list"]) == 0
    out = capsys.readouterr()
    assert out.out == ""  # stdout holds one line per lab, for scripts
    assert out.err == "no labs (start one: python -m orchestrator hosts up)\n"
    assert not (tmp_path / "registry").exists()


def test_hosts_down_without_labs_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hosts, "REGISTRY", tmp_path / "registry")
    assert main(["hosts", "down"]) == 0
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "no labs to tear down (python -m orchestrator hosts list)\n"
