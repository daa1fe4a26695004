"""AutoFlowGuide as a drop-in for Pyro's autoguides: NeuTra, summaries, attributes and parameter names."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_median, init_to_sample
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.reparam import NeuTraReparam
from torch.distributions import Transform

from pyro_flowguide import AutoFlowGuide
from pyro_flowguide.examples import eight_schools_centered, funnel10
from pyro_flowguide.guides.sites import GuideSetupError


def _model_a():
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z.sum(), 0.5), obs=torch.tensor(1.0))


def _model_b():
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(w.sum(), s), obs=torch.tensor(-1.0))


def _model_c():  # the same sites and sizes as _model_a, another posterior
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z[0] - z[1], 0.5), obs=torch.tensor(2.0))


def _perturbed(model, seed=0, **options):
    """A set-up guide away from its initial (identity) parameters."""
    pyro.set_rng_seed(seed)
    guide = AutoFlowGuide(model, **options)
    guide()
    with torch.no_grad():
        guide.packed.add_(0.1 * torch.randn_like(guide.packed))
    return guide


def _train(model, guide, steps=15):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    return [svi.step() for _ in range(steps)]


# ----------------------------------------------------------------- NeuTra
def test_get_transform_is_one_transform_that_neutra_accepts():
    pyro.clear_param_store()
    guide = _perturbed(_model_b)
    transform = guide.get_transform()
    assert isinstance(transform, Transform)
    neutra = NeuTraReparam(guide)
    trace = poutine.trace(poutine.reparam(_model_b, config=lambda _: neutra)).get_trace()
    assert {"s_shared_latent", "s", "w"} <= set(trace.nodes)


@pytest.mark.parametrize("model", [funnel10, eight_schools_centered])
def test_neutra_density_is_the_models_plus_the_log_jacobian(model):
    pyro.clear_param_store()
    guide = _perturbed(model)
    assert guide.noncentered_sites  # the map ends in the model's centred coordinates
    first = next(name for name, _ in guide.prototype_trace.iter_stochastic_nodes())
    neutra = NeuTraReparam(guide)
    reparam = poutine.reparam(model, config=lambda _: neutra)
    _, potential_reparam, _, _ = initialize_model(reparam)
    _, potential, _, _ = initialize_model(model)

    def flat_map(z):
        return guide.get_transform()(z)

    torch.manual_seed(1)
    for z in torch.randn(4, guide.latent_dim):
        x = flat_map(z)
        sites = {site["name"]: value for site, value in guide._unpack_latent(x.detach())}
        log_jacobian = torch.linalg.slogdet(torch.autograd.functional.jacobian(flat_map, z))[1]
        expected = -potential(sites) + log_jacobian
        actual = -potential_reparam({f"{first}_shared_latent": z})
        torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("model", [funnel10, eight_schools_centered, _model_b])
def test_neutra_transform_sample_gives_the_guides_draws(model):
    pyro.clear_param_store()
    guide = _perturbed(model)
    neutra = NeuTraReparam(guide)
    poutine.trace(poutine.reparam(model, config=lambda _: neutra)).get_trace()
    torch.manual_seed(3)
    eps = guide.get_base_dist().sample((6,))
    # Batch dims go left of every plate (NeuTraReparam.transform_sample's rule).
    nesting = max((-f.dim for f in guide._prototype_frames.values()), default=0)
    mapped = neutra.transform_sample(eps.reshape((6,) + (1,) * nesting + eps.shape[-1:]))
    torch.manual_seed(3)
    drawn = guide.sample_posterior(6)
    for name, value in drawn.items():
        torch.testing.assert_close(mapped[name].reshape(value.shape), value, rtol=1e-5, atol=1e-5)


def test_get_transform_inverts_the_centring():
    pyro.clear_param_store()
    guide = _perturbed(eight_schools_centered)
    transform = guide.get_transform()
    z = torch.randn(5, guide.latent_dim)
    x = transform(z)
    torch.testing.assert_close(transform.inv(x), z, rtol=1e-4, atol=1e-4)
    ladj = transform.log_abs_det_jacobian(z, x)
    assert ladj.shape == (5,)
    torch.testing.assert_close(transform.inv.log_abs_det_jacobian(x, transform.inv(x)), -ladj, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------- summaries
def test_median_is_quantile_half_repeatable_and_leaves_the_rng_alone():
    pyro.clear_param_store()
    guide = _perturbed(eight_schools_centered)
    state = torch.get_rng_state()
    first = guide.median()
    again = guide.median()
    halves = guide.quantiles([0.5])
    assert torch.equal(torch.get_rng_state(), state)
    for name in first:
        assert torch.equal(first[name], again[name])
        assert torch.equal(first[name], halves[name][0])
    wide = guide.quantiles([0.1, 0.5, 0.9])
    for name in first:
        assert torch.equal(wide[name][1], first[name])
        assert (wide[name][0] <= wide[name][2]).all()


def _plated(n):
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(5), torch.eye(5)))
        with pyro.plate("plate", n):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    return model


def test_median_at_set_up_is_the_initial_point():
    # The guide starts as a Gaussian about its initial point, so its median
    # there is that point: the summary draws come in antithetic pairs.
    pyro.clear_param_store()
    torch.manual_seed(4)
    inits = {"x": torch.randn(()), "y": torch.randn(5), "z": torch.randn(3)}
    guide = AutoFlowGuide(_plated(3), init_loc_fn=lambda site: inits[site["name"]])
    guide()
    median = guide.median()
    for name, value in inits.items():
        torch.testing.assert_close(median[name], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("plate_size", [3, 100])  # the full flow, the structured posterior
@pytest.mark.parametrize("init_scale", [0.1, 1e-4])
def test_loc_scale_estimates_the_unconstrained_mean_and_sd(plate_size, init_scale):
    pyro.clear_param_store()
    guide = AutoFlowGuide(_plated(plate_size), init_scale=init_scale)
    guide()
    assert (guide.structured is not None) == (plate_size == 100)
    loc, scale = guide._loc_scale()
    assert loc.shape == scale.shape == (6 + plate_size,)
    init = torch.cat([guide.median()[name].reshape(-1) for name in ("x", "y", "z")])
    torch.testing.assert_close(loc, init, rtol=0, atol=0.1 * init_scale)
    rms = scale.pow(2).mean().sqrt().item()
    assert 0.9 * init_scale < rms < 1.1 * init_scale
    again = guide._loc_scale()
    assert torch.equal(again[0], loc) and torch.equal(again[1], scale)


# ------------------------------------------------------------- attributes
@pytest.mark.parametrize("name", ["loc", "scale", "scale_tril"])
def test_gaussian_attributes_say_what_to_use(name):
    pyro.clear_param_store()
    guide = _perturbed(_model_a)
    with pytest.raises(AttributeError) as info:
        getattr(guide, name)
    message = str(info.value)
    for word in ("AutoMultivariateNormal", "quantiles", "sample_posterior", "get_posterior", "affine_loc"):
        assert word in message
    assert not hasattr(guide, name)
    with pytest.raises(AttributeError, match="AutoMultivariateNormal"):  # nor set as a plain attribute
        setattr(guide, name, torch.ones(guide.latent_dim))


def test_affine_stage_accessors():
    pyro.clear_param_store()
    guide = AutoFlowGuide(_model_b, init_scale=0.3)
    guide()
    dim = guide.latent_dim
    assert guide.affine_loc.shape == (dim,)
    torch.testing.assert_close(guide.affine_scale, torch.full((dim,), 0.3))
    torch.testing.assert_close(guide.affine_unit_tril, torch.eye(dim))
    guide.affine_scale = torch.full((dim,), 0.5)
    torch.testing.assert_close(guide.affine_scale, torch.full((dim,), 0.5))


# -------------------------------------------------------- parameter names
@pytest.mark.parametrize("second", [_model_b, _model_c], ids=["other_size", "same_size"])
def test_two_guides_share_one_param_store(second):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    first = AutoFlowGuide(_model_a)
    _train(_model_a, first)
    kept = first.packed.detach().clone()
    pyro.set_rng_seed(1)
    other = AutoFlowGuide(second)
    losses = _train(second, other)
    assert first.packed_param_name != other.packed_param_name
    assert {first.packed_param_name, other.packed_param_name} <= set(pyro.get_param_store().keys())
    assert first.packed is not other.packed
    assert torch.equal(first.packed.detach(), kept)  # untouched by the second guide's training
    assert all(map(lambda v: torch.isfinite(torch.tensor(v)), losses))
    _train(_model_a, first, steps=3)  # the first guide trains on after the second
    assert not torch.equal(first.packed.detach(), kept)


def test_the_name_follows_the_layout_not_the_instance():
    pyro.clear_param_store()
    one, two = AutoFlowGuide(_model_a), AutoFlowGuide(_model_a)
    one(), two()
    assert one.packed_param_name == two.packed_param_name
    assert one.packed_param_name.startswith("AutoFlowGuide.packed_")
    diagonal = AutoFlowGuide(_model_a, covariance="diagonal")
    diagonal()
    assert diagonal.packed_param_name != one.packed_param_name


def test_param_store_save_and_load_restore_the_guide(tmp_path):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(_model_b)
    _train(_model_b, guide)
    torch.manual_seed(5)
    before = guide.sample_posterior(4)
    path = tmp_path / "store.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)
    pyro.set_rng_seed(9)  # the new guide's own initial values differ
    fresh = AutoFlowGuide(_model_b)
    fresh()
    torch.manual_seed(5)
    after = fresh.sample_posterior(4)
    for name in before:
        assert torch.equal(before[name], after[name])


def test_a_wrong_shaped_parameter_under_the_guides_name_is_refused():
    pyro.clear_param_store()
    guide = AutoFlowGuide(_model_a)
    guide()
    name = guide.packed_param_name
    pyro.clear_param_store()
    pyro.param(name, torch.zeros(3))
    with pytest.raises(GuideSetupError, match="clear_param_store"):
        AutoFlowGuide(_model_a)()


def test_the_name_is_the_same_in_another_process():
    """A store saved by one process is found by the next: the name uses no addresses or hash seeds."""
    pyro.clear_param_store()
    guide = AutoFlowGuide(eight_schools_centered)
    guide()
    code = (
        "from pyro_flowguide import AutoFlowGuide\n"
        "from pyro_flowguide.examples import eight_schools_centered\n"
        "g = AutoFlowGuide(eight_schools_centered)\n"
        "g()\n"
        "print(g.packed_param_name)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == guide.packed_param_name


def test_jit_elbo_trains_a_one_dimensional_latent():
    # One coordinate takes the batched-autograd score (no closed form), which
    # used vmap, and vmap cannot be traced.
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=torch.tensor(0.8))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, estimator="stl")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.JitTrace_ELBO())
    losses = [svi.step() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))


def _serialization_model():
    pyro.sample("x", dist.Normal(0.0, 1.0))
    with pyro.plate("plate", 2):
        pyro.sample("y", dist.LogNormal(0.0, 1.0))
        pyro.sample("z", dist.Beta(2.0, 2.0))


def test_traced_guide_exports_with_torch_jit_save(tmp_path):
    # The packed parameter's unpacking and the spline's closed-form gradient
    # are custom autograd nodes, which a traced graph cannot export.
    pyro.clear_param_store()
    guide = AutoFlowGuide(_serialization_model)
    guide()
    pyro.set_rng_seed(0)
    expected = guide.call()
    params = {k: v.detach().clone() for k, v in guide.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace_module(guide, {"call": ()}, check_trace=False)
    torch.jit.save(traced, tmp_path / "guide.pt")
    pyro.clear_param_store()
    loaded = torch.jit.load(tmp_path / "guide.pt")
    pyro.set_rng_seed(0)
    actual = loaded.call()
    assert len(actual) == len(expected) == 3
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    assert {k: v for k, v in loaded.named_parameters()}.keys() == params.keys()
    for name, value in loaded.named_parameters():
        assert torch.equal(value, params[name]), name


def test_jit_elbo_gives_the_same_gradient_as_the_eager_elbo():
    # Under tracing the spline runs Zuko's own operations: the same loss and
    # the same sticking-the-landing gradient as the closed-form node.
    def grads(elbo):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide = AutoFlowGuide(_model_b)
        guide()
        for _ in range(2):  # the first JIT call traces, the second runs the trace
            pyro.set_rng_seed(2)
            pyro.get_param_store().get_param(guide.packed_param_name).grad = None
            loss = elbo.loss_and_grads(_model_b, guide)
        return loss, pyro.get_param_store().get_param(guide.packed_param_name).grad.clone()

    loss, grad = grads(Trace_ELBO())
    jit_loss, jit_grad = grads(pyro.infer.JitTrace_ELBO())
    assert jit_loss == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(jit_grad, grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", [init_to_feasible, init_to_median, init_to_sample], ids=lambda f: f.__name__)
def test_discrete_and_sphere_sites_get_pyros_pointers(init):
    # The pointers Pyro's own guides give: the enumeration tutorial, and the
    # reparameteriser that turns a sphere into an unconstrained site.
    def discrete():
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        pyro.sample("x", dist.Bernoulli(p))

    def sphere():
        x = pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        y = pyro.sample("y", dist.ProjectedNormal(x))
        pyro.sample("obs", dist.Normal(y, 1).to_event(1), obs=torch.tensor([1.0, 0.0]))

    with pytest.raises(GuideSetupError, match=r"'x'.*discrete.*enumeration\.html"):
        AutoFlowGuide(discrete, init_loc_fn=init)()
    with pytest.raises(GuideSetupError, match=r"'y'.*Sphere.*ProjectedNormalReparam"):
        AutoFlowGuide(sphere, init_loc_fn=init)()
    # The advice works: reparametrised, the model trains.
    from pyro.infer.reparam import ProjectedNormalReparam

    pyro.clear_param_store()
    reparam = poutine.reparam(sphere, config={"y": ProjectedNormalReparam()})
    svi = SVI(reparam, AutoFlowGuide(reparam), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert all(math.isfinite(svi.step()) for _ in range(3))


def test_flow_posterior_moments_are_a_named_error():
    pyro.clear_param_store()
    guide = AutoFlowGuide(_model_a)
    guide()
    posterior = guide.get_posterior()
    for moment in ("mean", "variance"):
        with pytest.raises(NotImplementedError, match="no closed form.*sample_posterior"):
            getattr(posterior, moment)


def test_draws_for_a_seed_do_not_depend_on_a_shape_check():
    # New argument shapes make the guide trace the model once to check its
    # latents; that trace must not consume the caller's random stream.
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=x)

    pyro.clear_param_store()
    guide = AutoFlowGuide(model)
    guide(torch.zeros(3))
    pyro.set_rng_seed(4)
    checked = guide(torch.zeros(5))["z"]  # other shapes: the check runs
    pyro.set_rng_seed(4)
    again = guide(torch.zeros(5))["z"]  # the same shapes: no check
    assert torch.equal(checked, again)


def test_enumerated_model_sets_up_with_init_to_feasible():
    # init_to_feasible has no point of a discrete support; the enumerated site
    # is the model's, so the guide over the continuous sites must still set up.
    from pyro.infer import TraceEnum_ELBO

    from pyro_flowguide.examples import GAUSSIAN_MIXTURE_DATA, gaussian_mixture

    pyro.clear_param_store()
    guide = AutoFlowGuide(poutine.block(gaussian_mixture, hide=["assignment"]), init_loc_fn=init_to_feasible)
    svi = SVI(gaussian_mixture, guide, pyro.optim.Adam({"lr": 0.01}), TraceEnum_ELBO(max_plate_nesting=1))
    assert math.isfinite(svi.step(GAUSSIAN_MIXTURE_DATA))
