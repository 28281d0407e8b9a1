"""The CLI without a running agent: option parsing, bad config refused at start-up naming the
key (before anything is created or bound), unreachable agents, output formatting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import pytest
from cli_helpers import node_mapping, short_tmp, write_config
from typer.testing import CliRunner

from corrosion.ops.cli import DEFAULT_CONFIG, app, format_cell, hoist_global_options, run_async
from corrosion.surfaces.admin_client import DEFAULT_PATH as DEFAULT_ADMIN_PATH
from corrosion.surfaces.client import base_url, statement

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def base():
    with short_tmp() as path:
        yield path


def test_global_options_are_accepted_after_the_subcommand():
    assert hoist_global_options(["query", "SELECT 1", "--api-addr", "h:1", "--columns"]) == [
        "--api-addr",
        "h:1",
        "query",
        "SELECT 1",
        "--columns",
    ]
    assert hoist_global_options(["exec", "-c", "x.toml", "--db-path=/d", "S"]) == [
        "-c",
        "x.toml",
        "--db-path=/d",
        "exec",
        "S",
    ]
    assert hoist_global_options(["-cfile", "cluster", "members"]) == [
        "-cfile",
        "cluster",
        "members",
    ]
    assert hoist_global_options(["query", "S", "--token", "t", "--token=u"]) == [
        "--token",
        "t",
        "--token=u",
        "query",
        "S",
    ]
    # nothing after "--" moves
    assert hoist_global_options(["exec", "--", "--api-addr"]) == ["exec", "--", "--api-addr"]


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d["gossip"].update(adr="127.0.0.1:0"), "gossip.adr"),
        (lambda d: d["api"].update(addr=5), "api.addr"),
        (lambda d: d["gossip"].update(addr="127.0.0.1:http"), "gossip.addr"),
        (lambda d: d.update(bogus={"x": 1}), "bogus"),
        (lambda d: d["log"].update(format="xml"), "log.format"),
        (lambda d: d["perf"].update(min_sync_backoff="fast"), "perf.min_sync_backoff"),
        (lambda d: d["db"].update(schema_paths=["/nonexistent/schema.sql"]), "db.schema_paths"),
    ],
)
def test_agent_refuses_invalid_config_naming_the_key(base, mutate, key):
    data = node_mapping(base, "bad", log={"format": "plaintext"})
    mutate(data)
    cfg = write_config(base / "config.toml", data)
    result = invoke("agent", "-c", str(cfg))
    assert result.exit_code == 1
    assert key in result.stderr
    assert result.stderr.startswith("error: invalid config")
    # refused before anything was created or bound
    assert not (base / "bad").exists()
    assert not (base / "bad.sock").exists()


def test_agent_refuses_a_schema_that_cannot_be_replicated(base):
    data = node_mapping(base, "bad")
    schema = base / "unique.sql"
    schema.write_text("CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY, v TEXT UNIQUE);")
    data["db"]["schema_paths"] = [str(schema)]
    result = invoke("agent", "-c", str(write_config(base / "config.toml", data)))
    assert result.exit_code == 1
    assert "db.schema_paths" in result.stderr
    assert not (base / "bad").exists()


def test_missing_or_unparsable_config_file(base):
    result = invoke("-c", str(base / "absent.toml"), "agent")
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    (base / "broken.toml").write_text("[db\npath = 1")
    result = invoke("-c", str(base / "broken.toml"), "agent")
    assert result.exit_code == 1
    assert "not valid TOML" in result.stderr


def test_client_commands_explain_what_is_missing(base):
    cfg = node_mapping(base, "n", api=None)
    path = write_config(base / "config.toml", cfg)
    result = invoke("-c", str(path), "query", "SELECT 1")
    assert result.exit_code == 1
    assert "api.addr" in result.stderr and "--api-addr" in result.stderr

    result = invoke("exec", "INSERT INTO t VALUES (1)", "--api-addr", "127.0.0.1:1")
    assert result.exit_code == 1
    assert "is the agent running?" in result.stderr

    result = invoke("cluster", "members", "--admin-path", str(base / "none.sock"))
    assert result.exit_code == 1
    assert "no agent answers on the admin socket" in result.stderr

    # a relative path is shown absolute, the errno not at all, with the hint: one clean line
    with contextlib.chdir(base):
        result = invoke("cluster", "members", "--admin-path", "none.sock")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: no agent answers on the admin socket {str(base / 'none.sock')!r}: "
        "No such file or directory (is the agent running?)\n"
    )

    result = invoke("--admin-path", str(base / "none.sock"), "sync", "generate")
    assert result.exit_code == 1


def test_backup_and_restore_refuse_bad_paths(base):
    result = invoke("backup", str(base / "out.db"), "--db-path", str(base / "missing.db"))
    assert result.exit_code == 1
    assert "does not exist" in result.stderr

    junk = base / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    target = base / "target.db"
    target.write_bytes(b"precious")
    result = invoke("restore", str(junk), "--db-path", str(target), "--admin-path", "/nonexistent")
    assert result.exit_code == 1
    assert target.read_bytes() == b"precious"  # nothing was touched

    result = invoke(
        "restore", str(base / "nothing.db"), "--db-path", str(target), "--actor-id", "zz"
    )
    assert result.exit_code == 1
    assert "--actor-id" in result.stderr


def test_cells_print_like_corrosion():
    assert format_cell(None) == ""
    assert format_cell(3) == "3"
    assert format_cell(1.5) == "1.5"
    assert format_cell("a|b") == "a|b"
    assert format_cell([0, 255, 16]) == "x'00ff10'"
    assert format_cell(True) == "1"


def test_client_addresses_and_statements():
    assert base_url("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert base_url("0.0.0.0:8080") == "http://127.0.0.1:8080"
    assert base_url("[::]:8080") == "http://[::1]:8080"
    assert base_url(("::1", 9)) == "http://[::1]:9"
    assert base_url("http://h:1/") == "http://h:1"
    assert statement("SELECT 1") == "SELECT 1"
    assert statement("SELECT ?", (1,)) == ["SELECT ?", [1]]
    assert statement("SELECT :a", {"a": 1}) == ["SELECT :a", {"a": 1}]


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("agent", "exec", "query", "cluster", "sync", "reload", "backup", "restore"):
        assert name in result.stdout
    assert "devcluster" in result.stdout


def test_without_uvloop_the_cli_runs_on_asyncio_quietly(monkeypatch, caplog):
    """uvloop is the optional `fast` extra: without it, one DEBUG line, and an error raised later
    is reported on its own, not "during handling of" uvloop's ImportError."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if the extra were not installed

    async def fails():
        raise RuntimeError(type(asyncio.get_running_loop()).__module__)

    with caplog.at_level(logging.DEBUG, logger="corrosion"), pytest.raises(RuntimeError) as info:
        run_async(fails)
    assert str(info.value).startswith("asyncio")  # the default loop, not uvloop's
    assert info.value.__context__ is None
    assert [r.levelname for r in caplog.records if "uvloop" in r.getMessage()] == ["DEBUG"]


@pytest.mark.skipif(DEFAULT_CONFIG.exists(), reason=f"{DEFAULT_CONFIG} exists on this machine")
def test_without_a_config_each_command_says_what_to_pass_instead(base):
    """No -c and no file at the default path: the error says which flag does without it, by
    how the command reaches the agent (its API, its admin socket, or its database file)."""
    missing = f"error: config file '{DEFAULT_CONFIG}' does not exist"
    for argv, remedy in [
        (["exec", "INSERT INTO t VALUES (1)"], "(pass -c CONFIG, or --api-addr HOST:PORT)"),
        (["query", "SELECT 1"], "(pass -c CONFIG, or --api-addr HOST:PORT)"),
        (
            ["template", "--once", f"{base}/a.j2:{base}/a"],
            "(pass -c CONFIG, or --api-addr HOST:PORT)",
        ),
        (["backup", str(base / "out.db")], "(pass -c CONFIG, or --db-path FILE)"),
        (["restore", str(base / "out.db")], "(pass -c CONFIG, or --db-path FILE)"),
        (["agent"], "(pass -c CONFIG)"),
    ]:
        result = invoke(*argv)
        assert result.exit_code == 1, argv
        assert result.stderr == f"{missing} {remedy}\n", argv

    # admin commands fall back to the default socket: said, with the flag that names another
    if not DEFAULT_ADMIN_PATH.exists():
        result = invoke("cluster", "members")
        assert result.exit_code == 1
        assert result.stderr.endswith(
            f"; {DEFAULT_CONFIG} does not exist, so this is the default socket "
            "(pass -c CONFIG, or --admin-path SOCKET)\n"
        )

    # a file named with -c is the error itself: no remedy appended
    result = invoke("-c", str(base / "absent.toml"), "exec", "SELECT 1")
    assert result.stderr == f"error: config file '{base / 'absent.toml'}' does not exist\n"
