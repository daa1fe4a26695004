"""fit_density: maximum likelihood through fit(), against closed-form densities."""

from __future__ import annotations


import pyro.distributions as dist
import pytest
import torch

from pyro_flowguide.train import DensityFit, fit_density
from pyro_flowguide.train import Callback, FitResult
from pyro_flowguide.transforms import flow_transform

torch.set_num_threads(1)

L = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
GAUSS = dist.MultivariateNormal(torch.zeros(2), scale_tril=L)


class Count(Callback):
    def __init__(self):
        self.steps = 0

    def on_step(self, state):
        self.steps += 1


@pytest.mark.slow
def test_correlated_gaussian_reaches_the_true_nll_and_restores_the_best():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(4000, 2, generator=gen) @ L.T
    test = torch.randn(5000, 2, generator=gen) @ L.T
    true_nll = -GAUSS.log_prob(test).mean().item()
    counter = Count()
    fitted = fit_density(
        "MAF", data, steps=1500, patience=300, progress=False, seed=0, callbacks=[counter], hidden_features=(32, 32)
    )
    assert isinstance(fitted, DensityFit) and isinstance(fitted.result, FitResult)
    assert counter.steps == fitted.result.steps  # the same fit() loop and callbacks
    test_nll = -fitted.log_prob(test).mean().item()
    assert abs(test_nll - true_nll) < 0.05, (test_nll, true_nll)
    # The parameters in place are those of the best validation score.
    held_out = data[fitted.validation_index]
    assert len(held_out) == 400
    assert fitted.result.stop_reason.startswith("early stopping")
    assert -fitted.log_prob(held_out).mean().item() == pytest.approx(fitted.best_validation_nll, abs=1e-5)
    assert fitted.validation_nll[-1] > fitted.best_validation_nll  # the last score was not the best
    assert fitted.train_nll.shape == (fitted.result.steps,)


@pytest.mark.slow
def test_conditional_density():
    # y | c ~ N(c^2 / 2, 0.3^2), c ~ U(-2, 2): the conditional NLL is known in closed form.
    gen = torch.Generator().manual_seed(1)
    c = 4 * torch.rand(4000, 1, generator=gen) - 2
    y = c**2 / 2 + 0.3 * torch.randn(4000, 1, generator=gen)
    c_test = 4 * torch.rand(3000, 1, generator=gen) - 2
    y_test = c_test**2 / 2 + 0.3 * torch.randn(3000, 1, generator=gen)
    true_nll = -dist.Normal(c_test**2 / 2, 0.3).log_prob(y_test).mean().item()
    fitted = fit_density("NSF", y, context=c, steps=1500, patience=300, progress=False, seed=0)
    test_nll = -fitted.log_prob(y_test, context=c_test).mean().item()
    assert abs(test_nll - true_nll) < 0.05, (test_nll, true_nll)


@pytest.mark.slow
def test_user_built_distribution_is_trained_in_place():
    T = flow_transform("RealNVP", features=2, direction="density", hidden_features=(16, 16))
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [T])
    before = [p.detach().clone() for p in T.parameters()]
    data = torch.randn(500, 2, generator=torch.Generator().manual_seed(2)) @ L.T
    fitted = fit_density(flow, data, steps=60, batch_size=128, progress=False, seed=0)
    assert fitted.distribution is flow
    assert all(not torch.equal(a, b) for a, b in zip(before, T.parameters()))
    assert fitted.train_nll[-10:].mean() < fitted.train_nll[:10].mean()
    # A second fit in the same process starts from this flow, not from stale store entries.
    fit_density(flow, data, steps=5, progress=False)
    assert fitted.log_prob(data[:4]).shape == (4,)


def test_input_errors():
    with pytest.raises(ValueError, match=r"\(N, 1\)"):
        fit_density("MAF", torch.randn(100), steps=1, progress=False)
    with pytest.raises(ValueError, match="not conditional"):
        T = flow_transform("MAF", features=2, direction="density")
        flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [T])
        fit_density(flow, torch.randn(100, 2), context=torch.randn(100, 1), steps=1, progress=False)
    with pytest.raises(ValueError, match="context must be"):
        fit_density("MAF", torch.randn(100, 2), context=torch.randn(50, 1), steps=1, progress=False)
