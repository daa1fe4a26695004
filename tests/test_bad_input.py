"""Bad input gets a named error: flow options, data, initial values, changed models, sizes (issue 32).

Each test asserts the error type and that the message names the site or the option.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value

from pyro_flowguide import AutoFlowGuide
from pyro_flowguide._zuko import zuko
from pyro_flowguide.flows.registry import (
    FlowOptionError,
    accepted_options,
    check_hyper,
    estimate_flow_parameters,
    flow_names,
    get_flow,
    resolve_flow,
)
from pyro_flowguide.guides import sizes
from pyro_flowguide.guides.sites import (
    GuideSetupError,
    TraceSignature,
    check_finite_at_init,
    check_latent_names,
    check_stable_sites,
    find_bad_data,
    named_setup_errors,
)
from pyro_flowguide.transforms import flow_transform



def regression(x, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a * x, s), obs=y)


def simplex_model():
    pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    pyro.sample("u", dist.Uniform(0.0, 1.0))


def nan_factor_model():
    pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.factor("penalty", torch.tensor(float("nan")))


@pytest.fixture
def data():
    torch.manual_seed(0)
    return torch.randn(50), torch.randn(50)


def with_nans(t, n=3):
    t = t.clone()
    t[:n] = float("nan")
    return t


# ------------------------------------------------------- A: flow options
BAD_OPTIONS = [
    ("SplineMAF", {"bogus": 1}, "bogus"),
    ("MAF", {"bins": 8}, "bins"),
    ("SplineMAF", {"hidden_features": (0,)}, "hidden_features"),
    ("SplineMAF", {"bins": -3}, "bins"),
    ("NSF", {"hidden_features": "64"}, "hidden_features"),
    ("SplineMAF", {"transforms": 0}, "transforms"),
    ("MAF", {"transforms": -1}, "transforms"),
    ("RealNVP", {"randmask": "yes"}, "randmask"),
    ("CNF", {"transforms": 3}, "transforms"),
]


@pytest.mark.parametrize("flow, hyper, option", BAD_OPTIONS)
def test_bad_option_named_before_zuko(flow, hyper, option):
    with pytest.raises(FlowOptionError, match=option) as info:
        check_hyper(get_flow(flow), hyper)
    assert get_flow(flow).name in str(info.value)
    # Density estimation builds through flow_transform: the same check, for names and classes.
    with pytest.raises(FlowOptionError, match=option):
        flow_transform(flow, features=2, direction="density", **hyper)
    with pytest.raises(FlowOptionError, match=option):
        flow_transform(get_flow(flow).build, features=2, **hyper)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(FlowOptionError) as info:
        check_hyper(get_flow("MAF"), {"bins": 8})
    message = str(info.value)
    assert "'MAF'" in message and "NSF" in message  # where bins belongs
    for name in accepted_options(get_flow("MAF")):
        assert name in message
    with pytest.raises(FlowOptionError, match="hidden_features"):  # a close match is suggested
        check_hyper(get_flow("NSF"), {"hiden_features": (8,)})


def test_bad_option_is_a_type_and_a_value_error():
    assert issubclass(FlowOptionError, TypeError) and issubclass(FlowOptionError, ValueError)


@pytest.mark.parametrize("name", flow_names())
def test_every_family_accepts_its_defaults_and_network_options(name):
    spec = get_flow(name)
    options = accepted_options(spec)
    assert set(spec.defaults) <= set(options)
    assert "hidden_features" in options and "activation" in options
    check_hyper(spec, {**spec.defaults, "hidden_features": (8, 8), "activation": torch.nn.ELU})


@pytest.mark.parametrize("flow, hyper, option", BAD_OPTIONS[:7])
def test_guide_names_bad_option_at_set_up(flow, hyper, option, data):
    x, y = data
    with pytest.raises(FlowOptionError, match=option):  # at construction once flow_guide calls check_hyper
        AutoFlowGuide(regression, flow, **hyper)(x, y)


def test_guide_names_bad_option_at_construction():
    with pytest.raises(FlowOptionError, match="bogus"):
        AutoFlowGuide(regression, bogus=1)


def test_options_given_to_no_flow_are_named():
    with pytest.raises(FlowOptionError, match="hidden_features"):
        resolve_flow(None).check_hyper({"hidden_features": (8,)})
    resolve_flow(None).check_hyper({})
    resolve_flow("MAF").check_hyper({"transforms": 2})


# ------------------------------------------------ B: data, initial values
@pytest.mark.parametrize(
    "init, site",
    [
        ({"s": torch.tensor(-1.0)}, "s"),
        ({"s": torch.tensor(0.0)}, "s"),  # on the boundary: the unconstrained coordinate is -inf
        ({"a": torch.tensor(float("nan"))}, "a"),
        ({"a": torch.zeros(3)}, "a"),  # wrong shape
    ],
)
def test_bad_initial_value_names_the_site(init, site, data):
    guide = AutoFlowGuide(regression, init_loc_fn=init_to_value(values=init))
    with pytest.raises(GuideSetupError, match=f"initial value of latent site '{site}'"):
        guide(*data)


@pytest.mark.parametrize("init, site", [({"u": torch.tensor(2.0)}, "u"), ({"p": torch.tensor([0.5, 0.6, 0.1])}, "p")])
def test_initial_value_outside_support_names_the_support(init, site):
    guide = AutoFlowGuide(simplex_model, init_loc_fn=init_to_value(values=init))
    with pytest.raises(GuideSetupError, match=f"'{site}'.*outside the support"):
        guide()


def test_broadcastable_initial_value_is_expanded():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = AutoFlowGuide(model, init_loc_fn=init_to_value(values={"z": torch.tensor(0.5)}), hidden_features=(8,))
    assert guide()["z"].shape == (3,)


@pytest.mark.parametrize(
    "which, expected",
    [
        ("y", r"observed site 'y'.*3 NaN values of 50"),
        ("x", r"observed site 'y'.*loc has 3 NaN values of 50.*argument 'x' has 3 NaN values of 50"),
        ("factor", r"factor site 'penalty'.*1 NaN value of 1"),
    ],
)
def test_non_finite_data_named(which, expected, data):
    x, y = data
    model, args = {"y": (regression, (x, with_nans(y))), "x": (regression, (with_nans(x), y))}.get(
        which, (nan_factor_model, ())
    )
    assert find_bad_data(model, args, {}) is not None
    with pytest.raises(GuideSetupError, match=expected):
        with named_setup_errors(model, model.__name__, args, {}):
            poutine.trace(model).get_trace(*args).log_prob_sum()


def test_named_setup_errors_passes_other_errors(data):
    with pytest.raises(KeyError):
        with named_setup_errors(regression, "regression", data, {}):
            raise KeyError("unrelated")
    with pytest.raises(RuntimeError, match="unrelated"):  # finite data: the original error stands
        with named_setup_errors(regression, "regression", data, {}):
            raise RuntimeError("unrelated")


def test_finite_check_counts_non_finite_data(data):
    x, y = data
    with pyro.validation_enabled(False):
        with pytest.raises(GuideSetupError, match=r"site 'y'.*3 NaN values of 50"):
            check_finite_at_init(regression, "regression", (x, with_nans(y)), {})


def test_guide_names_non_finite_observed_value(data):
    x, y = data
    with pytest.raises(GuideSetupError, match=r"observed site 'y'.*3 NaN values of 50"):
        AutoFlowGuide(regression, hidden_features=(8,))(x, with_nans(y))


@pytest.mark.parametrize("which", ["x", "factor"])
def test_guide_names_non_finite_covariate_or_factor(which, data):
    x, y = data
    model, args = {"y": (regression, (x, with_nans(y))), "x": (regression, (with_nans(x), y))}.get(
        which, (nan_factor_model, ())
    )
    with pytest.raises(GuideSetupError, match="argument 'x' has 3 NaN|'penalty'"):
        AutoFlowGuide(model, hidden_features=(8,))(*args)


# ----------------------------------------------------- C: changed models
def sized(n, extra=False):
    z = pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))
    if extra:
        pyro.sample("w", dist.Normal(0.0, 1.0))
    pyro.sample("obs", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.0))


def trace_of(model, *args, **kwargs):
    return poutine.trace(model).get_trace(*args, **kwargs)


def test_signature_names_changed_shape():
    signature = TraceSignature.of(trace_of(sized, 3))
    signature.check(trace_of(sized, 3), "sized")
    with pytest.raises(GuideSetupError, match=r"'z'.*\(3,\).*\(5,\)"):
        signature.check(trace_of(sized, 5), "sized")


def test_signature_names_new_latent():
    signature = TraceSignature.of(trace_of(sized, 3))
    with pytest.raises(GuideSetupError, match="latent site 'w'"):
        signature.check(trace_of(sized, 3, extra=True), "sized")
    with pytest.raises(GuideSetupError, match="latent site 'w'.*not drawn"):
        TraceSignature.of(trace_of(sized, 3, extra=True)).check(trace_of(sized, 3), "sized")


def test_signature_lets_observed_site_become_latent(data):
    x, y = data
    signature = TraceSignature.of(trace_of(regression, x, y))
    signature.check(trace_of(regression, x, None), "regression")  # predictions: y drawn by the model


def branching():
    c = pyro.sample("c", dist.Normal(0.0, 1.0))
    if c > 0:
        pyro.sample("b", dist.Normal(0.0, 1.0))


def test_stochastic_control_flow_named():
    up = poutine.condition(branching, data={"c": torch.tensor(1.0)})
    down = poutine.condition(branching, data={"c": torch.tensor(-1.0)})
    check_latent_names(["b"], trace_of(up), "branching")  # c is observed when conditioned
    with pytest.raises(GuideSetupError, match="'b'.*stochastic control flow"):
        check_latent_names(["b"], trace_of(down), "branching")
    pyro.set_rng_seed(0)
    prototype = next(t for t in (trace_of(branching) for _ in range(50)) if "b" in t.nodes)  # c and b latent
    with pytest.raises(GuideSetupError, match="'b'"):
        check_stable_sites(branching, prototype, "branching", (), {}, runs=20)


def dependent_support(y=None):
    b = pyro.sample("b", dist.Gamma(2.0, 1.0))
    u = pyro.sample("u", dist.Uniform(0.0, b))
    pyro.sample("x", dist.Normal(u, 0.2), obs=torch.tensor(0.8))


def test_support_that_follows_another_latent_is_named():
    with pytest.raises(GuideSetupError, match="support of latent site 'u' changes.*u_unit"):
        AutoFlowGuide(dependent_support)()
    fixed = AutoFlowGuide(regression)  # bounds from data or constants are fixed: accepted
    fixed(torch.randn(5), torch.randn(5))


def test_guide_names_shape_from_int_argument():
    guide = AutoFlowGuide(sized, hidden_features=(8,))
    guide(3)
    with pytest.raises(GuideSetupError, match=r"'z'.*\(3,\).*\(5,\)"):
        guide(5)


def test_guide_names_latent_set_by_keyword():
    guide = AutoFlowGuide(sized, hidden_features=(8,))
    guide(3)
    with pytest.raises(GuideSetupError, match="'w'"):
        guide(3, extra=True)


def test_guide_names_stochastic_control_flow():
    pyro.set_rng_seed(0)
    with pytest.raises(GuideSetupError, match="'b'"):
        AutoFlowGuide(branching, hidden_features=(8,))()


# ------------------------------------------------------------ D: size guard
@pytest.mark.parametrize("name", flow_names())
def test_estimate_close_to_built_size(name):
    spec = get_flow(name)
    built = sum(p.numel() for p in spec.make(4, hidden_features=(8,)).parameters())
    estimate = estimate_flow_parameters(spec, 4, {"hidden_features": (8,)}).parameters
    assert abs(estimate - built) <= 0.05 * built


def test_large_masked_flow_refused_quickly():
    with pytest.raises(GuideSetupError, match="'SplineMAF'.*10000.*flow=None"):
        sizes.check_flow_size("SplineMAF", 10_000, {"hidden_features": (64, 64)})


def test_large_flow_warns():
    with pytest.warns(sizes.GuideSizeWarning, match="'RealNVP'.*parameters"):
        size = sizes.check_flow_size("RealNVP", 5000, {"hidden_features": (1024, 1024)})
    assert size.parameters > sizes.LARGE_FLOW_PARAMETERS


def test_flow_over_free_memory_refused(monkeypatch):
    monkeypatch.setattr(sizes, "available_memory", lambda: 2**20)
    with pytest.raises(GuideSetupError, match="'MAF'.*flow=None.*hidden_features"):
        sizes.check_flow_size("MAF", 100, {"hidden_features": (64, 64)})
    with pytest.raises(GuideSetupError, match="the test tensor"):
        sizes.check_allocation(2**30, "the test tensor")
    monkeypatch.setattr(sizes, "available_memory", lambda: None)
    sizes.check_allocation(2**60, "anything")  # free memory unknown: skipped


def test_guide_refuses_10000_latents_before_building(monkeypatch):
    def reached_zuko(*args, **kwargs):
        raise RuntimeError("the flow was being built")

    monkeypatch.setattr(zuko.flows, "MaskedAutoregressiveTransform", reached_zuko)

    def wide():
        pyro.sample("z", dist.Normal(torch.zeros(10_000), 1.0).to_event(1))

    with pytest.raises(GuideSetupError, match="SplineMAF"):
        AutoFlowGuide(wide, hidden_features=(64, 64))()


# ------------------------------------------- E: the probe's remaining cases
def test_built_flow_of_another_size_is_named():
    built = get_flow("MAF").make(3, transforms=2, hidden_features=(16,))
    with pytest.raises(ValueError, match="MAF.*2 feature.*features=2"):
        flow_transform(built, features=2)
    assert flow_transform(get_flow("MAF").make(2, transforms=1), features=2) is not None


@pytest.mark.parametrize("num_samples", [0, -1, 2.5, True])
def test_sample_posterior_refuses_a_bad_count(num_samples, data):
    guide = AutoFlowGuide(regression)
    guide(*data)
    with pytest.raises(ValueError, match="num_samples must be a whole number >= 1"):
        guide.sample_posterior(num_samples, *data)


def test_misspelt_initial_value_is_reported(data):
    guide = AutoFlowGuide(regression, init_loc_fn=init_to_value(values={"sigma": torch.tensor(1.0)}))
    with pytest.warns(UserWarning, match="'sigma', which is not a latent site.*a, s"):
        guide(*data)


def _same_sites(shift):
    def model(x, y=None):
        a = pyro.sample("a", dist.Normal(shift, 1.0))
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(a + x, s), obs=y)

    return model


def test_second_model_with_the_same_name_and_sites_is_refused(data):
    pyro.clear_param_store()
    first, second = _same_sites(0.0), _same_sites(5.0)
    guide_a = AutoFlowGuide(first)
    guide_a(*data)
    with pytest.raises(GuideSetupError, match="another model also named 'model'.*clear_param_store"):
        AutoFlowGuide(second)(*data)
    again = AutoFlowGuide(first)  # a second guide of the same model shares the parameter, as in Pyro
    again(*data)
    assert again.packed is guide_a.packed
    del guide_a, again


def test_model_that_is_not_callable_is_named():
    with pytest.raises(TypeError, match=r"model must be the Pyro model \(a callable\), got a Tensor"):
        AutoFlowGuide(torch.zeros(3))


def test_fit_refuses_a_guide_built_for_another_model(data):
    from pyro_flowguide import fit

    def other(x, y=None):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        t = pyro.sample("t", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(b * x, t), obs=y)

    pyro.clear_param_store()
    guide = AutoFlowGuide(regression)
    with pytest.raises(ValueError, match="the guide samples 'a', 's'.*latent sites: b, t.*another model"):
        fit(other, guide, *data, steps=2, progress=False)


def test_observed_data_that_do_not_fit_the_likelihood_are_named(data):
    x, y = data

    def gamma(y):
        r = pyro.sample("r", dist.LogNormal(0.0, 1.0))
        with pyro.plate("obs", y.shape[0]):
            pyro.sample("y", dist.Gamma(2.0, r), obs=y)

    with pytest.raises(GuideSetupError, match="observed site 'y': 1 of its 3 data are outside the support"):
        AutoFlowGuide(gamma)(torch.tensor([1.0, -0.5, 2.0]))
    with pytest.raises(GuideSetupError, match=r"observed site 'y': its data have shape \(49,\).*\(50,\)"):
        AutoFlowGuide(regression)(x, y[:49])


def test_data_of_the_wrong_type_are_named(data):
    x, y = data

    def coin(y):
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        with pyro.plate("flips", len(y)):
            pyro.sample("y", dist.Bernoulli(p), obs=y)

    with pytest.raises(GuideSetupError, match=r"observed site 'y': its data are booleans.*data\.float\(\)"):
        AutoFlowGuide(coin)(torch.tensor([True, False, True]))
    with pytest.raises(GuideSetupError, match="observed site 'y': its data are a numpy.ndarray.*torch.as_tensor"):
        AutoFlowGuide(regression)(x, y.numpy())
    with pytest.raises(GuideSetupError, match=r"'x' \(a list\), 'y' \(a list\) are not tensors.*torch.as_tensor"):
        AutoFlowGuide(regression)(x.tolist(), y.tolist())


def test_sequential_plate_is_named():
    def sequential(y):
        for i in pyro.plate("rows", len(y)):
            z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
            pyro.sample(f"y_{i}", dist.Normal(z, 1.0), obs=y[i])

    with pytest.raises(GuideSetupError, match="plate 'rows' around site 'z_0'.*vectorised plates"):
        AutoFlowGuide(sequential)(torch.zeros(3))


def test_state_dict_of_another_model_is_named(data):
    pyro.clear_param_store()
    source = AutoFlowGuide(regression)
    source(*data)
    state = source.state_dict()
    pyro.clear_param_store()
    target = AutoFlowGuide(simplex_model)
    target()
    with pytest.raises(GuideSetupError, match="does not fit the AutoFlowGuide of model 'simplex_model'.*size mismatch"):
        target.load_state_dict(state)


def test_to_inference_data_with_data_of_another_shape_says_what_to_pass(data):
    from pyro_flowguide import to_inference_data

    x, y = data
    pyro.clear_param_store()
    guide = AutoFlowGuide(regression)
    guide(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # not a plate problem: no fallback to one draw at a time
        with pytest.raises(ValueError, match="to_inference_data: .*site 'y'.*same data, of the same shapes"):
            to_inference_data(regression, guide, x, y[:10], num_samples=10)


@pytest.mark.parametrize("plate_size", [3, 100])  # the full flow, the structured posterior
def test_quantiles_outside_the_unit_interval_are_refused(plate_size):
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("p", plate_size):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    guide = AutoFlowGuide(model)
    guide()
    for bad in ([1.5], [-0.1, 0.5], "median"):
        with pytest.raises(ValueError, match=r"quantiles must be numbers in \[0, 1\]"):
            guide.quantiles(bad)
    assert guide.quantiles([0.0, 1.0])["a"].shape == (2,)


def test_same_support_compares_bounds_not_identities():
    from torch.distributions import constraints

    from pyro_flowguide.guides.supports import same_support

    def stack():  # a new constraint object per call, as a transform's codomain is
        return constraints.independent(constraints.stack([constraints.real, constraints.positive], dim=-1), 1)

    assert same_support(stack(), stack())
    assert same_support(constraints.interval(0.0, torch.tensor(2.0)), constraints.interval(0.0, torch.tensor(2.0)))
    assert not same_support(constraints.interval(0.0, torch.tensor(2.0)), constraints.interval(0.0, torch.tensor(3.0)))
    assert not same_support(constraints.positive, constraints.real)


def test_guides_of_one_model_behind_wrappers_share_its_parameter(data):
    import functools

    from pyro_flowguide.guides.contract import innermost

    assert innermost(poutine.block(functools.partial(regression), hide=["s"])) is regression
    pyro.clear_param_store()
    first = AutoFlowGuide(poutine.block(regression, hide=[]))
    first(*data)
    second = AutoFlowGuide(poutine.scale(regression, scale=1.0))  # the same model, another wrapper object
    second(*data)
    assert second.packed is first.packed
