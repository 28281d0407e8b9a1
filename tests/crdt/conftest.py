"""Fixtures for the crdt tests: the real cr-sqlite oracle (one node process per test session)."""

from __future__ import annotations

import oracle as oracle_mod
import pytest
from support import require


@pytest.fixture(scope="session")
def oracle():
    """The oracle; its tests skip without node and the npm package, or fail when the CI requires
    them (CORROSION_REQUIRE_ORACLE=1)."""
    require(oracle_mod.unavailable_reason(), "CORROSION_REQUIRE_ORACLE")
    o = oracle_mod.Oracle.start()
    yield o
    o.close()
