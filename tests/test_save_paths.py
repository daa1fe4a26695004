"""Every save path of AutoFlowGuide restores what it saved: the same parameters and the same draws for a seed.

The table: guide kinds (the default on a regression, non-centred sites on
eight schools, no flow) x save paths (``state_dict``, the param store loaded
before or after the new guide's first call, ``torch.save`` of the guide,
``fit``'s checkpoint resumed).
"""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch

import pyro_flowguide as pfg
from pyro_flowguide.examples import eight_schools_centered, linear_regression, linear_regression_data

torch.set_num_threads(1)

KINDS = {
    "default": (linear_regression, linear_regression_data, {}),
    "noncentered": (eight_schools_centered, tuple, {}),  # no arguments
    "no flow": (linear_regression, linear_regression_data, {"flow": None}),
}


def _data(kind):
    model, data, options = KINDS[kind]
    args = data()
    return model, (args if isinstance(args, tuple) else (args,)), options


def _trained(kind):
    model, args, options = _data(kind)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = pfg.AutoFlowGuide(model, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pfg.fit(model, guide, *args, steps=30, progress=False)
    return model, args, options, guide


def _draws(guide, args):
    torch.manual_seed(5)
    return guide.sample_posterior(16, *args)


def _same(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _fresh(model, options, args, first_call=True):
    pyro.set_rng_seed(123)  # other initial values than the saved guide's
    guide = pfg.AutoFlowGuide(model, **options)
    if first_call:
        guide(*args)
    return guide


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_dict(kind, tmp_path):
    model, args, options, guide = _trained(kind)
    before = _draws(guide, args)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    pyro.clear_param_store()
    fresh = _fresh(model, options, args)
    fresh.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    _same(before, _draws(fresh, args))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("when", ["before the first call", "after the first call"])
def test_param_store(kind, when, tmp_path):
    model, args, options, guide = _trained(kind)
    before = _draws(guide, args)
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    if when == "before the first call":
        pyro.get_param_store().load(tmp_path / "store.pt")
        fresh = _fresh(model, options, args)
    else:  # Pyro's idiom: guide(...); pyro.get_param_store().load(path)
        fresh = _fresh(model, options, args)
        pyro.get_param_store().load(tmp_path / "store.pt")
    _same(before, _draws(fresh, args))
    assert not fresh.untrained


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_torch_save_of_the_guide(kind, tmp_path):
    model, args, options, guide = _trained(kind)
    before = _draws(guide, args)
    torch.save(guide, tmp_path / "guide.pt")
    pyro.clear_param_store()
    loaded = torch.load(tmp_path / "guide.pt", weights_only=False)
    _same(before, _draws(loaded, args))
    assert torch.equal(loaded.median(*args)[next(iter(before))], guide.median(*args)[next(iter(before))])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fit_checkpoint_resumes_to_the_same_guide(kind, tmp_path):
    model, args, options = _data(kind)
    path = tmp_path / "fit.ckpt"

    class StopAt10(pfg.Callback):
        def on_step(self, state):
            if state.step == 10:
                state.stop_reason = "interrupted at step 10"

    def run(resume, stop=False):
        pyro.clear_param_store()
        pyro.set_rng_seed(77 if resume else 0)  # a new process starts from another random state
        guide = pfg.AutoFlowGuide(model, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pfg.fit(
                model, guide, *args, steps=20, progress=False, checkpoint=path, checkpoint_every=10,
                resume=resume, callbacks=[StopAt10()] if stop else [],
            )
        return guide

    whole = _draws(run(resume=False), args)
    path.unlink()
    run(resume=False, stop=True)  # the first half, checkpointed at step 10
    resumed = run(resume=True)
    _same(whole, _draws(resumed, args))
    assert resumed.warm_start_result is None  # restored from the checkpoint, not staged first
