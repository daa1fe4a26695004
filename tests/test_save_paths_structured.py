"""Every save path of the structured posterior restores what it saved: the same parameters and draws for a seed.

The table of ``test_save_paths.py`` for the structured kinds: ``AutoFlowGuide``'s
default on a plated hierarchy of 120 groups (the structured posterior, held as
``guide.structured``) and on a regression with a vector of 110 coefficients
outside every plate (a chain with its dense factor), and
``AutoStructuredFlowGuide`` used directly, x the save paths (``state_dict``,
the param store loaded before or after the new guide's first call,
``torch.save`` of the guide, ``fit``'s checkpoint resumed).
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_flowguide as pfg
from pyro_flowguide.guides.structured_parts import MAX_DENSE_CHAIN

torch.set_num_threads(1)

GROUPS, COEFFICIENTS, POINTS = 120, 110, 40


def group_model(y):
    """A plated hierarchy: ``mu``, ``tau`` (globals) and ``theta`` (one per group)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def group_data():
    g = torch.Generator().manual_seed(0)
    return (1.0 + 1.5 * torch.randn(GROUPS, generator=g),)


def chain_model(X, y):
    """A regression: ``w`` (a vector outside every plate: a chain) and ``sigma`` (a global)."""
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)


def chain_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(POINTS, COEFFICIENTS, generator=g)
    return X, X @ (0.3 * torch.randn(COEFFICIENTS, generator=g)) + torch.randn(POINTS, generator=g)


#: kind -> (model, data, guide class, options)
KINDS = {
    "structured default": (group_model, group_data, pfg.AutoFlowGuide, {}),
    "structured default, chain": (chain_model, chain_data, pfg.AutoFlowGuide, {}),
    "AutoStructuredFlowGuide": (group_model, group_data, pfg.AutoStructuredFlowGuide, {}),
}


def _data(kind):
    model, data, guide_class, options = KINDS[kind]
    return model, data(), guide_class, options


def _trained(kind):
    model, args, guide_class, options = _data(kind)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = guide_class(model, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pfg.fit(model, guide, *args, steps=10, progress=False)
    return model, args, guide_class, options, guide


def _structure(guide):
    """The structured posterior itself: ``guide.structured`` for ``AutoFlowGuide``, else the guide."""
    inner = getattr(guide, "structured", guide)
    assert isinstance(inner, pfg.AutoStructuredFlowGuide) and inner.delegate is None
    return inner


def _draws(guide, args):
    torch.manual_seed(5)
    return guide.sample_posterior(16, *args)


def _state(guide):
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


def _same(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _fresh(model, guide_class, options, args):
    pyro.set_rng_seed(123)  # other initial values than the saved guide's
    guide = guide_class(model, **options)
    guide(*args)
    return guide


def test_the_kinds_build_the_structured_parts_they_stand_for():
    groups = {"global": ("mu", "tau"), "local": ("theta",), "chain": ()}
    expected = {"structured default": groups, "AutoStructuredFlowGuide": groups,
                "structured default, chain": {"global": ("sigma",), "local": (), "chain": ("w",)}}
    for kind, sites in expected.items():
        model, args, guide_class, options = _data(kind)
        pyro.clear_param_store()
        guide = _fresh(model, guide_class, options, args)
        assert _structure(guide).site_groups() == sites, kind
        if sites["chain"]:  # with the dense factor over its elements
            stage = _structure(guide).stages.w
            assert stage.kind == "chain" and stage.dense and COEFFICIENTS <= MAX_DENSE_CHAIN


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict(kind, tmp_path):
    model, args, guide_class, options, guide = _trained(kind)
    before, state = _draws(guide, args), _state(guide)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    pyro.clear_param_store()
    fresh = _fresh(model, guide_class, options, args)
    fresh.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    _same(state, _state(fresh))
    _same(before, _draws(fresh, args))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("when", ["before the first call", "after the first call"])
def test_param_store(kind, when, tmp_path):
    model, args, guide_class, options, guide = _trained(kind)
    before, state = _draws(guide, args), _state(guide)
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    if when == "before the first call":
        pyro.get_param_store().load(tmp_path / "store.pt")
        fresh = _fresh(model, guide_class, options, args)
    else:  # Pyro's idiom: guide(...); pyro.get_param_store().load(path)
        fresh = _fresh(model, guide_class, options, args)
        pyro.get_param_store().load(tmp_path / "store.pt")
    _same(before, _draws(fresh, args))  # a draw adopts the store's tensors
    _same(state, _state(fresh))


@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_save_of_the_guide(kind, tmp_path):
    model, args, guide_class, options, guide = _trained(kind)
    before, state = _draws(guide, args), _state(guide)
    torch.save(guide, tmp_path / "guide.pt")
    pyro.clear_param_store()
    loaded = torch.load(tmp_path / "guide.pt", weights_only=False)
    _same(state, _state(loaded))
    _same(before, _draws(loaded, args))
    _same(guide.median(*args), loaded.median(*args))


@pytest.mark.parametrize("kind", list(KINDS))
def test_fit_checkpoint_resumes_to_the_same_guide(kind, tmp_path):
    model, args, guide_class, options = _data(kind)
    path = tmp_path / "fit.ckpt"

    class StopAt5(pfg.Callback):
        def on_step(self, state):
            if state.step == 5:
                state.stop_reason = "interrupted at step 5"

    def run(resume, stop=False):
        pyro.clear_param_store()
        pyro.set_rng_seed(77 if resume else 0)  # a new process starts from another random state
        guide = guide_class(model, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pfg.fit(
                model, guide, *args, steps=10, progress=False, checkpoint=path, checkpoint_every=5,
                resume=resume, callbacks=[StopAt5()] if stop else [],
            )
        return guide

    whole = run(resume=False)
    expected, state = _draws(whole, args), _state(whole)
    path.unlink()
    run(resume=False, stop=True)  # the first half, checkpointed at step 5
    resumed = run(resume=True)
    _same(state, _state(resumed))
    _same(expected, _draws(resumed, args))
