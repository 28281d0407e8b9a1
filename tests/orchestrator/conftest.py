"""Fixtures for the orchestrator tests: both anyio backends, runc required or skipped, three
namespace hosts, the spans a test makes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from orch_helpers import SpanRecorder, require_netns, require_runc

from orchestrator.drivers import runc_available
from orchestrator.hosts import HostLab


@pytest.fixture
def runc_required() -> None:
    """For ``@pytest.mark.usefixtures("runc_required")``: see ``require_runc``."""
    require_runc()


@pytest.fixture
def hang_deadline(request) -> Iterator[None]:
    """Fails a test still running after 15 s (a test of this kind takes a fraction of one;
    CORROSION_TEST_DEADLINE=seconds changes it): the engine's tests wait on runs without a
    timeout, and a planted bug that makes a run never finish (bench/mutation_score.py) must fail
    its test in seconds, not hang until the mutation tool's own limit. SIGALRM raises in
    pytest's thread; where that cannot unwind the test (trio's runner, blocked between its
    guest-run callbacks), the process exits 2 s later, status 1."""
    seconds = int(os.environ.get("CORROSION_TEST_DEADLINE", "15"))

    def expired(signum, frame):
        signal.signal(signal.SIGALRM, stuck)
        signal.alarm(2)
        raise TimeoutError(f"{request.node.nodeid} still running after {seconds} s")

    def stuck(signum, frame):
        os._exit(1)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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
