"""``corrosion template``: Jinja2 files rendered from the database, kept up to date as it
changes anywhere in the cluster; ``--once``; atomic writes and the command after a render."""

from __future__ import annotations

import os
import sys

import pytest
from cli_helpers import api_of, cli, cluster, node_mapping
from support import Proc, free_port, wait_for

from corrosion import Agent, Config
from corrosion.ops.template import TemplateError, TemplateSpec

pytestmark = pytest.mark.anyio

HOSTS = """\
# {{ sql("SELECT count(*) AS n FROM todos")[0].n }} todos
{% for t in sql("SELECT id, title FROM todos WHERE done = ? ORDER BY id", [0]) -%}
{{ t.id }} {{ t["title"] }}
{% endfor -%}
{{ sql("SELECT id, title FROM todos ORDER BY id").to_json() }}
"""


async def test_once_renders_every_template_and_exits(base):
    async with cluster(base, 1) as (a,):
        await a.execute(["INSERT INTO todos (id, title) VALUES (1, 'milk'), (2, 'eggs')"])
        (base / "hosts.j2").write_text(HOSTS)
        (base / "csv.j2").write_text('{{ sql("SELECT id, title FROM todos").to_csv() }}')
        out, out_csv = base / "out" / "hosts", base / "out.csv"
        result = await cli(
            "--api-addr", api_of(a), "template", "--once",
            f"{base / 'hosts.j2'}:{out}", f"{base / 'csv.j2'}:{out_csv}",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert out.read_text() == (
            '# 2 todos\n1 milk\n2 eggs\n[{"id": 1, "title": "milk"}, {"id": 2, "title": "eggs"}]\n'
        )
        assert out_csv.read_text() == "id,title\n1,milk\n2,eggs\n"


async def test_mistakes_are_one_line_naming_the_file(base):
    async with cluster(base, 1) as (a,):
        (base / "bad.j2").write_text("{% for x in %}\n")
        (base / "typo.j2").write_text("{{ sql('SELECT nope FROM todos') }}")
        (base / "undefined.j2").write_text("{{ missing }}")
        for name, says in [
            ("bad.j2", "bad.j2:1:"),
            ("typo.j2", "no such column: nope"),
            ("undefined.j2", "'missing' is undefined"),
            ("absent.j2", "no such template file"),
        ]:
            result = await cli(
                "--api-addr", api_of(a), "template", "--once", f"{base / name}:{base / 'out'}"
            )  # fmt: skip
            assert result.exit_code == 1
            assert result.stderr.startswith("error: ") and says in result.stderr, result.stderr
            assert result.stderr.count("\n") == 1
            assert not (base / "out").exists()
    result = await cli("template", "--once", "only-one-part")
    assert result.exit_code == 1 and "SOURCE:DESTINATION" in result.stderr


def test_specs_keep_colons_in_the_command():
    spec = TemplateSpec.parse("in.j2:/etc/out:echo a:b")
    assert (str(spec.source), str(spec.destination), spec.command) == (
        "in.j2",
        "/etc/out",
        "echo a:b",
    )
    with pytest.raises(TemplateError):
        TemplateSpec.parse(":out")


async def test_a_change_on_another_node_re_renders_and_runs_the_command(base):
    async with cluster(base, 2) as (a, b):
        await a.execute(["INSERT INTO todos (id, title) VALUES (1, 'milk')"])
        (base / "list.j2").write_text(
            '{% for t in sql("SELECT title FROM todos ORDER BY id") %}{{ t.title }}\n{% endfor %}'
        )
        out, ran = base / "list.txt", base / "ran"
        command = f"echo rendered >> {ran}"
        proc = Proc(
            [sys.executable, "-m", "corrosion", "--api-addr", api_of(a), "template",
             f"{base / 'list.j2'}:{out}:{command}"],
            base,
        )  # fmt: skip
        try:
            await wait_for(lambda: out.exists() and out.read_text() == "milk\n", what="render")
            await wait_for(lambda: ran.exists(), what="the command to run")
            inode = os.stat(out).st_ino
            # a write on the other node reaches a, whose subscription tells the template
            await b.execute(["INSERT INTO todos (id, title) VALUES (2, 'eggs')"])
            await wait_for(lambda: out.read_text() == "milk\neggs\n", what="a re-render")
            assert os.stat(out).st_ino != inode  # replaced by a rename, never written in place
            await wait_for(lambda: ran.read_text().count("rendered") == 2, what="command again")
            # an unrelated write renders nothing new: the file and the command stay as they are
            await a.execute(["UPDATE todos SET done = 1 WHERE id = 1"])
            await b.execute(["INSERT INTO todos (id, title) VALUES (3, 'tea')"])
            await wait_for(lambda: out.read_text().endswith("tea\n"), what="the third render")
            # the command runs after the rename: wait for it; the update in between rendered
            # the same text, so it ran no command (a fourth run would be that)
            await wait_for(lambda: ran.read_text().count("rendered") == 3, what="command, third")
            # an edited template is picked up
            (base / "list.j2").write_text("{{ sql('SELECT count(*) FROM todos')[0][0] }}\n")
            await wait_for(lambda: out.read_text() == "3\n", what="the edited template")
            assert proc.p.poll() is None, proc.stderr()
        finally:
            proc.p.terminate()
            assert await proc.wait() == 0, proc.stderr()
        assert "SIGTERM received" in proc.stderr()


async def test_the_template_follows_an_agent_restart(base):
    data = node_mapping(base, "solo", api={"addr": f"127.0.0.1:{free_port()}"})
    cfg = Config.from_mapping(data)
    (base / "n.j2").write_text("{{ sql('SELECT count(*) FROM todos')[0][0] }}\n")
    out = base / "n.txt"
    async with Agent(cfg) as a:
        proc = Proc(
            [sys.executable, "-m", "corrosion", "--api-addr", api_of(a), "template",
             f"{base / 'n.j2'}:{out}"],
            base,
        )  # fmt: skip
    try:
        # the agent is gone: the template says so once and keeps trying
        await wait_for(lambda: "could not reach the agent" in proc.stderr(), what="the error")
        async with Agent(cfg) as a:
            await wait_for(lambda: out.exists() and out.read_text() == "0\n", what="a render")
            await a.execute(["INSERT INTO todos (id) VALUES (1)"])
            await wait_for(lambda: out.read_text() == "1\n", what="the change")
        # the agent goes away while watched: said once (not once per retry), and its return
        lost = "the files keep their last render"
        await wait_for(lambda: lost in proc.stderr(), what="the watch to say the agent is gone")
        async with Agent(cfg) as a:
            await wait_for(lambda: "answers again" in proc.stderr(), what="the agent's return")
            await a.execute(["INSERT INTO todos (id) VALUES (2)"])
            await wait_for(lambda: out.read_text() == "2\n", what="the change after a restart")
        assert proc.stderr().count("could not reach the agent") == 2, proc.stderr()
        assert proc.stderr().count(lost) == 1, proc.stderr()
    finally:
        proc.p.terminate()
        await proc.wait()
