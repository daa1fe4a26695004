"""Shared fixtures: every test starts from an empty Pyro param store and a fixed seed."""

import pyro
import pytest
import torch

# The machine running the suite has few cores and shares them; one thread
# keeps timings stable and avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


#: Flow families whose cases take seconds each (an ODE solve, or an inverse by
#: bisection): their parametrised cases run in the full suite, not in `-m "not slow"`.
SLOW_FAMILIES = frozenset({"CNF", "UNAF", "NAF", "BPF"})


def family_case(name, *values):
    """A parametrisation entry for a flow family, marked slow for :data:`SLOW_FAMILIES`."""
    args = (name, *values)
    if name in SLOW_FAMILIES:
        return pytest.param(*args, marks=pytest.mark.slow)
    return args if values else name
