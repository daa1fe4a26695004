"""Failure modes of AutoFlowGuide's numerics: each test fails on the unpatched package.

Uses public names only (pfg.AutoFlowGuide, pfg.fit, pfg.RenyiDReG_ELBO,
pfg.NonFiniteLossError). Fixed seeds; each test takes a few seconds on one core.
"""
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_flowguide as pfg

torch.set_num_threads(1)


def readme_model(x, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)


def readme_data(seed, intercept):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-2, 2, 50)
    return x, intercept + 0.5 * x + 0.3 * torch.randn(50, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
def test_data_pinned_start_trains(seed):
    # Intercept 9: the posterior (sd ~0.04 in a, b) is pinned far from the prior-median start.
    x, y = readme_data(seed, 9.0)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(readme_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The first 150 steps of fit's default schedule for steps=2000 (lr 1e-2 decaying to 3e-4).
        optim = pyro.optim.ClippedAdam({"lr": 1e-2, "clip_norm": 10.0, "lrd": (3e-4 / 1e-2) ** (1 / 2000)})
        result = pfg.fit(readme_model, guide, x, y, steps=150, optim=optim, progress=False)
    assert result.steps == 150
    assert result.num_skipped <= 5
    assert all(math.isfinite(v) for v in result.losses[-10:])


def test_renyi_extreme_draw_gives_finite_gradient():
    # A wide guide (init_scale=30) puts some of 32 draws of log(sigma) near -60, where the
    # likelihood's log density is about -1e50 (-inf in float32) and its gradient overflows;
    # those particles have weight 0 and must contribute neither loss nor NaN gradient.
    def model(y):
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(0.0, sigma), obs=y)

    y = torch.tensor([1.3, -0.7, 2.1, 0.4])
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(model, init_scale=30.0)
    guide(y)
    loss = pfg.RenyiDReG_ELBO(0.5, num_particles=32, vectorize_particles=True, max_plate_nesting=1)
    n_bad = 0
    for _ in range(5):
        with pyro.poutine.trace(param_only=True) as tr:
            value = loss.loss_and_grads(model, guide, y)
        params = [s["value"].unconstrained() for s in tr.trace.nodes.values()]
        grads = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
        n_bad += int(not (math.isfinite(value) and torch.isfinite(grads).all()))
        for p in params:
            p.grad = None
    assert n_bad == 0


def test_horseshoe_plain_svi_stays_finite():
    torch.manual_seed(3000)
    X = torch.randn(200, 24)
    w_true = torch.zeros(24)
    w_true[:3] = torch.tensor([2.0, -1.5, 1.0])
    y = torch.bernoulli(torch.sigmoid(X @ w_true + 0.3))

    def model(X, y):
        tau = pyro.sample("tau", dist.HalfCauchy(1.0))
        with pyro.plate("feat", X.shape[-1]):
            lam = pyro.sample("lam", dist.HalfCauchy(1.0))
            w = pyro.sample("w", dist.Normal(0.0, tau * lam))
        b0 = pyro.sample("b0", dist.Normal(0.0, 5.0))
        with pyro.plate("obs", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=X @ w + b0), obs=y)

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), Trace_ELBO())
    for step in range(100):
        try:
            value = svi.step(X, y)
        except ValueError as err:  # a scale that underflowed to 0 in the model
            pytest.fail(f"step {step}: {str(err).splitlines()[0][:120]}")
        assert math.isfinite(value), f"non-finite loss at step {step}"


def test_adam_lr_003_on_5d_posterior():
    torch.manual_seed(4000)
    X = torch.randn(100, 4)
    y = X @ torch.tensor([1.0, -0.5, 0.25, 0.0]) + 0.5 + 0.8 * torch.randn(100)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 5.0).expand([4]).to_event(1))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("obs", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), Trace_ELBO())
    losses = []
    for step in range(300):
        try:
            losses.append(svi.step(X, y))
        except ValueError as err:
            pytest.fail(f"step {step}: {str(err).splitlines()[0][:120]}")
    tail = sorted(losses[-50:])
    assert math.isfinite(tail[25]) and tail[25] < 1e3, f"median of last 50 losses {tail[25]:.3g}"


def test_short_fit_warns_when_unconverged():
    x, y = readme_data(0, 1.0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(readme_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pfg.fit(readme_model, guide, x, y, steps=300, progress=False)
    assert any("converge" in str(w.message).lower() for w in caught)
