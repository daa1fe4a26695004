"""AutoFlowGuide's choice between its full flow and the structured posterior (``structure=``)."""

from __future__ import annotations

import io

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_flowguide as pfg
from pyro_flowguide.guides.dispatch import STRUCTURED_MIN_DIM

J_LARGE = 150  # latents: J + 1, above STRUCTURED_MIN_DIM
J_SMALL = 20


def group_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def data(groups: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 + torch.randn(groups, generator=g) * 1.5


def exact_posterior(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of (mu, theta_1..J): a Gaussian model, in closed form."""
    J = y.shape[0]
    # Precision of (mu, theta): priors mu ~ N(0, 25), theta_j | mu ~ N(mu, 1), y_j | theta_j ~ N(theta_j, 1).
    prec = torch.zeros(J + 1, J + 1, dtype=torch.float64)
    prec[0, 0] = 1 / 25 + J
    prec[0, 1:] = prec[1:, 0] = -1.0
    prec[1:, 1:] = torch.eye(J, dtype=torch.float64) * 2.0
    b = torch.cat([torch.zeros(1, dtype=torch.float64), y.double()])
    cov = torch.linalg.inv(prec)
    return cov @ b, cov.diagonal().sqrt()


def test_the_default_is_the_structured_posterior_from_its_size_with_linear_parameters():
    pyro.clear_param_store()
    y = data(J_LARGE)
    guide = pfg.AutoFlowGuide(group_model)
    draw = guide(y)
    assert draw["theta"].shape == (J_LARGE,) and draw["mu"].shape == ()
    assert isinstance(guide.structured, pfg.AutoStructuredFlowGuide)
    D = J_LARGE + 1
    assert guide.latent_dim == D >= STRUCTURED_MIN_DIM
    params = sum(p.numel() for p in guide.parameters())
    assert params <= 200 * D + 100_000
    # Every parameter is in the param store, under this guide's name.
    stored = {name for name in pyro.get_param_store().keys() if name.startswith("AutoFlowGuide.")}
    assert len(stored) == len(list(guide.parameters()))


def test_small_models_and_explicit_flow_options_keep_the_full_flow():
    pyro.clear_param_store()
    small = pfg.AutoFlowGuide(group_model)
    small(data(J_SMALL))
    assert small.structured is None and small.get_posterior() is not None
    for options in ({"structure": "full"}, {"hidden_features": (8,)}, {"flow": "MAF"}, {"covariance": "diagonal"}):
        pyro.clear_param_store()
        guide = pfg.AutoFlowGuide(group_model, **options)
        guide(data(J_LARGE))
        assert guide.structured is None, options


def test_structure_is_checked_with_the_options_it_cannot_take():
    with pytest.raises(ValueError, match="structure must be 'auto', 'full'"):
        pfg.AutoFlowGuide(group_model, structure="local")
    with pytest.raises(ValueError, match="hidden_features configure the full flow.*AutoStructuredFlowGuide"):
        pfg.AutoFlowGuide(group_model, structure="sites", hidden_features=(8,))
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(group_model, structure="sites")
    guide(data(J_SMALL))
    assert guide.structured is not None


def test_the_structured_default_has_no_flat_posterior_and_says_what_to_build():
    pyro.clear_param_store()
    y = data(J_LARGE)
    guide = pfg.AutoFlowGuide(group_model)
    guide(y)
    for method in (guide.get_posterior, guide.get_transform):
        with pytest.raises(NotImplementedError, match="structure='full'"):
            method(y)
    with pytest.raises(NotImplementedError, match="structure='full'"):
        guide.get_base_dist()
    with pytest.raises(NotImplementedError, match="structure='full'"):
        guide.affine_loc


def test_the_structured_default_pickles_and_the_live_guide_keeps_working():
    pyro.clear_param_store()
    y = data(J_LARGE)
    guide = pfg.AutoFlowGuide(group_model)
    pfg.fit(group_model, guide, y, steps=20, progress=False, seed=0)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.manual_seed(3)
    mine = guide.sample_posterior(50, y)
    torch.manual_seed(3)
    theirs = loaded.sample_posterior(50, y)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(guide.median(y)["theta"], loaded.median(y)["theta"])
    # Pickling must not cut the live guide from its model or its plates.
    assert guide(y)["theta"].shape == (J_LARGE,)
    assert pfg.psis_diagnostic(group_model, guide, y).khat is not None
    assert loaded(y)["theta"].shape == (J_LARGE,)


@pytest.mark.slow
def test_the_structured_default_fits_a_gaussian_hierarchy_to_its_closed_form():
    pyro.clear_param_store()
    y = data(J_LARGE, seed=1)
    guide = pfg.AutoFlowGuide(group_model)
    result = pfg.fit(group_model, guide, y, steps=1500, progress=False, seed=0)
    assert result.stop_reason == "completed"
    mean, sd = exact_posterior(y)
    torch.manual_seed(0)
    draws = guide.sample_posterior(4000, y)
    flat = torch.cat([draws["mu"][:, None], draws["theta"]], -1).double()
    error = ((flat.mean(0) - mean) / sd).abs()
    ratio = flat.std(0) / sd
    assert error.max() < 0.15, error.max()
    assert 0.85 < ratio.min() and ratio.max() < 1.15, (ratio.min(), ratio.max())



def test_a_model_the_structured_posterior_cannot_read_is_told_about_the_full_flow(monkeypatch):
    from pyro_flowguide.guides import structured

    def refuse(trace, model_name):
        raise pfg.GuideSetupError(f"site 'theta' of model {model_name!r}: refused for the test")

    monkeypatch.setattr(structured, "read_sites", refuse)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(group_model)
    for _ in range(2):  # and again: no half-built guide
        with pytest.raises(pfg.GuideSetupError, match="refused for the test.*structure='full'"):
            guide(data(J_LARGE))
    assert guide.structured is None
    full = pfg.AutoFlowGuide(group_model, structure="full")
    assert full(data(J_LARGE))["theta"].shape == (J_LARGE,)


def regression_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(w @ X.T, 1.0).to_event(1), obs=y)


@pytest.mark.slow
def test_a_vector_of_correlated_coefficients_keeps_its_correlations():
    # One vector site of 120 coefficients, no plate, no global: a chain of the
    # structured posterior, whose dense factor carries the correlations.
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(300, 1, generator=g)
    X = 0.9 * factor + 0.436 * torch.randn(300, 120, generator=g)
    y = X @ (0.5 * torch.randn(120, generator=g)) + torch.randn(300, generator=g)
    cov = torch.linalg.inv(torch.eye(120, dtype=torch.float64) + X.T.double() @ X.double())
    mean, sd = cov @ (X.T.double() @ y.double()), cov.diagonal().sqrt()
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(regression_model)
    pfg.fit(regression_model, guide, X, y, steps=1500, progress=False, seed=0)
    assert guide.structured is not None
    torch.manual_seed(0)
    w = guide.sample_posterior(4000, X, y)["w"].double()
    assert ((w.mean(0) - mean) / sd).abs().max() < 0.3
    ratio = w.std(0) / sd
    assert 0.6 < ratio.min() and ratio.max() < 1.2, (ratio.min(), ratio.max())
    # The sum of the coefficients: the posterior's most correlated direction.
    assert 0.8 < float(w.sum(-1).std() / cov.sum().sqrt()) < 1.25
