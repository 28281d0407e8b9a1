"""Fixtures for the orchestrator tests: both anyio backends, a fresh machines directory."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
