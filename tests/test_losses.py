"""RenyiDReG_ELBO: zero gradient at the posterior, unbiased, model parameters, refusals, fit default."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_flowguide as pfg
from pyro_flowguide.train.losses import DEFAULT_ALPHA, RenyiDReG_ELBO

torch.set_num_threads(1)

# y_j ~ N(A z, 0.5^2 I), z ~ N(0, I): a correlated Gaussian posterior in closed form.
A = torch.tensor([[1.0, 0.8], [0.2, 1.0], [1.0, -0.3]], dtype=torch.float64)
Y = torch.tensor([0.7, -0.4, 1.1], dtype=torch.float64)
NOISE = 0.5


def gaussian_model():
    z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(A @ z if z.dim() == 1 else z @ A.T, NOISE).to_event(1), obs=Y)


def posterior():
    precision = torch.eye(2, dtype=torch.float64) + A.T @ A / NOISE**2
    cov = torch.linalg.inv(precision)
    return cov @ A.T @ Y / NOISE**2, cov


def gaussian_guide(estimator: str, mean: torch.Tensor, cov: torch.Tensor) -> pfg.AutoFlowGuide:
    """A flow-free AutoFlowGuide (a full-rank Gaussian) set to N(mean, cov)."""
    guide = pfg.AutoFlowGuide(gaussian_model, flow=None, estimator=estimator)
    guide()
    chol = torch.linalg.cholesky(cov)
    with torch.no_grad():
        guide.affine_loc = mean
        guide.affine_scale = chol.diagonal()
        guide._view("scale_tril").copy_(chol / chol.diagonal().unsqueeze(-1))  # L = diag(s) U
    return guide


def flat_grad(guide) -> torch.Tensor:
    g = guide.packed.grad.clone()
    guide.packed.grad = None
    return g


def test_gradient_vanishes_at_the_posterior():
    pyro.clear_param_store()
    mean, cov = posterior()
    elbo = RenyiDReG_ELBO(0.5, num_particles=16, vectorize_particles=True, max_plate_nesting=0)
    guide = gaussian_guide("stl", mean, cov)
    pyro.set_rng_seed(0)
    loss = elbo.loss_and_grads(gaussian_model, guide)
    # every log weight is log p(y): the bound is exact and each draw's gradient is zero
    log_evidence = dist.MultivariateNormal(
        torch.zeros(3, dtype=torch.float64), A @ A.T + NOISE**2 * torch.eye(3, dtype=torch.float64)
    ).log_prob(Y)
    assert math.isclose(loss, -log_evidence.item(), rel_tol=1e-10)
    assert flat_grad(guide).abs().max() < 1e-10
    # the plain reparameterisation gradient of the same bound is not zero there
    pyro.clear_param_store()
    plain = gaussian_guide("reparam", mean, cov)
    pyro.set_rng_seed(0)
    RenyiELBO(0.5, num_particles=16, vectorize_particles=True, max_plate_nesting=0).loss_and_grads(
        gaussian_model, plain
    )
    assert flat_grad(plain).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.0, DEFAULT_ALPHA])
def test_gradient_is_unbiased(alpha):
    """Away from the posterior its mean matches the plain gradient of the same bound."""
    mean, cov = posterior()
    off_mean, off_cov = mean + torch.tensor([1.5, -1.0], dtype=torch.float64), 2.5 * cov
    reps, k = 400, 8
    draws = {}
    for kind, elbo in (
        ("stl", RenyiDReG_ELBO(alpha, num_particles=k, vectorize_particles=True, max_plate_nesting=0)),
        ("reparam", RenyiELBO(alpha, num_particles=k, vectorize_particles=True, max_plate_nesting=0)),
    ):
        pyro.clear_param_store()
        guide = gaussian_guide(kind, off_mean, off_cov)
        pyro.set_rng_seed(1)
        grads = []
        for _ in range(reps):
            elbo.loss_and_grads(gaussian_model, guide)
            grads.append(flat_grad(guide))
        draws[kind] = torch.stack(grads)
    dreg, plain = draws["stl"], draws["reparam"]
    moving = plain.abs().max(0).values > 0  # the raw factor's upper triangle and diagonal are unused
    diff = (dreg.mean(0) - plain.mean(0))[moving]
    se = ((dreg.var(0) + plain.var(0)) / reps).sqrt()[moving]
    assert (diff.abs() / se).max() < 4.5, (diff, se)
    assert (plain.mean(0)[moving].abs() / se).max() > 10  # the guide is far enough off to test anything


def test_model_parameters_get_the_plain_renyi_gradient():
    def model():
        shift = pyro.param("shift", torch.tensor(0.3, dtype=torch.float64))
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
        loc = (A @ z if z.dim() == 1 else z @ A.T) + shift
        pyro.sample("y", dist.Normal(loc, NOISE).to_event(1), obs=Y)

    results = []
    for elbo in (
        RenyiDReG_ELBO(0.5, num_particles=8, vectorize_particles=True, max_plate_nesting=0),
        RenyiELBO(0.5, num_particles=8, vectorize_particles=True, max_plate_nesting=0),
    ):
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        guide = pfg.AutoFlowGuide(model, estimator="stl")
        loss = elbo.loss_and_grads(model, guide)
        shift = pyro.get_param_store()._params["shift"]
        results.append((loss, shift.grad.clone(), flat_grad(guide)))
    (loss_a, shift_a, guide_a), (loss_b, shift_b, guide_b) = results
    assert math.isclose(loss_a, loss_b, rel_tol=1e-12)  # same draws, same bound
    assert torch.allclose(shift_a, shift_b, rtol=1e-10, atol=0)
    assert shift_a.abs() > 1e-3
    assert not torch.allclose(guide_a, guide_b)  # the guide's gradient is the DReG one


def test_sequential_particles_give_the_same_bound():
    values = []
    for vectorize in (True, False):
        pyro.clear_param_store()
        mean, cov = posterior()
        guide = gaussian_guide("stl", mean, 3 * cov)
        elbo = RenyiDReG_ELBO(0.5, num_particles=4, vectorize_particles=vectorize, max_plate_nesting=0)
        pyro.set_rng_seed(3)
        values.append(elbo.loss(gaussian_model, guide))
    assert math.isfinite(values[0]) and math.isfinite(values[1])
    # different draws, the same bound: both near its value, far from each other's noise
    assert abs(values[0] - values[1]) < 2.0


def test_refuses_what_it_cannot_serve():
    pyro.clear_param_store()
    elbo = RenyiDReG_ELBO(0.5, num_particles=4, vectorize_particles=True, max_plate_nesting=0)
    with pytest.raises(ValueError, match="path_derivative_log_density.*estimator='stl'"):
        elbo.loss_and_grads(gaussian_model, AutoNormal(gaussian_model))
    with pytest.raises(ValueError, match="AutoFlowGuide"):
        elbo.loss_and_grads(gaussian_model, pfg.AutoFlowGuide(gaussian_model, estimator="reparam"))
    for alpha in (1.0, -0.5, 2):
        with pytest.raises(ValueError, match="alpha must be in"):
            RenyiDReG_ELBO(alpha)
    with pytest.raises(NotImplementedError, match="loss_and_grads"):
        elbo.differentiable_loss(gaussian_model, pfg.AutoFlowGuide(gaussian_model))


def _loss_of(result_holder):
    class Seen(pfg.Callback):
        def on_start(self, state):
            result_holder.append(state.svi.loss_and_grads.__self__)

    return Seen()


def test_fit_uses_the_renyi_bound_with_stl_flow_guides():
    seen: list = []
    pyro.clear_param_store()
    fit = pfg.fit(gaussian_model, pfg.AutoFlowGuide(gaussian_model), steps=3, progress=False, callbacks=[_loss_of(seen)])
    (loss,) = seen
    assert type(loss) is RenyiDReG_ELBO and loss.alpha == DEFAULT_ALPHA
    assert loss.num_particles == 32 and loss.vectorize_particles and fit.num_particles == 32
    for guide, kind in (
        (pfg.AutoFlowGuide(gaussian_model, estimator="reparam"), Trace_ELBO),
        (AutoNormal(gaussian_model), Trace_ELBO),
    ):
        seen.clear()
        pyro.clear_param_store()
        pfg.fit(gaussian_model, guide, steps=3, progress=False, callbacks=[_loss_of(seen)])
        assert type(seen[0]) is kind

    # With non-centred sites the STL guide trains on the ELBO.
    def hierarchy():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, a.exp()))

    seen.clear()
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(hierarchy)
    pfg.fit(hierarchy, guide, steps=3, progress=False, callbacks=[_loss_of(seen)])
    assert guide.noncentered_sites == ("b",) and guide.estimator == "stl"
    assert type(seen[0]) is Trace_ELBO and seen[0].num_particles == 32
    seen.clear()
    pyro.clear_param_store()
    result = pfg.fit(
        gaussian_model,
        pfg.AutoFlowGuide(gaussian_model),
        steps=3,
        vectorize_particles=False,
        progress=False,
        callbacks=[_loss_of(seen)],
    )
    assert type(seen[0]) is RenyiDReG_ELBO and not seen[0].vectorize_particles
    assert result.num_particles == 4 and all(math.isfinite(v) for v in result.losses)
