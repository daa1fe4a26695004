"""The Gaussian stage that starts a fit of a fresh AutoFlowGuide."""

from __future__ import annotations

import warnings
from unittest.mock import patch

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.optim import Adam

import pyro_flowguide as pfg
from pyro_flowguide.examples import linear_regression, linear_regression_data
from pyro_flowguide.guides import warm_start
from pyro_flowguide.train.warm_start import gaussian_stage

torch.set_num_threads(1)


def _least_squares(x, y):
    design = torch.stack([torch.ones_like(x), x], -1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    resid = y - design @ coef
    return coef, float(resid.square().mean().sqrt())


def test_the_stage_reaches_a_posterior_pinned_far_from_the_start():
    # Intercept 9, 13 units from the prior-median start: Adam at fit's
    # schedule moves the location by about 5 units in a whole run.
    x, y = linear_regression_data(intercept=9.0)
    coef, noise = _least_squares(x, y)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression, warm_start=False)
    global_state = torch.get_rng_state()
    result = gaussian_stage(linear_regression, guide, (x, y), {})
    assert torch.equal(torch.get_rng_state(), global_state)  # the draws come from a fork
    assert result.accepted and result.after < result.before
    loc = guide.affine_loc.detach()
    # The Gaussian's marginal sds: scale_i times the norm of row i of the unit triangular factor.
    sd = guide.affine_scale.detach() * guide.affine_unit_tril.detach().norm(dim=-1)
    assert result.curvature == "kept"  # then the factor is the mean curvature's (nearly diagonal here)
    # Within a fraction of a posterior sd of least squares (it started 13 units, ~300 sds, away).
    design = torch.stack([torch.ones_like(x), x], -1)
    post_sd = noise * torch.linalg.inv(design.T @ design).diagonal().sqrt()
    assert ((loc[:2] - coef).abs() / post_sd).max() < 0.75
    # Posterior sds: about noise / sqrt(n) for the intercept, and about 0.1 for log(sigma).
    assert 0.5 < float(sd[0]) / (noise / x.numel() ** 0.5) < 1.5
    assert 0.07 < float(sd[2]) < 0.14


def test_fit_runs_the_stage_on_a_fresh_guide_only():
    x, y = linear_regression_data()
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = pfg.fit(linear_regression, guide, x, y, steps=20, progress=False, seed=0)
        again = pfg.fit(linear_regression, guide, x, y, steps=20, progress=False, seed=0)
        pyro.clear_param_store()
        off = pfg.fit(
            linear_regression, pfg.AutoFlowGuide(linear_regression), x, y, steps=20, progress=False, warm_start=False
        )
        pyro.clear_param_store()
        other = pfg.fit(linear_regression, AutoNormal(linear_regression), x, y, steps=20, progress=False)
    assert first.warm_start is not None and first.warm_start.accepted
    assert again.warm_start is None  # trained already: the fit continues from where it is
    assert off.warm_start is None
    assert other.warm_start is None  # no stage for Pyro's own guides


def test_a_stage_that_fails_leaves_the_guide_as_it_was():
    # A model that cannot run under vectorised particles (it reads a draw as a
    # Python number): the stage fails, says why, and restores the start.
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        pyro.sample("y", dist.Normal(float(mu) + 0.0 * mu, 1.0), obs=y)

    y = torch.tensor(3.0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(model)
    guide(y)
    before = guide.packed.detach().clone()
    result = gaussian_stage(model, guide, (y,), {})
    assert not result.accepted and result.reason
    assert torch.equal(guide.packed.detach(), before)
    assert guide.estimator in ("stl", "reparam") and guide.untrained


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_readme_fit_ends_at_the_posterior(seed):
    # Before the stage, fit's default run ended with the intercept's sd at
    # 0.7-1.1 (posterior: 0.04) and its median up to 0.4 away.
    x, y = linear_regression_data(seed=seed)
    coef, noise = _least_squares(x, y)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pfg.fit(linear_regression, guide, x, y, steps=300, progress=False)
    draws = guide.sample_posterior(4000, x, y)
    sd = noise / x.numel() ** 0.5
    assert abs(float(draws["a"].mean()) - float(coef[0])) < 0.5 * sd
    assert 0.8 < float(draws["a"].std()) / sd < 1.25


def test_without_flow_is_the_affine_stage_alone():
    x, y = linear_regression_data()
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression)
    guide(x, y)
    with torch.no_grad():  # move the flow off the identity: the two then differ
        guide.packed[guide.affine_mask().logical_not()] += 0.1
    with guide.without_flow():
        torch.manual_seed(0)
        alone = guide.get_posterior(x, y).sample((5,))
    torch.manual_seed(0)
    eps = torch.randn(5, guide.latent_dim)
    loc, scale, tril = guide.affine_loc.detach(), guide.affine_scale.detach(), guide.affine_unit_tril
    expected = loc + (eps @ tril.T) * scale if tril is not None else loc + eps * scale
    assert torch.allclose(alone, expected, atol=1e-5)
    torch.manual_seed(0)
    assert not torch.allclose(guide.get_posterior(x, y).sample((5,)), alone)


def test_the_stage_warns_about_nothing():
    # The README's fit runs the stage first: a user sees its warnings, so a
    # healthy stage (here the README's own data) must not raise any.
    x, y = linear_regression_data()
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide(x, y)  # the first call runs the stage
    assert guide.warm_start_result.accepted


@pytest.mark.parametrize("vectorized", [False, True])
def test_a_plain_svi_loop_starts_where_fit_does(vectorized):
    # Intercept 9, 13 units from the prior-median start: Adam at lr 0.01 moves
    # the location by about 0.01 a step, so 200 plain steps from the start
    # ended at a = 3.9 with sd 0.56 (posterior: 9.0, 0.05). The guide's first
    # call, inside the ELBO's trace (and its particle plate), runs the
    # Gaussian stage outside those handlers.
    x, y = linear_regression_data(intercept=9.0)
    coef, noise = _least_squares(x, y)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression)
    elbo = Trace_ELBO(num_particles=4 if vectorized else 1, vectorize_particles=vectorized, max_plate_nesting=1)
    svi = SVI(linear_regression, guide, Adam({"lr": 0.01}), elbo)
    for _ in range(200):
        svi.step(x, y)
    assert guide.warm_start_result is not None and guide.warm_start_result.accepted
    draws = guide.sample_posterior(4000, x, y)
    sd = noise / x.numel() ** 0.5
    assert abs(float(draws["a"].mean()) - float(coef[0])) < sd
    assert 0.7 < float(draws["a"].std()) / sd < 1.4


def test_the_first_call_hides_the_stage_and_keeps_the_random_state():
    x, y = linear_regression_data()
    traced = {}
    for warm_start in (None, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide = pfg.AutoFlowGuide(linear_regression, warm_start=warm_start)
        with pyro.plate("particles", 3, dim=-2):  # an outer plate of the caller's, as an ELBO's
            trace = poutine.trace(guide).get_trace(x, y)
        traced[warm_start] = (trace, torch.get_rng_state(), guide.warm_start_result)
    staged, plain = traced[None], traced[False]
    assert staged[2].accepted and plain[2] is None
    # The outer trace holds the guide's own sites only: none of the stage's evaluations.
    assert list(staged[0].nodes) == list(plain[0].nodes)
    assert staged[0].nodes["a"]["value"].shape == (3, 1)
    assert torch.equal(staged[1], plain[1])  # the stage's draws came from a fork


@pytest.mark.parametrize(
    "options", [{"init_scale": 0.5}, {"init_loc_fn": init_to_feasible}, {"warm_start": False}],
    ids=["init_scale", "init_loc_fn", "warm_start=False"],
)
def test_an_explicit_initialisation_is_honoured(options):
    x, y = linear_regression_data(intercept=9.0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression, **options)
    guide(x, y)
    assert guide.warm_start_result is None and guide.untrained
    assert float(guide.affine_loc.detach()[0]) < 1.0  # at the initial point, not near the posterior's 9
    assert torch.allclose(guide.affine_scale, torch.full((3,), options.get("init_scale", 1.0)))


def test_warm_start_true_stages_despite_an_explicit_initialisation():
    x, y = linear_regression_data(intercept=9.0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression, init_scale=0.5, warm_start=True)
    guide(x, y)
    assert guide.warm_start_result.accepted and abs(float(guide.affine_loc.detach()[0]) - 9.0) < 0.2


def test_a_member_of_a_guide_list_is_not_staged_alone():
    # The stage would fit this member against the model with the other
    # members' sites drawn from their priors.
    x, y = linear_regression_data()
    pyro.clear_param_store()
    guides = AutoGuideList(linear_regression)
    member = pfg.AutoFlowGuide(poutine.block(linear_regression, hide=["sigma"]))
    guides.append(member)
    guides.append(AutoDiagonalNormal(poutine.block(linear_regression, expose=["sigma"])))
    guides(x, y)
    assert member.warm_start_result is None


def test_warm_start_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="warm_start must be None, True or False"):
        pfg.AutoFlowGuide(linear_regression, warm_start="yes")


def test_a_kept_stage_becomes_the_location_unit_and_keeps_the_shift():
    x, y = linear_regression_data(intercept=9.0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression, warm_start=False)
    guide(x, y)
    assert torch.equal(guide._view("loc_unit").detach(), torch.ones(3))  # unstaged: the shift is loc itself
    scales = []
    with patch.object(warm_start, "curvature_stage", lambda model, guide, *a: scales.append(guide.affine_scale) or "x"):
        assert gaussian_stage(linear_regression, guide, (x, y), {}).accepted
    unit = guide._view("loc_unit").detach()
    torch.testing.assert_close(unit, scales[0].detach())
    torch.testing.assert_close(guide._view("loc").detach() * unit, guide.affine_loc.detach())
    assert abs(float(guide.affine_loc[0]) - 9.0) < 0.2
    guide.affine_loc = torch.tensor([1.0, 2.0, 3.0])  # assigning the shift writes it in units
    torch.testing.assert_close(guide.affine_loc.detach(), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(guide._view("loc").detach(), torch.tensor([1.0, 2.0, 3.0]) / unit)


@pytest.mark.parametrize("seed", [1, 5])
def test_adam_at_lr_01_keeps_a_sharp_posterior_after_the_stage(seed):
    # Pyro's test_deterministic: modes at x = +-2 of sd 0.025. Adam at 0.1 moves a
    # parameter by about lr per step; a location in absolute units circled the mode
    # by several sds (x**2's mean 3.35 and 4.74 on these seeds), in the stage's units by lr sds.
    def model(y=None):
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.deterministic("x2", x**2)
        pyro.sample("obs", dist.Normal(x**2, 0.1), obs=y)

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = pfg.AutoFlowGuide(model)
    svi = SVI(model, guide, Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(100):
        svi.step(torch.tensor(4.0))
    x2 = pyro.infer.Predictive(model, guide=guide, num_samples=1000, return_sites=["x2"])()["x2"]
    assert abs(float(x2.mean()) - 4.0) < 0.4



def test_after_the_stage_only_the_shift_and_the_flow_train():
    x, y = linear_regression_data()
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression)
    svi = SVI(linear_regression, guide, Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(x, y)
    scale, factor, shift = guide.affine_scale.detach(), guide.affine_unit_tril.detach(), guide.affine_loc.detach()
    svi.step(x, y)
    assert torch.equal(guide.affine_scale.detach(), scale) and torch.equal(guide.affine_unit_tril.detach(), factor)
    assert not torch.equal(guide.affine_loc.detach(), shift)


@pytest.mark.parametrize("options", [{"warm_start": False}, {"flow": None}])
def test_without_a_kept_stage_or_a_flow_the_affine_scale_trains(options):
    x, y = linear_regression_data()
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression, **options)
    svi = SVI(linear_regression, guide, Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(x, y)
    scale = guide.affine_scale.detach()
    svi.step(x, y)
    assert not torch.equal(guide.affine_scale.detach(), scale)



def _exchangeable_mixture(y):
    w = pyro.sample("w", dist.Beta(2.0, 2.0))[..., None]
    locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))[..., None]
    log_lik = torch.logaddexp(w.log() + dist.Normal(locs[..., :1], sigma).log_prob(y),
                              (-w).log1p() + dist.Normal(locs[..., 1:], sigma).log_prob(y))
    pyro.factor("lik", log_lik.sum(-1))


def test_the_curvature_is_not_held_where_a_gaussian_does_not_explain_the_posterior():
    """A label-switching mixture: the stage's Gaussian sits between the two modes, and PSIS sees it."""
    gen = torch.Generator().manual_seed(0)
    y = torch.where(torch.rand(200, generator=gen) < 0.4, -1.5, 1.5) + torch.randn(200, generator=gen)
    guide = pfg.AutoFlowGuide(_exchangeable_mixture)
    guide(y)
    assert guide.warm_start_result.accepted
    assert guide.warm_start_result.curvature.startswith("the Gaussian does not explain the posterior (PSIS k-hat")
    assert torch.equal(guide.affine_unit_tril.detach(), torch.eye(4))  # the diagonal stage's Gaussian
    locs = guide.affine_loc.detach()[1:3]
    assert (locs - y.mean()).abs().max() < 0.5  # between the modes at -1.5 and 1.5
    pyro.clear_param_store()
    with patch.object(warm_start, "CURVATURE_MAX_KHAT", float("inf")):
        guide = pfg.AutoFlowGuide(_exchangeable_mixture)
        guide(y)
    assert guide.warm_start_result.curvature == "kept"  # without the check, it would be held there
