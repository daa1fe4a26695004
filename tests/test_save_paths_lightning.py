"""A Lightning checkpoint restores every guide kind: the same parameters and the same draws for a seed.

Each kind of ``test_save_paths.py`` and ``test_save_paths_structured.py``, and
the amortized guide of ``test_amortized_contract.py``'s save paths, is
trained a few steps with ``fit_distributed`` in one process, which writes a
Lightning checkpoint when training ends; ``load_guide_checkpoint`` loads it
into a new guide built as the trained one was, in an empty param store. The
checkpoint's guide parameters, the new guide's and the trained guide's must
be the same tensors bit for bit, and ``sample_posterior`` the same draws for a
seed. Lightning trains on batches of data, so eight schools takes its
observations as an argument here (the same model as ``eight_schools_centered``).
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_flowguide as pfg
from pyro_flowguide.examples import EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y, linear_regression, linear_regression_data
from test_amortized import hierarchical_model
from test_amortized_contract import SMALL
from test_amortized_contract import context as amortized_context
from test_save_paths_structured import KINDS as STRUCTURED_KINDS
from test_save_paths_structured import _draws, _same, _state

pytest.importorskip("lightning.pytorch", reason="needs the 'distributed' extra (lightning)")

from pyro_flowguide.train.lightning import fit_distributed, load_guide_checkpoint  # noqa: E402
from pyro_flowguide.train.svi_module import GUIDE_PREFIX  # noqa: E402

torch.set_num_threads(1)

# Lightning 2.6 warns about a torch pytree API it uses; not this package's concern.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


def eight_schools(y):
    """Eight schools, centred, with the observed effects ``y`` as the argument."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, EIGHT_SCHOOLS_SIGMA), obs=y)


#: kind -> (model, data, guide class, options)
KINDS = {
    "default": (linear_regression, linear_regression_data, pfg.AutoFlowGuide, {}),
    "noncentered": (eight_schools, lambda: (EIGHT_SCHOOLS_Y,), pfg.AutoFlowGuide, {}),
    "no flow": (linear_regression, linear_regression_data, pfg.AutoFlowGuide, {"flow": None}),
    **STRUCTURED_KINDS,
    "amortized": (
        hierarchical_model,
        lambda: (torch.randn(20, 3, generator=torch.Generator().manual_seed(0)),),
        pfg.AutoAmortizedFlowGuide,
        {"amortized": {"a": amortized_context}, **SMALL},
    ),
}



def _trained(kind, path):
    model, data, guide_class, options = KINDS[kind]
    args = data()
    pyro.clear_param_store()
    guide = guide_class(model, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_distributed(
            model, guide, args, steps=5, batch_size=len(args[0]), shuffle=False, devices=1, seed=0,
            checkpoint=path, default_root_dir=path.parent, progress=False,
        )
    return model, args, guide_class, options, guide


@pytest.mark.parametrize("kind", list(KINDS))
def test_lightning_checkpoint(kind, tmp_path):
    path = tmp_path / "final.ckpt"
    model, args, guide_class, options, guide = _trained(kind, path)
    if kind == "noncentered":
        assert guide.noncentered_sites == ("theta",)
    before, state = _draws(guide, args), _state(guide)
    saved = torch.load(path, weights_only=True)["state_dict"]
    _same(state, {k[len(GUIDE_PREFIX) :]: v for k, v in saved.items() if k.startswith(GUIDE_PREFIX)})
    pyro.clear_param_store()  # as in a new process
    pyro.set_rng_seed(123)  # other initial values than the saved guide's
    fresh = guide_class(model, **options)
    assert load_guide_checkpoint(fresh, path, *args) is fresh
    _same(state, _state(fresh))
    _same(before, _draws(fresh, args))
