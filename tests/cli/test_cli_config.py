"""The config file as a user writes it: relative paths are relative to the file's directory (so
``corrosion -c dir/config.toml`` works from anywhere), and every key the parser accepts is in
docs/agent.md's configuration reference."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from cli_helpers import TEST_KEY, cli

from corrosion import Agent, Config
from corrosion import config as config_module
from orchestrator.config import OrchestratorConfig

pytestmark = pytest.mark.anyio

RELATIVE = f"""
[db]
path = "data/state.db"
schema_paths = ["schema", "/etc/corrosion/extra.sql"]
subscriptions_path = "subs"

[gossip]
addr = "127.0.0.1:0"
encryption_keys = ["{TEST_KEY}"]
tls.cert_file = "tls/cert.pem"
tls.key_file = "tls/key.pem"
tls.ca_file = "tls/ca.pem"
tls.client.cert_file = "tls/client.pem"
tls.client.key_file = "tls/client.key"

[admin]
path = "run/admin.sock"

[orchestrator]
machines_path = "machines"
archive_path = "archive"
state_path = "instances"
images_path = "/var/lib/images"
worker = "w1"
"""


def test_relative_paths_are_relative_to_the_config_file(base, monkeypatch):
    conf = base / "u" / "config.toml"
    conf.parent.mkdir()
    conf.write_text(RELATIVE)
    monkeypatch.chdir(base)
    u = (base / "u").absolute()
    for given in (Path("u/config.toml"), conf):  # the same, whichever way it is named
        cfg = Config.load(given, env={})
        assert cfg.db.path == u / "data/state.db"
        assert cfg.db.schema_paths == (u / "schema", Path("/etc/corrosion/extra.sql"))
        assert cfg.db.subscriptions_dir() == u / "subs"
        assert cfg.admin_socket() == u / "run/admin.sock"
        tls = cfg.gossip.tls
        assert tls is not None
        assert (tls.cert_file, tls.key_file, tls.ca_file) == (
            u / "tls/cert.pem",
            u / "tls/key.pem",
            u / "tls/ca.pem",
        )
        assert (tls.client_cert_file, tls.client_key_file) == (
            u / "tls/client.pem",
            u / "tls/client.key",
        )
        assert cfg.orchestrator == {
            "machines_path": str(u / "machines"),
            "archive_path": str(u / "archive"),
            "state_path": str(u / "instances"),
            "images_path": "/var/lib/images",
            "worker": "w1",
        }
    # a path given in the environment is relative to where the command runs, as on a command line
    cfg = Config.load(conf, env={"DB__PATH": "here.db"})
    assert cfg.db.path == Path("here.db")
    # without a file there is nothing to be relative to: paths stay as given
    cfg = Config.from_mapping({"db": {"path": "state.db", "schema_paths": ["s.sql"]}})
    assert cfg.db.path == Path("state.db") and cfg.db.schema_paths == (Path("s.sql"),)
    assert cfg.admin_socket() == Path("state.db.admin.sock")
    assert cfg.db.subscriptions_dir() == Path("state.db.subscriptions")  # beside, as the socket


def test_the_default_admin_socket_follows_the_resolved_database(base, monkeypatch):
    conf = base / "u" / "config.toml"
    conf.parent.mkdir()
    conf.write_text('[db]\npath = "state.db"\n')
    monkeypatch.chdir(base)
    cfg = Config.load("u/config.toml", env={})
    assert cfg.admin_socket() == (base / "u" / "state.db.admin.sock").absolute()


async def test_cli_with_a_relative_config_works_from_another_directory(base, monkeypatch):
    """The agent runs in the config's directory; the CLI is pointed at it from the parent."""
    u = base / "u"
    u.mkdir()
    (u / "schema.sql").write_text("CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY);\n")
    (u / "config.toml").write_text(
        '[db]\npath = "state.db"\nschema_paths = ["schema.sql"]\n\n'
        f'[gossip]\naddr = "127.0.0.1:0"\nencryption_keys = ["{TEST_KEY}"]\n'
    )
    monkeypatch.chdir(u)
    async with Agent(Config.load("config.toml", env={})) as agent:
        monkeypatch.chdir(base)
        result = await cli("-c", "u/config.toml", "cluster", "members")
        assert result.exit_code == 0, result.output
        assert agent.actor_id.hex() in result.stdout and "(self)" in result.stdout
    assert (u / "state.db").exists()


def test_every_orchestrator_path_key_ends_in_path():
    """Config.load resolves the [orchestrator] keys that end in ``_path``: a path-valued key
    named otherwise would silently stay relative to the current directory."""
    for f in dataclasses.fields(OrchestratorConfig):
        assert ("Path" in str(f.type)) == f.name.endswith("_path"), f.name


DOCS = Path(__file__).resolve().parents[2] / "docs" / "agent.md"


def parser_keys(monkeypatch) -> set[str]:
    """Every key ``Config.from_mapping`` reads, recorded from its reader on a config that takes
    every branch (TLS with a client certificate; no bearer-token, so its alias is read too;
    a PostgreSQL listener)."""
    read: set[str] = set()
    get = config_module._Reader.get

    def recording_get(self, key):
        read.add(self.prefix + key)
        return get(self, key)

    monkeypatch.setattr(config_module._Reader, "get", recording_get)
    tls = {"cert_file": "c", "key_file": "k", "ca_file": "ca", "client": {"cert_file": "cc"}}
    tls["client"]["key_file"] = "ck"
    pg = {"pg": {"addr": "127.0.0.1:5432"}}
    Config.from_mapping({"db": {"path": "x.db"}, "gossip": {"tls": tls}, "api": pg})
    tables = {k for k in read if any(other.startswith(k + ".") for other in read)}
    keys = read - tables - {"orchestrator"}  # [orchestrator] is read by its own parser
    return keys | {f"orchestrator.{f.name}" for f in dataclasses.fields(OrchestratorConfig)}


def documented_keys() -> set[str]:
    text = DOCS.read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_.-]+)` \|", section, re.MULTILINE))


def test_every_config_key_is_in_the_configuration_reference(monkeypatch):
    keys = parser_keys(monkeypatch)
    assert {"db.path", "telemetry.prometheus.addr", "gossip.tls.client.key_file"} <= keys
    documented = documented_keys()
    assert sorted(keys - documented) == [], "keys missing from docs/agent.md#configuration"
    assert sorted(documented - keys) == [], "documented keys the parser does not know"


TLS = {"cert_file": "c", "key_file": "k"}


def test_absent_keys_take_the_dataclass_defaults():
    """The parser has no defaults of its own: a minimal config is the dataclasses' defaults."""
    cfg = Config.from_mapping({"db": {"path": "x.db"}, "gossip": {"tls": TLS}})
    assert cfg == Config(
        db=config_module.DbConfig(Path("x.db")),
        gossip=config_module.GossipConfig(tls=config_module.TlsConfig(Path("c"), Path("k"))),
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"db": {}}, "db.path: is required"),
        ({"db": {"path": "x"}, "gossip": {"tls": {"cert_file": "c"}}}, "gossip.tls.key_file"),
        (
            {"db": {"path": "x"}, "gossip": {"tls": {**TLS, "client": {"cert_file": "c"}}}},
            "gossip.tls.client.key_file: is required",
        ),
        ({"db": {"path": "x"}, "perf": {"broadcast": "yes"}}, "perf.broadcast: expected true"),
        ({"db": {"path": "x"}, "log": {"colors": 1}}, "log.colors: expected true or false"),
        ({"db": {"path": "x"}, "gossip": {"cluster_id": 70000}}, "gossip.cluster_id: 70000"),
        (
            {"db": {"path": "x"}, "gossip": {"broadcast": "flood"}},
            'gossip.broadcast: must be "fanout" or "plumtree", got \'flood\'',
        ),
    ],
)
def test_keys_without_a_default_are_required_and_types_are_checked(data, message):
    with pytest.raises(config_module.ConfigError, match=re.escape(message)):
        Config.from_mapping(data)


def test_a_corrosion_config_is_accepted_with_its_spellings_and_unused_keys_named(tmp_path):
    (tmp_path / "config.toml").write_text(
        """
[db]
path = "state.db"
cache_size_kib = 1024

[api]
bind_addr = "127.0.0.1:8080"

[gossip]
bind_addr = "127.0.0.1:8787"
plaintext = true
bootstrap = ["node2.internal:8787@10.0.0.53:53"]
max_mtu = 1400

[admin]
uds_path = "admin.sock"

[reaper]
check_interval = 3600

[perf]
processing_queue_len = 20000
"""
    )
    cfg = Config.load(tmp_path / "config.toml", env={})
    assert cfg.api.addrs == (("127.0.0.1", 8080),)
    assert cfg.gossip.addr == ("127.0.0.1", 8787)
    assert cfg.gossip.bootstrap == (("node2.internal", 8787),)
    assert cfg.admin_path == tmp_path / "admin.sock"  # relative to the file, as admin.path
    assert [i.split(" ")[0] for i in cfg.ignored] == [
        "reaper",
        "db.cache_size_kib",
        "gossip.bootstrap[0]:",
        "gossip.max_mtu",
        "perf.processing_queue_len",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"db": {"path": "x", "schema_path": []}}, "db.schema_path: unknown configuration key; "
         "did you mean db.schema_paths?"),
        ({"db": {"path": "x"}, "gosip": {}}, "gosip: unknown configuration key; did you mean "
         "gossip?"),
        ({"db": {"path": "x"}, "perf": {"min_sync_backof": 1}}, "did you mean "
         "perf.min_sync_backoff?"),
        ({"db": {"path": "x"}, "api": {"addr": "127.0.0.1:1", "bind_addr": "127.0.0.1:2"}},
         "api.addr: given twice (also as api.bind_addr)"),
        ({"db": {"path": "x"}, "gossip": {"bootstrap": ["h:1@10.0.0.1:x"]}},
         "gossip.bootstrap[0] (DNS server): port must be a number"),
        ({"db": {"path": "x"}, "zzz": 1}, "zzz: unknown configuration key"),
        ({"db": {"path": "x"}, "gossip": {"addr": "127.0.0.1:99999"}},
         "gossip.addr: port 99999 in '127.0.0.1:99999' is out of range (0 to 65535)"),
        ({"db": {"path": "x"}, "api": {"addr": ":8080"}}, "api.addr: no host in ':8080'"),
        ({"db": {"path": "x"}, "gossip": {"encryption_keys": ["abc"]}},
         "gossip.encryption_keys[0]: not valid base64 ('corrosion keygen' makes a key)"),
        ({"db": {"path": "x"}, "gossip": {"encryption_keys": ["YWJj"]}},
         "must decode to 32 bytes (AES-256), got 3 ('corrosion keygen' makes a key)"),
    ],
)  # fmt: skip
def test_typos_fail_naming_the_nearest_key(data, message):
    with pytest.raises(config_module.ConfigError, match=re.escape(message)):
        Config.from_mapping(data)


@pytest.mark.parametrize(
    ("value", "mode"),
    [("fanout", "fanout"), ("gossip", "fanout"), ("plumtree", "plumtree"),
     ({"plumtree": {"prune_threshold": 5}}, "plumtree")],
)  # fmt: skip
def test_gossip_broadcast_takes_ours_and_corrosions_spellings(value, mode):
    cfg = Config.from_mapping({"db": {"path": "x"}, "gossip": {"broadcast": value}})
    assert cfg.gossip.broadcast == mode
    assert Config.from_mapping({"db": {"path": "x"}}).gossip.broadcast == "fanout"
    if isinstance(value, dict):  # corrosion's tuning keys: named as unused, not refused
        assert cfg.ignored == (
            "gossip.broadcast.plumtree.prune_threshold (a corrosion setting this agent does not "
            "use)",
        )
