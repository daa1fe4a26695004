"""AutoAmortizedFlowGuide as a drop-in for Pyro's autoguides: nested plates, AutoGuideList, every save path.

* Nested plates: a local latent in classes within schools (its context has one
  leading dim per plate), and a local latent with an observed plate outside it;
  ``sample_posterior`` and ``Predictive`` on both.
* ``AutoGuideList``: the amortized guide next to AutoNormal / AutoDelta trains,
  predicts and summarises; the list draws the shared plates.
* Save paths (as tests/test_save_paths.py for AutoFlowGuide): ``state_dict``, the
  param store loaded before or after the new guide's first call, ``torch.save``
  of the guide, ``fit``'s checkpoint resumed. Each restores bit-identical
  parameters and the same draws for a seed. (A lambda context refused by
  ``torch.save``: tests/test_amortized.py.)
"""

from __future__ import annotations

import math
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal

import pyro_flowguide as pfg
from pyro_flowguide import AutoAmortizedFlowGuide, GuideSetupError
from test_amortized import hierarchical_model

torch.set_num_threads(1)

SMALL = {"hidden_features": (8, 8), "transforms": 1, "encoder_features": (8,)}


def context(y, *sizes):
    return y


def transposed(y, *sizes):
    return y.transpose(0, 1)


def school_mean(y, *sizes):
    return y.mean((1, 2)).unsqueeze(-1)


def schools_model(y, schools_batch=None, classes_batch=None):
    """y: (schools, classes, pupils). A school effect s (outer plate) and a class effect z (both plates)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("schools", y.shape[0], subsample_size=schools_batch, dim=-2) as si:
        s = pyro.sample("s", dist.Normal(mu, 1.0))
        with pyro.plate("classes", y.shape[1], subsample_size=classes_batch, dim=-1) as ci:
            z = pyro.sample("z", dist.Normal(s, 1.0))
            pyro.sample("y", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=y[si][:, ci])


def cells_model(y, schools_batch=None, classes_batch=None, outer="schools"):
    """z ~ N(0, 1) per (school, class), y ~ N(2 z + 1, 0.5): z | y ~ N(8 (y - 1) / 17, 1 / 17)."""
    dims = {"schools": -2, "classes": -1} if outer == "schools" else {"schools": -1, "classes": -2}
    with pyro.plate("schools", y.shape[0], subsample_size=schools_batch, dim=dims["schools"]) as si:
        with pyro.plate("classes", y.shape[1], subsample_size=classes_batch, dim=dims["classes"]) as ci:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            obs = y[si][:, ci]
            pyro.sample("y", dist.Normal(2 * z + 1, 0.5), obs=obs if outer == "schools" else obs.T)


def features_model(y, batch_size=None):
    """y: (data, features). The local z in plate 'data' (dim -1), observed per feature (plate at dim -2)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    data = pyro.plate("data", y.shape[0], subsample_size=batch_size, dim=-1)
    with data:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
    with pyro.plate("features", y.shape[1], dim=-2), data as idx:
        pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx].T)



def _fit(model, guide, *args, steps=3, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short runs warn that they have not converged
        return pfg.fit(model, guide, *args, steps=steps, progress=False, **options)


def _shapes(samples: dict) -> dict:
    return {name: tuple(value.shape) for name, value in samples.items()}


# ------------------------------------------------------------------ nested plates
def test_nested_plates_sample_posterior_and_predictive():
    S, C = 3, 5
    y = torch.randn(S, C, 2)
    guide = AutoAmortizedFlowGuide(schools_model, amortized={"z": context}, **SMALL)
    _fit(schools_model, guide, y, None, 2)  # two classes of each school per step
    assert _shapes(guide.sample_posterior(4, y)) == {"mu": (4,), "s": (4, S, 1), "z": (4, S, C)}
    for parallel in (False, True):
        pred = Predictive(schools_model, guide=guide, num_samples=4, parallel=parallel)(y)
        assert pred["z"].shape == (4, S, C) and pred["s"].shape == (4, S, 1), parallel
        assert pred["y"].shape == (4, S, C, 2), parallel
    assert guide.median(y, num_samples=10)["z"].shape == (S, C)
    # Both plates subsampled: the school effect is local too, its context one row per school.
    guide = AutoAmortizedFlowGuide(schools_model, amortized={"z": context, "s": school_mean}, **SMALL)
    _fit(schools_model, guide, y, 2, 3)
    assert _shapes(guide.sample_posterior(4, y)) == {"mu": (4,), "s": (4, S, 1), "z": (4, S, C)}


@pytest.mark.parametrize("outer", ["schools", "classes"])
def test_nested_plates_give_each_cell_its_own_context_row(outer):
    # An exact encoder with a near-zero scale: each z is the posterior mean of its own cell.
    y = torch.randn(4, 6) * 2
    fn = context if outer == "schools" else transposed
    guide = AutoAmortizedFlowGuide(lambda *a: cells_model(*a, outer=outer), amortized={"z": fn}, flow=None)
    guide(y)
    layer = guide.local_layers["z"]
    layer.encoder = torch.nn.Identity()
    with torch.no_grad():
        layer.head = torch.nn.Linear(1, 2)
        layer.head.weight[:] = torch.tensor([[8 / 17 * float(layer.context_scale)], [0.0]])
        layer.head.bias[:] = torch.tensor([8 / 17 * (float(layer.context_loc) - 1), math.log(math.expm1(1e-6))])
    exact = 8 * (y - 1) / 17
    draws = guide.sample_posterior(2, y)["z"]
    assert torch.allclose(draws, (exact if outer == "schools" else exact.T).expand(2, -1, -1), atol=1e-4)
    trace = poutine.trace(guide).get_trace(y, 2, 3)
    si, ci = trace.nodes["schools"]["value"], trace.nodes["classes"]["value"]
    expected = exact[si][:, ci]
    assert torch.allclose(trace.nodes["z"]["value"], expected if outer == "schools" else expected.T, atol=1e-4)


def test_observed_plate_outside_the_local_plate():
    # The globals guide re-runs the model for the new batch size inside _num_posterior_samples:
    # that plate must sit left of the observed sites' plate at dim -2 as well.
    y = torch.randn(8, 3)
    guide = AutoAmortizedFlowGuide(features_model, amortized={"z": context}, **SMALL)
    _fit(features_model, guide, y, 4)
    assert _shapes(guide.sample_posterior(5, y)) == {"mu": (5,), "z": (5, 8)}
    pred = Predictive(features_model, guide=guide, num_samples=5, parallel=True)(y[:6])
    assert pred["z"].shape == (5, 1, 6) and pred["y"].shape == (5, 3, 6)


def test_nested_plate_set_up_errors():
    def model(y, batch_size=None):
        with pyro.plate("schools", y.shape[0], dim=-2), pyro.plate("classes", y.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z + w, 1.0), obs=y)

    y = torch.randn(3, 4)
    with pytest.raises(GuideSetupError, match=r"'w' is inside plate 'classes'.*amortized sites \['z'\].*add it"):
        AutoAmortizedFlowGuide(model, amortized={"z": context})(y)
    guide = AutoAmortizedFlowGuide(model, amortized={"z": lambda y: y[0], "w": context})
    with pytest.raises(GuideSetupError, match=r"'z' returned \(4,\).*plates \['schools', 'classes'\].*\(3, 4\)"):
        guide(y)


# ------------------------------------------------------------------ AutoGuideList
def _guide_list(other, create_plates=None):
    guide = AutoGuideList(hierarchical_model, create_plates=create_plates)
    amortized = AutoAmortizedFlowGuide(poutine.block(hierarchical_model, hide=["mu"]), amortized={"a": context}, **SMALL)
    guide.append(amortized)
    guide.append(other(poutine.block(hierarchical_model, expose=["mu"])))
    return guide


@pytest.mark.parametrize("other", [AutoNormal, AutoDelta])
def test_in_an_autoguidelist_trains_predicts_and_summarises(other):
    y = torch.randn(12, 3)
    guide = _guide_list(other)
    svi = SVI(hierarchical_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(y) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert _shapes(guide(y)) == {"mu": (), "tau": (), "a": (12,)}
    for parallel in (False, True):
        pred = Predictive(hierarchical_model, guide=guide, num_samples=4, parallel=parallel)(y)
        assert pred["a"].shape == (4, 12) and pred["y"].shape == (4, 12, 3), parallel
        assert pred["mu"].numel() == 4 and pred["tau"].numel() == 4, parallel
    assert _shapes(guide.median(y)) == {"mu": (), "tau": (), "a": (12,)}


def test_in_an_autoguidelist_the_list_draws_the_subsample():
    y = torch.randn(12, 3)

    def plates(y, batch_size=None):
        return pyro.plate("groups", len(y), subsample_size=batch_size, dim=-1)

    guide = _guide_list(AutoNormal, create_plates=plates)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(hierarchical_model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    assert all(math.isfinite(svi.step(y, 4)) for _ in range(3))
    trace = poutine.trace(guide).get_trace(y, 4)
    assert trace.nodes["groups"]["value"].shape == (4,) and trace.nodes["a"]["value"].shape == (4,)
    pred = Predictive(hierarchical_model, guide=guide, num_samples=3, parallel=True)(torch.randn(7, 3))
    assert pred["a"].shape == (3, 7)
    # Without create_plates the list draws the plate of its first call: a clear error for another size.
    guide = _guide_list(AutoNormal)
    svi = SVI(hierarchical_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(y, 4)
    with pytest.raises(GuideSetupError, match=r"plate 'groups' with 4 of 12.*this call has 12 of 12.*create_plates"):
        Predictive(hierarchical_model, guide=guide, num_samples=3)(y)


# ------------------------------------------------------------------ save paths
SAVE_DATA = (20, 3)


def _trained_guide(seed=0, **fit_options):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    y = torch.randn(*SAVE_DATA, generator=torch.Generator().manual_seed(0))
    guide = AutoAmortizedFlowGuide(hierarchical_model, amortized={"a": context}, **SMALL)
    _fit(hierarchical_model, guide, y, 8, steps=20, **fit_options)
    return guide, y


def _fresh_guide(y, first_call=True):
    pyro.set_rng_seed(123)  # other initial values than the saved guide's
    guide = AutoAmortizedFlowGuide(hierarchical_model, amortized={"a": context}, **SMALL)
    if first_call:
        guide(y, 8)
    return guide


def _draws(guide, y):
    torch.manual_seed(5)
    return guide.sample_posterior(16, y)


def _same(before: dict, after: dict):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _state(guide) -> dict:
    return {name: value.detach().clone() for name, value in guide.state_dict().items()}


SAVE_PATHS = ["state_dict", "param store before the first call", "param store after the first call", "torch.save"]


@pytest.mark.parametrize("path", SAVE_PATHS)
def test_save_path_restores_parameters_and_draws(path, tmp_path):
    guide, y = _trained_guide()
    state, before = _state(guide), _draws(guide, y)
    file = tmp_path / "saved.pt"
    if path == "state_dict":
        torch.save(guide.state_dict(), file)
        pyro.clear_param_store()
        fresh = _fresh_guide(y)
        fresh.load_state_dict(torch.load(file, weights_only=True))
    elif path.startswith("param store"):
        pyro.get_param_store().save(file)
        pyro.clear_param_store()
        if path == "param store before the first call":
            pyro.get_param_store().load(file)
            fresh = _fresh_guide(y)
        else:  # Pyro's idiom: guide(...); pyro.get_param_store().load(path)
            fresh = _fresh_guide(y)
            pyro.get_param_store().load(file)
    else:
        torch.save(guide, file)
        pyro.clear_param_store()
        fresh = torch.load(file, weights_only=False)
    _same(before, _draws(fresh, y))
    _same(state, _state(fresh))
    y_new = torch.randn(7, 3)  # a restored guide serves new data as the saved one does
    _same(_draws(guide, y_new), _draws(fresh, y_new))


def test_torch_save_refuses_a_lambda_init_loc_fn():
    y = torch.randn(*SAVE_DATA)
    init = lambda site: pyro.infer.autoguide.init_to_median(site)  # noqa: E731 - the point: a lambda
    guide = AutoAmortizedFlowGuide(hierarchical_model, amortized={"a": context}, init_loc_fn=init, **SMALL)
    guide(y)
    with pytest.raises(pickle.PicklingError, match=r"init_loc_fn cannot be pickled.*state_dict"):
        pickle.dumps(guide)


def test_fit_checkpoint_resumes_to_the_same_guide(tmp_path):
    file = tmp_path / "fit.ckpt"

    class StopAt10(pfg.Callback):
        def on_step(self, state):
            if state.step == 10:
                state.stop_reason = "interrupted at step 10"

    whole, y = _trained_guide(checkpoint=tmp_path / "whole.ckpt", checkpoint_every=10)
    state, before = _state(whole), _draws(whole, y)
    _trained_guide(checkpoint=file, checkpoint_every=10, callbacks=[StopAt10()])  # the first half
    # A new process starts from another random state; the checkpoint restores the run's.
    resumed, _ = _trained_guide(seed=77, checkpoint=file, checkpoint_every=10, resume=True)
    _same(state, _state(resumed))
    _same(before, _draws(resumed, y))
