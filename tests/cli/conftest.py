"""Fixtures the CLI tests share: asyncio (the CLI's own loop) and a short temp dir, since admin
socket paths must fit in a unix socket address."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import short_tmp


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def base() -> Iterator[Path]:
    with short_tmp() as path:
        yield path
