"""The agent tests run on asyncio unless a file asks for more backends (its own fixture)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
