"""Fixtures for the orchestrator tests: both anyio backends, a fresh machines directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for orch_helpers


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
