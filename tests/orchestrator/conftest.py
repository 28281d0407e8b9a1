"""Fixtures for the orchestrator tests: both anyio backends, runc required or skipped, three
namespace hosts, the spans a test makes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from orch_helpers import SpanRecorder, require_netns, require_runc

from orchestrator.drivers import runc_available
from orchestrator.hosts import HostLab


@pytest.fixture
def runc_required() -> None:
    """For ``@pytest.mark.usefixtures("runc_required")``: see ``require_runc``."""
    require_runc()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(scope="module")
def namespace_hosts():
    """Three worker hosts as network namespaces (``orchestrator.hosts.HostLab``), shared by a
    module's tests: h1 and h3 run the process driver, h2 runc where it can run (else the process
    driver). Skips without root/ip/nsenter (fails with CORROSION_REQUIRE_NETNS=1). Teardown
    asserts that no namespace, link, process or record is left behind."""
    require_netns()
    drivers = ["process", "runc" if runc_available() is None else "process", "process"]
    lab = HostLab(3, drivers=drivers)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
        assert lab.leftovers() == []


@pytest.fixture
def spans() -> Iterator[SpanRecorder]:
    """The spans ended during the test (``get_finished_spans()``), exported in memory by the
    tracer provider corrosion installs for this process, removed after the test."""
    recorder = SpanRecorder()
    try:
        yield recorder
    finally:
        recorder.close()
