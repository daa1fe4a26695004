"""A search over random model structures: supports, shapes, plates and dependencies.

Each example builds a model from a few latent sites (a support, a shape, a
place in no plate, one plate or two nested plates, a prior that may follow the
sites before it), an observed site per plate, and checks that the default
guide (small networks) sets up, draws every site in its support and in its
shape, scores its draws finitely and takes a finite training step.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_flowguide import AutoFlowGuide

SMALL = {"hidden_features": (8,), "transforms": 1}

#: support name -> (prior given a location, its support's check)
SUPPORTS = {
    "real": lambda loc, shape: dist.Normal(loc, 1.0).expand(shape),
    "positive": lambda loc, shape: dist.LogNormal(0.1 * loc, 0.5).expand(shape),
    "unit": lambda loc, shape: dist.Beta(2.0 + torch.sigmoid(loc), 2.0).expand(shape),
    "interval": lambda loc, shape: dist.Uniform(-1.0, 2.0).expand(shape),
    "simplex": lambda loc, shape: dist.Dirichlet(torch.ones(3) + torch.sigmoid(loc)[..., None]).expand(shape),
    "cholesky": lambda loc, shape: dist.LKJCholesky(3, 1.0 + torch.sigmoid(loc)).expand(shape),
}
#: The event shape of the supports whose sites take no further shape.
EVENT = {"simplex": (3,), "cholesky": (3, 3)}

site_strategy = st.fixed_dictionaries({
    "support": st.sampled_from(sorted(SUPPORTS)),
    "shape": st.sampled_from([(), (2,), (3,), (2, 2)]),
    "plates": st.integers(0, 2),
    "depends": st.booleans(),
})


def build_model(sites: list[dict], plate_sizes: tuple[int, int]):
    """A model with these latent sites and an observed site that depends on the last of them."""

    def model():
        parent = torch.tensor(0.0)
        plates = [pyro.plate("outer", plate_sizes[0], dim=-2), pyro.plate("inner", plate_sizes[1], dim=-1)]
        for i, spec in enumerate(sites):
            loc = parent if spec["depends"] else torch.tensor(0.0)
            batch = plate_sizes[2 - spec["plates"]:] if spec["plates"] else ()
            shape = () if spec["support"] in EVENT else spec["shape"]
            fn = SUPPORTS[spec["support"]](loc, batch + shape)
            if shape:
                fn = fn.to_event(len(shape))
            with _plates(plates, spec["plates"]):
                value = pyro.sample(f"z{i}", fn)
            # The next site's location follows a scalar summary of this one.
            parent = value.reshape(-1).mean()
        with pyro.plate("obs", 4, dim=-1):
            pyro.sample("y", dist.Normal(torch.tanh(parent), 1.0), obs=torch.linspace(-1, 1, 4))

    return model


class _plates:
    """Enters the innermost ``n`` of ``plates`` (``outer`` at dim -2, ``inner`` at dim -1)."""

    def __init__(self, plates: list, n: int) -> None:
        self.plates = plates[2 - n:] if n else []

    def __enter__(self):
        for p in self.plates:
            p.__enter__()

    def __exit__(self, *exc):
        for p in reversed(self.plates):
            p.__exit__(*exc)


@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites=st.lists(site_strategy, min_size=1, max_size=3), plate_sizes=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_random_models_set_up_draw_in_support_and_train(sites, plate_sizes):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = build_model(sites, plate_sizes)
    guide = AutoFlowGuide(model, **SMALL)
    draw = guide()
    trace = poutine.trace(poutine.condition(model, draw)).get_trace()
    for i in range(len(sites)):
        site = trace.nodes[f"z{i}"]
        assert draw[f"z{i}"].shape == site["value"].shape
        assert bool(site["fn"].support.check(draw[f"z{i}"]).all()), (sites[i], draw[f"z{i}"])
    guide_trace = poutine.trace(guide).get_trace()
    assert math.isfinite(float(guide_trace.log_prob_sum().detach()))
    posterior = guide.sample_posterior(3)
    assert all(posterior[f"z{i}"].shape == (3,) + draw[f"z{i}"].shape for i in range(len(sites)))
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step())
