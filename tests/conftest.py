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
