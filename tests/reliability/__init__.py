"""The reliability suite (issue 9): generated programs against a reference model, threads, bad inputs, faults.

Hypothesis runs the state machines under the profile named by `HYPOTHESIS_PROFILE`: `ci` (the default: 200
programs of up to 50 steps, split over the machines) or `nightly` (1000 programs of up to 100 steps, split alike):

    HYPOTHESIS_PROFILE=nightly .venv/bin/python -m pytest tests/reliability -q

The profiles only apply to this suite's machines (`machine_settings`); other tests keep their own settings.
`NIGHTLY` also lengthens the thread tests (10,000 operations per thread instead of 2,000).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

NIGHTLY = os.environ.get("HYPOTHESIS_PROFILE") == "nightly"
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=200, stateful_step_count=50, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile(
    "nightly", max_examples=1000, stateful_step_count=100, deadline=None, suppress_health_check=_SLOW_OK
)


def machine_settings(share: float) -> settings:
    """The active profile's settings with `share` of its programs (the machines' shares add up to 1)."""
    profile = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    return settings(profile, max_examples=max(1, round(profile.max_examples * share)))
