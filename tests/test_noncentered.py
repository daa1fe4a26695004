"""AutoFlowGuide's non-centred coordinates: which sites, the density, the API, a funnel solved."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide.initialization import init_to_median

import pyro_flowguide as pfg
from pyro_flowguide import AutoFlowGuide, GuideSetupError
from pyro_flowguide.examples import EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y, eight_schools_centered

SMALL = {"hidden_features": (16, 16), "transforms": 2}
Y, SIGMA = EIGHT_SCHOOLS_Y, EIGHT_SCHOOLS_SIGMA


def schools(sigma):
    """:func:`~pyro_flowguide.examples.eight_schools_centered` with other standard errors."""

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", 8):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=Y)

    return model


def funnel():
    # a ~ N(0, 1), b_i | a ~ N(2a, exp(a/2)): no data, so the posterior is the
    # prior, exactly N(0, I) in the coordinates (a, (b - 2a) / exp(a/2)).
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("p", 3):
        pyro.sample("b", dist.Normal(2 * a, torch.exp(a / 2)))


def mixed():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("p", 3):
        b = pyro.sample("b", dist.Normal(2 * a, torch.exp(a / 2)))
    c = pyro.sample("c", dist.LogNormal(b.sum(-1), 1.0))
    pyro.sample("obs", dist.Normal(c, 1.0), obs=torch.tensor(1.0))


def test_auto_picks_normal_sites_that_follow_other_latents():
    # theta's prior follows mu and tau, and the data are weak next to it.
    guide = AutoFlowGuide(eight_schools_centered, **SMALL)
    guide()
    assert guide.noncentered_sites == ("theta",)
    pyro.clear_param_store()
    # b follows a; c follows b but is not a Normal; a's prior is fixed.
    guide = AutoFlowGuide(mixed, **SMALL)
    guide()
    assert guide.noncentered_sites == ("b",)


def test_auto_keeps_sites_centred_where_the_data_dominate():
    # Standard errors 20x smaller: each theta is pinned by its datum, the
    # centred posterior is the near-Gaussian one.
    guide = AutoFlowGuide(schools(SIGMA / 20), **SMALL)
    guide()
    assert guide.noncentered_sites == ()


def test_auto_choice_does_not_depend_on_the_rng_state():
    # A guide rebuilt to load saved parameters must pick the same coordinates.
    choices = set()
    for seed in range(4):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoFlowGuide(schools(SIGMA / 3), **SMALL)
        guide()
        choices.add(guide.noncentered_sites)
    assert len(choices) == 1, choices


def test_noncentered_false_and_explicit_list():
    guide = AutoFlowGuide(mixed, noncentered=False, **SMALL)
    guide()
    assert guide.noncentered_sites == ()
    pyro.clear_param_store()
    guide = AutoFlowGuide(schools(SIGMA / 20), noncentered=["theta"], **SMALL)
    guide()
    assert guide.noncentered_sites == ("theta",)


@pytest.mark.parametrize(
    "choice, words",
    [(["nope"], ["'nope'", "not a latent site", "'a'"]), (["c"], ["'c'", "LogNormal", "Normal"])],
)
def test_explicit_list_is_checked(choice, words):
    guide = AutoFlowGuide(mixed, noncentered=choice, **SMALL)
    with pytest.raises(GuideSetupError) as info:
        guide()
    for word in words:
        assert word in str(info.value)


def test_bad_option_is_refused():
    with pytest.raises(ValueError, match="noncentered must be"):
        AutoFlowGuide(mixed, noncentered="yes")


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("particles", [None, 7])
def test_values_and_log_density(particles, float64):
    """z = m + s v for the non-centred site, and log q(z) = log q(v) - sum log s - log-Jacobians."""
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(mixed, estimator="reparam", **SMALL)
    with torch.no_grad():
        guide()
        guide.packed.add_(0.1 * torch.randn_like(guide.packed))
    with torch.no_grad():
        if particles:
            with pyro.plate("particles", particles, dim=-2):
                trace = poutine.trace(guide).get_trace()
        else:
            trace = poutine.trace(guide).get_trace()
        trace.compute_log_prob()
        sites = {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and n != "p"}
        (aux,) = [n for n in sites if n.startswith("_")]
        v = sites[aux]["value"]
        lead = v.shape[:-1]
        total = sum(s["log_prob"].reshape(lead + (-1,)).sum(-1) for s in sites.values())
        a = sites["a"]["value"].reshape(lead)
        b = sites["b"]["value"].reshape(lead + (3,))
        c = sites["c"]["value"].reshape(lead)
        assert torch.allclose(b, 2 * a[..., None] + torch.exp(a / 2)[..., None] * v[..., 1:4])
        assert torch.allclose(c, v[..., 4].exp())
        by_hand = guide.get_posterior().log_prob(v) - 3 * a / 2 - c.log()
        assert total.dtype == torch.float64
        assert torch.allclose(total, by_hand, rtol=0, atol=1e-10)


def test_init_is_the_models_init():
    guide = AutoFlowGuide(mixed, init_scale=1e-6, **SMALL)
    pyro.set_rng_seed(0)
    guide()
    proto = {n: s["value"] for n, s in guide.prototype_trace.iter_stochastic_nodes()}
    with torch.no_grad():
        med = guide.median()
    for name in ("a", "b", "c"):
        assert torch.allclose(med[name], proto[name], atol=1e-4), name


def test_init_strategy_runs_at_set_up_only():
    # The model run that maps non-centred draws to sites takes every value from
    # the guide: neither a step nor a summary calls init_loc_fn (init_to_median
    # would draw prior samples, costing time and moving the RNG stream).
    calls = []

    def init(site):
        calls.append(site["name"])
        return init_to_median(site)

    pyro.clear_param_store()
    guide = AutoFlowGuide(funnel, init_loc_fn=init, **SMALL)
    guide()
    assert guide.noncentered_sites == ("b",) and calls
    done = len(calls)
    svi = pyro.infer.SVI(funnel, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi.step()
    guide.sample_posterior(5)
    assert len(calls) == done


def test_a_copied_or_pickled_guide_keeps_its_model():
    import copy
    import pickle

    pyro.clear_param_store()
    guide = AutoFlowGuide(funnel, **SMALL)
    guide()
    copy.deepcopy(guide)
    pickle.dumps(guide)
    # The guide itself still runs its model (non-centred sites need it).
    assert guide.model is not None
    assert guide.sample_posterior(4)["b"].shape == (4, 3)
    svi = pyro.infer.SVI(funnel, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    assert math.isfinite(svi.step())


@pytest.mark.slow
def test_api_draws_quantiles_predictive_and_reload(tmp_path):
    pyro.clear_param_store()
    guide = AutoFlowGuide(funnel, **SMALL)
    pfg.fit(funnel, guide, steps=20, progress=False, seed=0)
    pyro.set_rng_seed(3)
    draws = guide.sample_posterior(500)
    assert draws["a"].shape == (500,) and draws["b"].shape == (500, 3)
    q = guide.quantiles([0.25, 0.5, 0.75])
    assert q["b"].shape == (3, 3)
    # Quantiles of b are b's own (taken after the map to z), not v's mapped.
    assert torch.allclose(q["b"][1], draws["b"].median(0).values, atol=0.35)
    pred = Predictive(funnel, guide=guide, num_samples=9, parallel=True)()
    assert pred["b"].shape == (9, 3)

    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.set_rng_seed(5)
    before = guide.sample_posterior(10)["b"]
    pyro.clear_param_store()
    fresh = AutoFlowGuide(funnel, **SMALL)
    fresh()
    fresh.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    pyro.get_param_store().load(tmp_path / "params.pt")
    assert fresh.noncentered_sites == ("b",)
    pyro.set_rng_seed(5)
    assert torch.equal(fresh.sample_posterior(10)["b"], before)


def test_hidden_latent_turns_auto_off_and_refuses_a_list():
    # tau is blocked (another guide would cover it): this guide's run of the
    # model would draw tau from its prior, so theta's location and scale are
    # not functions of this guide's latents.
    blocked = poutine.block(eight_schools_centered, hide=["tau"])
    guide = AutoFlowGuide(blocked, **SMALL)
    with pytest.warns(UserWarning, match="randomness this guide does not see"):
        guide()
    assert guide.noncentered_sites == ()
    pyro.clear_param_store()
    guide = AutoFlowGuide(blocked, noncentered=["theta"], **SMALL)
    with pytest.raises(GuideSetupError, match="noncentered=False"):
        guide()


@pytest.mark.slow
def test_funnel_is_exact_in_noncentred_coordinates():
    """A Gaussian guide (no flow) fits the funnel exactly non-centred, and cannot centred."""
    torch.set_num_threads(1)
    results = {}
    for choice in ("auto", False):
        pyro.clear_param_store()
        guide = AutoFlowGuide(funnel, flow=None, noncentered=choice)
        pfg.fit(funnel, guide, steps=1500, seed=0, progress=False)
        pyro.set_rng_seed(1)
        psis = pfg.psis_diagnostic(funnel, guide, num_samples=4000)
        draws = guide.sample_posterior(40000)["b"]
        results[choice] = (psis.khat, draws)
        print(choice, guide.noncentered_sites, f"k-hat {psis.khat:.3f}")
    khat, draws = results["auto"]
    assert khat < 0.2, khat
    # b_i has mean 0 and variance 4 + E[exp(a)] = 4 + e^(1/2).
    assert draws.mean(0).abs().max() < 0.05
    assert (draws.var(0) / (4 + math.exp(0.5)) - 1).abs().max() < 0.05
    assert results[False][0] > 0.5, results[False][0]
