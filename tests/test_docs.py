"""The code blocks of README.md and docs/*.md run, so the documentation cannot rot silently.

The convention, for everyone writing docs:

- A fenced block whose info string starts with ``python``, ``sh``, ``bash`` or ``shell`` is
  executed; other languages (``toml``, ``json``, ``text``, ``console``, ...) and bare fences are
  not.
- ``no-run`` after the language (```` ```sh no-run ````) marks a block that cannot run on its own:
  it needs a running agent, root, a placeholder value, or runs for long. Nothing else may follow
  the language of an executed block, so a misspelt marker fails here instead of being ignored.
- A document's runnable blocks run in order, in one empty temp dir per document, so a block may
  write a file (``config.toml``) that a later block of the same document uses. Python blocks run
  with this interpreter as a subprocess, shell blocks with ``bash -e``, each with a timeout and
  with this interpreter's ``bin`` directory first on ``PATH`` (``python3``, ``corrosion``).
- The fixed loopback ports the docs show (``127.0.0.1:8080``, ``127.0.0.1:8787``) are replaced,
  consistently within a document, by free ones, so that a busy port on the machine cannot fail
  a document that is right.
- A block must leave no process behind: whatever still runs in the document's directory
  afterwards is killed and fails the test.

The README's opening commands are ``no-run``: the first is run by ``scripts/smoke-fresh-install``
(in a fresh venv, with ``--duration``), the second is ``.ci/run``'s test command, checked below.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python": "python", "sh": "sh", "bash": "sh", "shell": "sh"}
# info strings that look like an executed language but are not one of the above
MISTAKEN_LANGUAGES = {"py", "py3", "python3", "zsh", "console-run"}
NO_RUN = "no-run"
BLOCK_TIMEOUT = 300.0  # seconds; generous for a loaded 2-core machine

DOC_ADDRESS = re.compile(r"\b(?P<host>127\.0\.0\.1|localhost):(?P<port>8080|8787)\b")

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    flags: tuple[str, ...]
    source: str

    @property
    def where(self) -> str:
        return f"{_rel(self.path)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and NO_RUN not in self.flags


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file (indented fences too, as in lists)."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        words = m["info"].split()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            if _closes(FENCE.match(lines[i]), fence):
                break
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        else:
            raise AssertionError(f"{_rel(path)}:{start + 1}: unclosed code block")
        i += 1
        language = words[0].lower() if words else ""
        blocks.append(Block(path, start + 1, language, tuple(words[1:]), "\n".join(body) + "\n"))
    return blocks


def _closes(m: re.Match[str] | None, fence: str) -> bool:
    """A closing fence: the same character, at least as long, nothing after it."""
    return (
        bool(m)
        and m["fence"][0] == fence[0]
        and len(m["fence"]) >= len(fence)
        and not m["info"].strip()
    )


def _processes_using(directory: Path) -> list[int]:
    """Processes (not this one) working in ``directory`` or naming a path in it."""
    inside = f"{directory}/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cwd = os.readlink(entry / "cwd")
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if any(inside in f"{arg}/" for arg in [cwd, *args]):
                found.append(int(entry.name))
    return found


def _with_free_ports(source: str, ports: dict[str, int]) -> str:
    """``source`` with each documented fixed port replaced by this document's free one."""

    def swap(m: re.Match[str]) -> str:
        port = ports.setdefault(m["port"], free_port())
        return f"{m['host']}:{port}"

    return DOC_ADDRESS.sub(swap, source)


def _run(
    block: Block, workdir: Path, scripts: Path, ports: dict[str, int]
) -> subprocess.CompletedProcess[str]:
    script = scripts / f"line{block.line}.{'py' if block.language == 'python' else 'sh'}"
    script.write_text(_with_free_ports(block.source, ports))
    if RUN_LANGUAGES[block.language] == "python":
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-e", str(script)]
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen(
        argv,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so the whole group can be killed on timeout
    )
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{block.where}: still running after {BLOCK_TIMEOUT:g}s "
            f"(mark it `{block.language} {NO_RUN}` if it is meant to run for long)\n{out}{err}"
        ) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@contextlib.contextmanager
def _docs_lock():
    """One document at a time on this machine: README's example binds fixed ports (8080, 8787),
    and several checkouts may run this test at once."""
    with open(Path(tempfile.gettempdir()) / "corrosion-test-docs.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.mark.parametrize("doc", [d for d in DOCS if any(b.runs for b in code_blocks(d))], ids=_rel)
def test_doc_code_blocks_run(doc: Path, tmp_path: Path) -> None:
    blocks = [b for b in code_blocks(doc) if b.runs]
    workdir, scripts = tmp_path / "work", tmp_path / "scripts"
    workdir.mkdir()
    scripts.mkdir()
    ports: dict[str, int] = {}
    with _docs_lock():
        for block in blocks:
            try:
                result = _run(block, workdir, scripts, ports)
            finally:
                leftover = _processes_using(tmp_path)
                for pid in leftover:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            assert result.returncode == 0, (
                f"{block.where}: the {block.language} block failed (exit {result.returncode}):\n"
                f"{block.source}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
            assert not leftover, f"{block.where}: left processes running: {leftover}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_doc_code_blocks_follow_the_convention(doc: Path) -> None:
    for block in code_blocks(doc):
        assert block.language not in MISTAKEN_LANGUAGES, (
            f"{block.where}: write ```python or ```sh (or add {NO_RUN}), not ```{block.language}"
        )
        if block.language in RUN_LANGUAGES:
            assert block.flags in ((), (NO_RUN,)), (
                f"{block.where}: after ```{block.language} only `{NO_RUN}` may follow, "
                f"got {' '.join(block.flags)!r}"
            )


def test_code_blocks_parse_as_the_convention_says(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```sh\necho one\n```\n"
        "```python no-run\nprint(2)\n```\n"
        "- a list item\n\n  ```bash\n  echo three\n  ```\n"
        "````toml\n```\n````\n"
        "```\nbare\n```\n"
    )
    blocks = code_blocks(doc)
    assert [(b.language, b.flags, b.source, b.runs) for b in blocks] == [
        ("sh", (), "echo one\n", True),
        ("python", ("no-run",), "print(2)\n", False),
        ("bash", (), "echo three\n", True),
        ("toml", (), "```\n", False),
        ("", (), "bare\n", False),
    ]


def _readme_commands() -> list[str]:
    first = code_blocks(ROOT / "README.md")[0]
    return [re.sub(r"\s+#.*$", "", line) for line in first.source.splitlines() if line.strip()]


def test_readme_opens_with_the_install_and_the_test_command() -> None:
    install, test = _readme_commands()
    assert re.match(r"pip install \. && corrosion devcluster\b", install), install
    ci = (ROOT / ".ci" / "run").read_text()
    assert any(line.strip() == test for line in ci.splitlines()), (
        f".ci/run must run the README's test command exactly: {test!r}"
    )
    smoke = (ROOT / "scripts" / "smoke-fresh-install").read_text()
    assert "scripts/smoke-fresh-install" in ci and "README.md" in smoke
