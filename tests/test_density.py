"""Density estimation with the package's flows, measured against exact truths.

Every accuracy figure is a test NLL in nats per point on fresh draws, compared
with the true density evaluated on the same points:

* normalisation: every family's 2-D density integrates to one;
* a ~ U[1, 2], b | a ~ N(a, a): exact density, true NLL 1/2 log(2 pi e) + (2 log 2 - 1)/2 = 1.612;
* scikit-learn's circles and moons: uniform angle on the curves plus N(0, 0.05^2)
  noise, so the density is a closed form (circles, Bessel I0) or a 1-D quadrature (moons);
* b | a alone with a conditional flow, against the exact conditional.

Both training styles are exercised: a plain torch loop on
``-flow_dist.log_prob(x).mean()`` and Pyro SVI on ``pyro.sample("x", flow_dist,
obs=x)`` with the flow registered by ``pyro.module`` and caches cleared every step.
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
from conftest import family_case
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_flowguide._zuko import zuko
from pyro_flowguide.examples import sample_target, target_log_density
from pyro_flowguide.flows import base_distribution, flow_names, get_flow
from pyro_flowguide.transforms import clear_flow_caches, flow_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed

from benchmarks.memory import HAS_PROC, rss_mb  # noqa: E402


# ---------------------------------------------------------------------------
# Targets and their exact densities


def _truths():
    """``benchmarks/density.py``, whose exact circles/moons densities these tests check."""
    pytest.importorskip("sklearn")
    import benchmarks.density as truths

    return truths


def _sklearn_set(name: str, n_train: int):
    """Standardised train / test tensors and the true test NLL (nats/point, standardised units)."""
    return _truths().sklearn_set(name, n_train)


def test_truths_match_the_quoted_figures():
    # The a/b target: H(a) = 0, H(b | a) = E[1/2 log(2 pi e a)].
    exact = 0.5 * math.log(2 * math.pi * math.e) + 0.5 * (2 * math.log(2) - 1)
    assert exact == pytest.approx(1.6121, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    mc = -target_log_density(sample_target(200_000, g).double()).mean().item()
    assert mc == pytest.approx(exact, abs=0.005)
    # The circles figure of the classic flow tutorial's set-up.
    _, _, truth = _sklearn_set("circles", 1000)
    assert truth == pytest.approx(1.758, abs=1e-3)


def test_circles_closed_form_matches_quadrature():
    x = torch.randn(50, 2, dtype=torch.float64) * 0.7
    theta = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000 * 2 * math.pi
    ring = torch.stack([theta.cos(), theta.sin()], dim=-1)
    curve = torch.cat([ring, 0.5 * ring])
    d2 = (x[:, None, :] - curve).square().sum(-1)
    truths = _truths()
    s2 = truths.NOISE**2
    quad = torch.logsumexp(-d2 / (2 * s2), -1) - math.log(8000 * 2 * math.pi * s2)
    torch.testing.assert_close(truths._circles_log_density(x), quad, atol=1e-8, rtol=1e-8)


# ---------------------------------------------------------------------------
# Normalisation (acceptance 2)


def _whole_plane_nodes(n: int, c: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    # Midpoint rule in u in (-1, 1) with y = c tan(pi u / 2): covers all of R,
    # dense near the origin and sparse in the tails, so heavy tails are counted.
    u = -1 + (2 * torch.arange(n, dtype=torch.float64) + 1) / n
    y = c * torch.tan(math.pi * u / 2)
    w = c * math.pi / 2 / torch.cos(math.pi * u / 2) ** 2 * (2 / n)
    return y, w


_GRID = {"UNAF": 60, "CNF": 60}  # families whose log_prob is costly per point


DENSITY_FAMILIES = [n for n in flow_names() if not get_flow(n).density_refused]


def test_families_that_are_not_densities_are_refused():
    # GF maps data into a bounded box, so its density of data is not normalised.
    with pytest.raises(ValueError, match=r"GF cannot be a density.*NSF or MAF"):
        flow_transform("GF", 2, direction="density")
    flow_transform("GF", 2, direction="sample")  # as a guide it is a proper pushforward


@pytest.mark.parametrize("name", [family_case(n) for n in DENSITY_FAMILIES])
def test_every_density_integrates_to_one(name):
    spec = get_flow(name)
    T = flow_transform(name, 2, direction="density").double()
    base = base_distribution(spec.support, 2, dtype=torch.float64)
    flow = dist.TransformedDistribution(base, [T])
    n = _GRID.get(name, 100)
    if spec.support == "circular":
        h = 2 * math.pi / n
        y = -math.pi + h * (torch.arange(n, dtype=torch.float64) + 0.5)
        w = torch.full((n,), h, dtype=torch.float64)
    else:
        y, w = _whole_plane_nodes(n)
    points = torch.cartesian_prod(y, y)
    weights = torch.cartesian_prod(w, w).prod(-1)
    with torch.no_grad():
        q = flow.log_prob(points).exp()
        p0 = base.log_prob(points).exp()
    mass = (q * weights).sum().item()
    # The flow is far from the identity, so a wrong log-det would show in the mass.
    distance = 0.5 * ((q - p0).abs() * weights).sum().item()
    assert distance > 0.02, f"{name}: the random flow is too close to its base for a real test"
    assert abs(mass - 1) < 0.01, f"{name}: density integrates to {mass:.4f}"


# ---------------------------------------------------------------------------
# Fitting helpers


def _affine_coupling_with_lu(features: int, layers: int, hidden: tuple[int, ...]):
    """RealNVP's affine coupling layers with a learned L U mixing after each one."""
    parts = []
    for i in range(layers):
        mask = torch.arange(features) % 2 == i % 2
        parts.append(zuko.flows.GeneralCouplingTransform(features, mask=mask, hidden_features=hidden))
        parts.append(zuko.flows.UnconditionalTransform(zuko.transforms.LULinearTransform, torch.eye(features)))
    return zuko.lazy.LazyComposedTransform(*parts)


def _fit_torch(flow_dist, module, data, steps, lr, batch):
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        xb = data[torch.randint(0, len(data), (batch,))]
        loss = -flow_dist.log_prob(xb).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        clear_flow_caches(module)


def _fit_svi(flow_dist, module, data, steps, lr, batch, decay=0.05):
    def model(x):
        pyro.module("flow", module)
        # Nats per point, as in the torch loop: ClippedAdam clips each gradient
        # element, so the scale of the loss matters.
        with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=1.0 / x.shape[0]):
            pyro.sample("x", flow_dist, obs=x)

    if decay == 1:
        optim = pyro.optim.Adam({"lr": lr})
    else:
        optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay ** (1 / steps)})
    svi = SVI(model, lambda x: None, optim, Trace_ELBO())
    for _ in range(steps):
        svi.step(data[torch.randint(0, len(data), (batch,))])
        clear_flow_caches(module)  # the cache holds this step's graph


def _test_nll(flow_dist, module, data) -> float:
    clear_flow_caches(module)
    with torch.no_grad():
        return -flow_dist.log_prob(data).mean().item()


# ---------------------------------------------------------------------------
# Seed targets (acceptance 3)


@pytest.mark.slow
def test_ab_target_affine_coupling_with_lu_torch_loop():
    g = torch.Generator().manual_seed(0)
    train, test = sample_target(10_000, g), sample_target(20_000, g)
    truth = -target_log_density(test).mean().item()
    loc, scale = train.mean(0), train.std(0)
    T = flow_transform(_affine_coupling_with_lu(2, 4, (64, 64)), 2, direction="density")
    flow = dist.TransformedDistribution(base_distribution("real", 2), [T])
    _fit_torch(flow, T, (train - loc) / scale, steps=600, lr=5e-3, batch=256)
    nll = _test_nll(flow, T, (test - loc) / scale) + scale.log().sum().item()
    assert abs(nll - truth) < 0.05, f"test NLL {nll:.4f} vs true {truth:.4f}"


@pytest.mark.slow
def test_circles_spline_coupling_under_svi():
    train, test, truth = _sklearn_set("circles", 20_000)
    T = flow_transform(
        "NSF", 2, direction="density", passes=2, transforms=4, bins=16, hidden_features=(32, 32)
    )
    flow = dist.TransformedDistribution(base_distribution("real", 2), [T])
    _fit_svi(flow, T, train, steps=800, lr=1e-2, batch=512)
    nll = _test_nll(flow, T, test)
    assert abs(nll - truth) < 0.06, f"test NLL {nll:.4f} vs true {truth:.4f}"


@pytest.mark.slow
def test_conditional_spline_flow_learns_b_given_a():
    g = torch.Generator().manual_seed(1)
    train, test = sample_target(10_000, g), sample_target(20_000, g)
    truth = -target_log_density(test).mean().item()  # = -log p(b | a), as log p(a) = 0
    loc, scale = train.mean(0), train.std(0)
    train, test = (train - loc) / scale, (test - loc) / scale
    C = flow_transform("NSF", 1, context=1, direction="density", transforms=1)
    cond = dist.ConditionalTransformedDistribution(base_distribution("real", 1), [C])
    opt = torch.optim.Adam(C.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    for _ in range(400):
        batch = train[torch.randint(0, len(train), (256,))]
        loss = -cond.condition(batch[:, :1]).log_prob(batch[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        lp = cond.condition(test[:, :1]).log_prob(test[:, 1:])
    assert lp.shape == (len(test),)
    nll = -lp.mean().item() + scale[1].log().item()
    assert abs(nll - truth) < 0.03, f"conditional test NLL {nll:.4f} vs true {truth:.4f}"


# ---------------------------------------------------------------------------
# Memory (acceptance 6)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_memory_is_flat_over_5000_svi_steps():
    T = flow_transform("MAF", 2, direction="density", transforms=2, hidden_features=(16, 16))
    flow = dist.TransformedDistribution(base_distribution("real", 2), [T])
    data = torch.randn(2000, 2) * torch.tensor([1.0, 0.3])
    _fit_svi(flow, T, data, steps=200, lr=1e-3, batch=32, decay=1)  # allocator pools settle
    gc.collect()
    before = rss_mb()
    _fit_svi(flow, T, data, steps=5000, lr=1e-3, batch=32, decay=1)
    gc.collect()
    grown = rss_mb() - before
    assert grown < 20, f"RSS grew by {grown:.1f} MB over 5000 SVI steps"
