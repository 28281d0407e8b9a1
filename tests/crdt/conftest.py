"""Fixtures for the crdt tests: the real cr-sqlite oracle (one node process per test session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oracle"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle as oracle_mod


@pytest.fixture(scope="session")
def oracle():
    reason = oracle_mod.unavailable_reason()
    if reason:
        pytest.skip(reason)
    o = oracle_mod.Oracle.start()
    yield o
    o.close()
