"""to_inference_data: groups, dims, coords, log-likelihood values, argument order, agreement with NUTS."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

import pyro_flowguide as pfg
from pyro_flowguide.arviz_compat import group_names, loo_pointwise
from pyro_flowguide.diagnostics import to_inference_data
from pyro_flowguide.train import fit

az = pytest.importorskip("arviz")
torch.set_num_threads(1)

N = 40


def regression(x, g, y=None):
    """Varying intercepts (a plate of 3 groups), two slopes (a vector site), unknown noise."""
    b = pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("groups", 3):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
    mu = pyro.deterministic("mu", a[..., g] + (x * b).sum(-1))
    with pyro.plate("obs", x.shape[0]):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, generator=gen)
    g = torch.arange(N) % 3
    y = x @ torch.tensor([1.0, -0.5]) + torch.tensor([0.5, 0.0, -0.5])[g] + 0.3 * torch.randn(N, generator=gen)
    return x, g, y


def draws(array) -> np.ndarray:
    """A (chain, draw, ...) array's draws pooled over chains, in order."""
    values = np.asarray(array.values)
    return values.reshape(-1, *values.shape[2:])


@pytest.mark.slow  # 300 fitting steps
def test_groups_dims_coords_and_values():
    x, g, y = _data()
    guide = AutoNormal(regression)
    fit(regression, guide, x, g, y, steps=300, progress=False, seed=0)
    pyro.set_rng_seed(0)
    idata = to_inference_data(regression, guide, x, g, y, num_samples=200)

    assert group_names(idata) >= {"posterior", "log_likelihood", "posterior_predictive", "observed_data", "sample_stats"}
    post = idata.posterior
    assert post["a"].dims == ("chain", "draw", "groups") and post["a"].shape == (4, 50, 3)
    assert post["b"].dims == ("chain", "draw", "b_dim_0") and post["b"].shape == (4, 50, 2)
    assert post["sigma"].dims == ("chain", "draw")
    assert post["mu"].dims == ("chain", "draw", "mu_dim_0")  # deterministic sites too (outside any plate)
    assert list(post.coords["groups"].values) == [0, 1, 2]
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs")
    assert idata.observed_data["y"].dims == ("obs",)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    for name in ("lp", "log_q", "log_weight", "psis_log_weight"):
        assert idata.sample_stats[name].shape == (4, 50)
    assert idata.attrs["guide"] == "AutoNormal" and np.isfinite(idata.attrs["psis_khat"])

    # Point-wise log-likelihood is the model's density of each observation at each draw.
    a, b, sigma = (torch.as_tensor(draws(post[k])) for k in ("a", "b", "sigma"))
    mu = a[:, g] + (x * b[:, None, :]).sum(-1)
    want = dist.Normal(mu, sigma[:, None]).log_prob(y)
    np.testing.assert_allclose(draws(idata.log_likelihood["y"]), want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(draws(post["mu"]), mu.numpy(), rtol=1e-5, atol=1e-5)
    # log weight = lp - log_q
    ss = idata.sample_stats
    np.testing.assert_allclose(ss["log_weight"].values, ss["lp"].values - ss["log_q"].values, atol=1e-4)
    # Replicated data scatter around the draws' means with the draws' noise.
    pp = torch.as_tensor(draws(idata.posterior_predictive["y"]))
    z = ((pp - mu) / sigma[:, None]).flatten()
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


@pytest.mark.slow
def test_summary_matches_nuts_and_loo_runs_cleanly(caplog):
    x, g, y = _data()
    guide = AutoMultivariateNormal(regression)
    fit(regression, guide, x, g, y, steps=1500, progress=False, seed=0)
    pyro.set_rng_seed(0)
    idata = to_inference_data(regression, guide, x, g, y, num_samples=1000)

    pyro.set_rng_seed(1)
    mcmc = MCMC(NUTS(regression), num_samples=300, warmup_steps=200, disable_progbar=True)
    mcmc.run(x, g, y)
    nuts = {k: v.numpy() for k, v in mcmc.get_samples().items()}

    vi = az.summary(idata, var_names=["a", "b", "sigma"], kind="stats")["mean"]
    ref = {
        **{f"a[{i}]": nuts["a"][:, i].mean() for i in range(3)},
        **{f"b[{i}]": nuts["b"][:, i].mean() for i in range(2)},
        "sigma": nuts["sigma"].mean(),
    }
    assert sorted(vi.index) == sorted(ref)
    diffs = {k: abs(vi[k] - ref[k]) for k in ref}
    assert max(diffs.values()) < 0.1, diffs

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loo = az.loo(idata, pointwise=True)
    shape_warnings = [str(w.message) for w in caught if "shape" in str(w.message).lower() and "pareto" not in str(w.message).lower()]
    assert not shape_warnings, shape_warnings
    assert not [r for r in caplog.records if "shape validation" in r.getMessage().lower()]
    elpd, pointwise = loo_pointwise(loo)
    assert pointwise.shape == (N,) and np.isfinite(elpd)


def test_plots_run():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    x, g, y = _data()
    guide = AutoNormal(regression)  # the plots need draws, not a good fit
    idata = to_inference_data(regression, guide, x, g, y, num_samples=100)
    az.plot_pair(idata, var_names=["b", "sigma"])
    from pyro_flowguide.diagnostics.plots import plot_pair

    fig = plot_pair({k: draws(idata.posterior[k]) for k in ("b", "sigma")}, reference=None)
    assert len(fig.axes) == 9
    assert [ax.get_xlabel() for ax in fig.axes[-3:]] == ["b[0]", "b[1]", "sigma"]
    matplotlib.pyplot.close("all")


def test_flow_guide_attrs_name_the_flow():
    x, g, y = _data()
    guide = pfg.AutoFlowGuide(regression)
    guide(x, g, y)
    idata = to_inference_data(regression, guide, x, g, y, num_samples=50)
    assert idata.attrs["guide"] == "AutoFlowGuide"
    (flow,) = [m for m in guide.modules() if isinstance(m, pfg.FlowTransform)]
    assert idata.attrs["flow"] == flow.spec.name == "SplineMAF"  # the default flow


def test_the_previous_argument_order_warns_and_gives_the_same_draws():
    x, g, y = _data()
    guide = AutoNormal(regression)
    guide(x, g, y)  # sets the guide up, so both calls below draw from the same seed
    pyro.set_rng_seed(0)
    new = to_inference_data(regression, guide, x, g, y, num_samples=30)
    pyro.set_rng_seed(0)
    with pytest.warns(DeprecationWarning, match="model first"):
        old = to_inference_data(guide, regression, x, g, y, num_samples=30)
    for name in ("a", "b", "sigma", "mu"):
        np.testing.assert_array_equal(old.posterior[name].values, new.posterior[name].values)
    np.testing.assert_array_equal(old.log_likelihood["y"].values, new.log_likelihood["y"].values)
    assert old.attrs["guide"] == new.attrs["guide"] == "AutoNormal"


def test_the_current_argument_order_does_not_warn():
    x, g, y = _data()
    guide = AutoNormal(regression)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = to_inference_data(regression, guide, x, g, y, num_samples=10)
    assert not [w for w in caught if "to_inference_data" in str(w.message)], [str(w.message) for w in caught]
    assert idata.posterior["a"].shape == (2, 5, 3)


def test_a_call_without_the_data_warns_that_nothing_is_observed():
    x, g, y = _data()
    pyro.clear_param_store()
    guide = AutoNormal(regression)
    guide(x, g, y)
    with pytest.warns(UserWarning, match="observes no site.*to_inference_data\\(model, guide, x, y\\)"):
        idata = to_inference_data(regression, guide, x, g, num_samples=20)
    assert "observed_data" not in group_names(idata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        to_inference_data(regression, guide, x, g, y, num_samples=20)
