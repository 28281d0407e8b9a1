"""Fixtures for the orchestrator tests: both anyio backends, a fresh machines directory."""

from __future__ import annotations

import pytest
from orch_helpers import require_runc


@pytest.fixture
def runc_required() -> None:
    """For ``@pytest.mark.usefixtures("runc_required")``: see ``require_runc``."""
    require_runc()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
