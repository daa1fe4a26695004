"""Distributed SVI on Lightning: DDP on CPU (gloo, 2 processes) against one process and the closed form."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.nn import PyroModule

from pyro_flowguide import AutoFlowGuide, RenyiDReG_ELBO

pl = pytest.importorskip("lightning.pytorch", reason="needs the 'distributed' extra (lightning)")

from pyro_flowguide.train.lightning import (  # noqa: E402
    ScalingError,
    SVIModule,
    fit_distributed,
    load_guide_checkpoint,
)

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)

# Lightning 2.6 warns about a torch pytree API it uses; not this package's concern.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")

# Lightning's "ddp" re-runs the calling script, which a test runner cannot
# be. "ddp_fork" and "ddp_spawn" both start the processes from here and copy
# the trained parameters back; fork starts in under a second, spawn re-imports
# torch, Pyro and Lightning in each process (20-50 s on a loaded 2-core
# machine). What spawn adds, pickling the module, is tested in-process below.
_DDP = "ddp_fork" if "fork" in multiprocessing.get_all_start_methods() else "ddp_spawn"

N, D, NOISE = 64, 3, 2.0
STEPS = 300
PARTICLES = 64


class _Regression(PyroModule):
    """Bayesian linear regression, w ~ N(0, I), y ~ N(x w, NOISE^2), with the data plate scaled to N."""

    def __init__(self, num_data: int) -> None:
        super().__init__()
        self.num_data = num_data

    def forward(self, x, y=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        with pyro.plate("data", self.num_data, subsample_size=len(x)):
            pyro.sample("y", dist.Normal((x * w).sum(-1), NOISE), obs=y)


class _Unscaled(_Regression):
    """The same model without the full-data scale: wrong under minibatches."""

    def forward(self, x, y=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal((x * w).sum(-1), NOISE), obs=y)


class _SaveRankState(pl.Callback):
    """Each rank writes its module's parameters when training ends."""

    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g)
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + NOISE * torch.randn(N, generator=g)
    return x, y


def _closed_form(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    cov = torch.linalg.inv(x.T @ x / NOISE**2 + torch.eye(D))
    return cov @ x.T @ y / NOISE**2, cov


def _fit(
    tmp_path, guide, *, devices: int, batch_size: int, steps=STEPS, strategy="auto", callbacks=()
):
    x, y = _data()
    result = fit_distributed(
        guide.model,
        guide,
        (x, y),
        steps=steps,
        batch_size=batch_size,
        loss=Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1),
        lr=0.05,
        final_lr=2e-4,
        devices=devices,
        strategy=strategy,
        seed=0,
        checkpoint=tmp_path / "final.ckpt",
        default_root_dir=tmp_path,
        callbacks=callbacks,
        progress=False,
    )
    return guide, result


def _ddp_run(tmp_path_factory, guide, *, steps: int, batch_size: int):
    pyro.clear_param_store()
    tmp = tmp_path_factory.mktemp("ddp")
    _, result = _fit(
        tmp, guide, devices=2, batch_size=batch_size, steps=steps, strategy=_DDP,
        callbacks=[_SaveRankState(tmp)],
    )
    return guide, result, tmp


@pytest.fixture(scope="module")
def ddp_mvn(tmp_path_factory):
    """AutoMultivariateNormal (the exact family here), DDP with 2 processes of 32 items:
    a step covers all 64 points, each process scaling its half by 2."""
    guide = AutoMultivariateNormal(_Regression(N))
    return _ddp_run(tmp_path_factory, guide, steps=STEPS, batch_size=N // 2)


@pytest.fixture(scope="module")
def ddp_flow(tmp_path_factory):
    """AutoFlowGuide, DDP with 2 processes of 16 items (scaled by 4): a short run."""
    guide = AutoFlowGuide(_Regression(N))
    return _ddp_run(tmp_path_factory, guide, steps=20, batch_size=N // 4)


@pytest.fixture(params=["mvn", "flow"])
def ddp(request):
    return request.getfixturevalue(f"ddp_{request.param}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with the same effective batch (64 items) per step."""
    pyro.clear_param_store()
    tmp = tmp_path_factory.mktemp("single")
    guide, _ = _fit(tmp, AutoMultivariateNormal(_Regression(N)), devices=1, batch_size=N)
    return guide


def _moments(guide) -> tuple[torch.Tensor, torch.Tensor]:
    posterior = guide.get_posterior()
    return posterior.mean.detach(), posterior.covariance_matrix.diagonal().sqrt().detach()


@pytest.mark.slow
def test_ddp_ranks_hold_identical_parameters(ddp):
    guide, _, tmp = ddp
    rank0 = torch.load(tmp / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and any(k.startswith("guide.") for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # ...and the calling process got them back from the spawned ones.
    for name, value in guide.state_dict().items():
        assert torch.equal(value, rank0["guide." + name]), name


@pytest.mark.slow
def test_ddp_posterior_matches_single_process_and_closed_form(ddp_mvn, single):
    x, y = _data()
    mean, cov = _closed_form(x, y)
    sd = cov.diagonal().sqrt()
    ddp_mean, ddp_sd = _moments(ddp_mvn[0])
    one_mean, one_sd = _moments(single)
    print(
        "mean diff / sd: ddp vs single", ((ddp_mean - one_mean) / sd).abs().max().item(),
        "ddp vs exact", ((ddp_mean - mean) / sd).abs().max().item(),
        "single vs exact", ((one_mean - mean) / sd).abs().max().item(),
        "sd ratio ddp", (ddp_sd / sd).tolist(),
    )
    assert ((ddp_mean - one_mean) / sd).abs().max() < 0.05
    assert ((ddp_mean - mean) / sd).abs().max() < 0.05
    assert ((one_mean - mean) / sd).abs().max() < 0.05
    # An unscaled (per-shard) likelihood would inflate the sd by sqrt(2).
    assert torch.allclose(ddp_sd, sd, rtol=0.05)


@pytest.mark.slow
def test_checkpoint_from_ddp_reloads_into_a_single_process_guide(ddp):
    trained, result, tmp = ddp
    x, y = _data()
    pyro.set_rng_seed(123)
    expected = trained(x, y)["w"]
    # A new guide of the same name would share the trained one's parameters
    # through the param store: start from an empty store, as a new process does.
    pyro.clear_param_store()
    fresh = type(trained)(_Regression(N))
    loaded = load_guide_checkpoint(fresh, result.checkpoint, x[:8], y[:8])
    assert loaded is fresh
    rank0 = torch.load(tmp / "rank0.pt", weights_only=True)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, rank0["guide." + name]), name
    pyro.set_rng_seed(123)
    assert torch.equal(fresh(x, y)["w"], expected)


def test_unscaled_likelihood_is_refused_with_the_site_named():
    x, y = _data()
    model = _Unscaled(N)
    with pytest.raises(ScalingError, match=r"'y' is scaled by 1 .*must be scaled by 2"):
        SVIModule(model, AutoMultivariateNormal(model), num_data=N, init_batch=(x[:32], y[:32]))
    # The same batch passes with the plate scaled to the full data.
    model = _Regression(N)
    SVIModule(model, AutoMultivariateNormal(model), num_data=N, init_batch=(x[:32], y[:32]))


def test_scaling_contract_accepts_batch_indices():
    x, y = _data()

    def model(idx, x, y=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("y", dist.Normal((x * w).sum(-1), NOISE), obs=y)

    idx = torch.arange(8, 24)
    SVIModule(model, AutoMultivariateNormal(model), num_data=N, init_batch=(idx, x[idx], y[idx]))
    with pytest.raises(ScalingError, match=r"scaled by 4 on a batch of 16 .*must be scaled by 16"):
        SVIModule(model, AutoMultivariateNormal(model), num_data=4 * N, init_batch=(idx, x[idx], y[idx]))


def test_parameters_the_loss_leaves_unused_are_named():
    x, y = _data()
    model = _Regression(N)
    model.unused = torch.nn.Parameter(torch.zeros(2))
    with pytest.warns(UserWarning, match=r"model\.unused.*find_unused_parameters"):
        SVIModule(model, AutoMultivariateNormal(model), init_batch=(x[:16], y[:16]))


def test_param_store_parameters_outside_modules_are_registered():
    x, y = _data()

    def model(x, y=None):
        noise = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
        w = pyro.sample("w", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        with pyro.plate("data", N, subsample_size=len(x)):
            pyro.sample("y", dist.Normal((x * w).sum(-1), noise), obs=y)

    guide = AutoMultivariateNormal(model)
    module = SVIModule(model, guide, num_data=N, init_batch=(x[:16], y[:16]))
    registered = dict(module.named_parameters())
    assert registered["store_params.noise"] is pyro.param("noise").unconstrained()
    assert any(name.startswith("guide.") for name in registered)


def test_uninitialised_module_is_refused_before_the_strategy_wraps_it(tmp_path):
    x, y = _data()
    model = _Regression(N)
    module = SVIModule(model, AutoMultivariateNormal(model))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with pytest.raises(RuntimeError, match="initialize"):
        trainer.fit(module, loader)


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "pyro_flowguide.train.lightning")
    with pytest.raises(ImportError, match=r'pip install "pyro-flowguide\[distributed\]"'):
        import pyro_flowguide.train.lightning  # noqa: F401


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_module_pickles_for_spawned_processes():
    """ddp_spawn pickles the module: the copy computes the same loss, and both keep their model."""
    x, y = _data()
    model = _Regression(N)
    module = SVIModule(model, AutoFlowGuide(model), num_data=N, init_batch=(x[:16], y[:16]))
    linked = module.guide.model
    copy = pickle.loads(pickle.dumps(module))
    # Pickling an autoguide drops its model (Pyro does so on the original too).
    assert copy.guide.model is copy.model
    pyro.clear_param_store()  # a spawned process starts with an empty store
    losses = []
    for m in (copy, module):
        pyro.set_rng_seed(0)
        losses.append(m.training_step((x[:16], y[:16]), 0).item())
    assert losses[0] == losses[1]
    # A batch of another size makes AutoFlowGuide re-trace its model.
    copy.training_step((x[:32], y[:32]), 1)
    # Lightning copies the trained parameters back with load_state_dict.
    module.load_state_dict(copy.state_dict())
    assert module.guide.model is linked


@pytest.mark.slow  # a fresh interpreter imports torch and Pyro: 3-15 s on a shared machine
def test_importing_the_package_does_not_import_lightning():
    code = "import sys, pyro_flowguide; assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_losses_without_a_differentiable_loss_are_refused_early():
    model = _Regression(8)
    with pytest.raises(TypeError, match="RenyiDReG_ELBO has no differentiable_loss.*use Trace_ELBO"):
        SVIModule(model, AutoFlowGuide(model), RenyiDReG_ELBO(0.5, num_particles=4), num_data=8)


def test_the_elbo_keyword_is_deprecated_for_loss(tmp_path):
    x, y = _data()
    model = _Regression(N)
    common = dict(steps=1, batch_size=16, devices=1, progress=False, seed=0, default_root_dir=tmp_path)
    with pytest.warns(DeprecationWarning, match=r"elbo=.*deprecated.*loss="):
        result = fit_distributed(model, AutoMultivariateNormal(model), (x, y), elbo=Trace_ELBO(), **common)
    assert isinstance(result.module.elbo, Trace_ELBO)
    with pytest.raises(TypeError, match="both loss= and its deprecated name elbo="):
        fit_distributed(model, AutoMultivariateNormal(model), (x, y), loss=Trace_ELBO(), elbo=Trace_ELBO(), **common)
