"""Shared pytest configuration.

Hypothesis profiles: ``default`` for local runs and ``ci`` (selected with HYPOTHESIS_PROFILE=ci)
which raises example counts where a test asks for the profile's value. No profile sets a deadline:
the machines are shared and noisy, and a test must not fail because one example ran slowly.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
