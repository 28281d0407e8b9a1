"""Profile a live agent for a while: ``corrosion profile --seconds 10 --out agent.prof``.

The tool is the standard library's ``cProfile``: it is maintained with CPython, needs no new
dependency, and its files are read by ``python -m pstats``, snakeviz and most other viewers.
(pyinstrument samples with less overhead but would be a new dependency; ``sys.remote_exec``,
which could attach any profiler to a running process, arrives only with Python 3.14.)

The profiler is enabled on the agent's event-loop thread, where the agent's state and protocol
code run; work handed to worker threads (SQLite reads, merges) shows as the time the loop waits
for it. Only one profile runs at a time: Python allows a single profiler per thread.
"""

from __future__ import annotations

import cProfile
import os
from pathlib import Path

import anyio

from ..errors import CorrosionError

MAX_SECONDS = 600.0


class ProfileError(CorrosionError):
    """A profile request the agent refuses (bad duration or path, or one already running)."""


_running = False


def check_request(seconds: object, path: object) -> tuple[float, Path]:
    """The duration and output path of a request, or ``ProfileError`` saying what is wrong."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ProfileError('"seconds" must be a number')
    if not 0 < seconds <= MAX_SECONDS:
        raise ProfileError(f'"seconds" must be more than 0 and at most {MAX_SECONDS:g}')
    if not isinstance(path, str) or not path:
        raise ProfileError('"out" must be the file to write (a path on the agent\'s host)')
    out = Path(path)
    if not out.is_absolute():
        raise ProfileError(f"out {path!r} must be absolute (the agent's working directory "
                           "is not the client's)")  # fmt: skip
    if not out.parent.is_dir():
        raise ProfileError(f"out {path!r}: directory {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise ProfileError(f"out {path!r} is a directory")
    return float(seconds), out


async def profile(seconds: float, out: Path) -> dict[str, object]:
    """Profile the event-loop thread for ``seconds`` and write the stats (``pstats`` format) to
    ``out``; returns what was written."""
    global _running
    if _running:
        raise ProfileError("a profile is already running; wait for it to finish")
    _running = True
    try:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            await anyio.sleep(seconds)
        finally:
            profiler.disable()
        tmp = out.with_name(out.name + ".tmp")
        await anyio.to_thread.run_sync(profiler.dump_stats, str(tmp))
        os.replace(tmp, out)
        return {"path": str(out), "seconds": seconds, "functions": len(profiler.getstats())}
    finally:
        _running = False
