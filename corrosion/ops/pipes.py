"""Commands whose output is piped into a reader that stops early (``corrosion query ... | head``,
``python -m simulations scenarios | head``).

When the reader exits, the next write to stdout fails with ``BrokenPipeError`` (EPIPE; Python
ignores SIGPIPE). That is not the command's error: it ends quietly with exit code 1, as the
Python documentation's note on SIGPIPE recommends, and stdout is pointed at ``/dev/null`` so that
the interpreter's own flush at exit does not fail again with "Exception ignored ...". Every
command-line entry point (``corrosion``, ``python -m simulations``) runs inside
``closed_stdout_exits``; it has no dependencies, so any layer's entry point may use it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator

CLOSED_STDOUT_EXIT = 1


@contextlib.contextmanager
def closed_stdout_exits() -> Iterator[None]:
    """``with closed_stdout_exits(): ...`` — a closed stdout ends the program with exit code 1
    and no traceback; stdout is flushed on the way out (also on ``sys.exit``), so output still
    buffered meets the closed pipe here rather than at interpreter exit."""
    try:
        try:
            yield
        except SystemExit:
            sys.stdout.flush()
            raise
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        raise SystemExit(CLOSED_STDOUT_EXIT) from None


def _discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null: what is still buffered goes nowhere."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return  # not a file (a test's buffer): nothing to flush at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
