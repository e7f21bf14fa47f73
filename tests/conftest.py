"""Shared test setup: hypothesis profiles and the devices to run on.

Profiles: `ci` (default; derandomized, no deadline, small enough for CI's time), `long` (1,000
examples, for the multi-step optimizer properties on the GPU) and `thorough` (>= 10,000 examples
per property, for release checks):
    HYPOTHESIS_PROFILE=thorough python -m pytest -q tests
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# `device` is a plain string parameter, safe to share across generated examples.
_common = {"deadline": None, "suppress_health_check": [
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]}
try:  # torch.testing._internal (the OpInfo database) loads a hypothesis profile of its own when
    # imported; import it first so that ours, loaded below, is in force when test modules build
    # their @settings (which inherit the profile loaded at that moment).
    import torch.testing._internal.common_utils
except ImportError:  # expecttest missing: test_autocast_conformance.py says so
    pass
settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=10_000, print_blob=True, **_common)
# For slow multi-step properties on the GPU machine, where device time is rationed.
settings.register_profile("long", max_examples=1_000, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests call torch.ops.mixprec.* directly: load the extension once (import mixprec alone does not).
import mixprec._extension

mixprec._extension.load()

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
