"""Small models shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

__all__ = [
    "EIGHT_SCHOOLS_SIGMA",
    "EIGHT_SCHOOLS_Y",
    "GAUSSIAN_MIXTURE_DATA",
    "MOG2D_LOCS",
    "banana",
    "banana_draws",
    "banana_log_density",
    "eight_schools_centered",
    "eight_schools_noncentered",
    "funnel10",
    "gaussian_mixture",
    "linear_regression",
    "linear_regression_data",
    "local_linear",
    "logreg",
    "logreg_data",
    "mog2d",
    "mog2d_distribution",
    "sample_target",
    "target_log_density",
]


def banana() -> None:
    r"""Banana: :math:`z_1 \sim N(0, 10^2)`, :math:`z_2 \mid z_1 \sim N(0.03 z_1^2 - 3, 1)`.

    Sites ``z1``, ``z2`` (scalars). No data: the posterior is this joint.
    """
    z1 = pyro.sample("z1", dist.Normal(0.0, 10.0))
    pyro.sample("z2", dist.Normal(0.03 * z1**2 - 3.0, 1.0))


def funnel10() -> None:
    r"""Neal's funnel in 10 dimensions: :math:`v \sim N(0, 3^2)`,
    :math:`x_i \mid v \sim N(0, e^{v})` (std :math:`e^{v/2}`), :math:`i = 1..9`.

    Sites ``v`` (scalar) and ``x`` (event shape ``(9,)``).
    """
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2).unsqueeze(-1)
    # expand against v's batch shape so vectorised particles (v of shape (N,)) work
    pyro.sample("x", dist.Normal(0.0, scale).expand(v.shape + (9,)).to_event(1))


MOG2D_LOCS = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])


def mog2d_distribution() -> dist.MixtureSameFamily:
    return dist.MixtureSameFamily(
        dist.Categorical(probs=torch.tensor([0.5, 0.5])),
        dist.Normal(MOG2D_LOCS, 1.0).to_event(1),
    )


def mog2d() -> None:
    r"""Two-component Gaussian mixture :math:`\tfrac12 N((1,1), I) + \tfrac12 N((-2,-2), I)`.

    One site ``z`` (event shape ``(2,)``) under a flat prior, plus a
    ``pyro.factor`` with the mixture's log density, so the posterior is exactly
    the mixture and ``log p(x, z)`` is its normalised log density.

    The flat prior is ``Normal(0, 1).expand([2]).to_event(1).mask(False)``: a
    masked site contributes nothing to the joint density, exactly like
    ``ImproperUniform``, but unlike it can be sampled, so Pyro's
    ``init_to_median`` / ``init_to_feasible`` (which draw from the site) work
    and start every guide at the origin.
    """
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1).mask(False))
    pyro.factor("mixture", mog2d_distribution().log_prob(z))


#: The eight schools data (Rubin 1981): estimated effects and their standard errors.
EIGHT_SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools_centered() -> None:
    r"""Eight schools, centered: :math:`\mu \sim N(0, 5^2)`, :math:`\tau \sim
    \mathrm{HalfCauchy}(5)`, :math:`\theta_j \sim N(\mu, \tau^2)`,
    :math:`y_j \sim N(\theta_j, \sigma_j^2)`.

    Sites ``mu``, ``tau`` (scalars), ``theta`` (plate ``schools`` of 8, dim -1).
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, EIGHT_SCHOOLS_SIGMA), obs=EIGHT_SCHOOLS_Y)


def eight_schools_noncentered() -> None:
    r"""The same posterior as :func:`eight_schools_centered` with
    :math:`\theta_j = \mu + \tau \tilde\theta_j`, :math:`\tilde\theta_j \sim N(0, 1)`.

    The easy geometry for NUTS; used only to build the reference. Sites
    ``mu``, ``tau``, ``theta_tilde``; ``theta`` is recorded as a deterministic.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("y", dist.Normal(theta, EIGHT_SCHOOLS_SIGMA), obs=EIGHT_SCHOOLS_Y)


def logreg_data(
    num_points: int = 500, num_features: int = 25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The synthetic logistic-regression data set.

    Drawn with ``numpy.random.default_rng(seed)`` in this order: features
    :math:`X_{nd} \sim N(0, 1)` of shape ``(num_points, num_features)``, true
    weights :math:`w_d \sim N(0, 1)`, labels :math:`y_n \sim
    \mathrm{Bernoulli}(\sigma(X_n \cdot w))`. No intercept.

    Returns:
        ``(X, y, w_true)`` as float32 tensors.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_points, num_features))
    w = rng.standard_normal(num_features)
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    y = (rng.uniform(size=num_points) < p).astype(np.float32)
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return as_tensor(x), as_tensor(y), as_tensor(w)


_LOGREG_X, _LOGREG_Y, _ = logreg_data()


def logreg() -> None:
    r"""Bayesian logistic regression: :math:`w \sim N(0, I_{25})`,
    :math:`y_n \sim \mathrm{Bernoulli}(\mathrm{logits} = X_n \cdot w)` on the
    500 points of :func:`logreg_data`.

    Sites ``w`` (event shape ``(25,)``) and observed ``y`` (plate ``data`` of 500).
    """
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([25]).to_event(1))
    # Under an outer particle plate w is (N, 1, 25): the singleton lines up with
    # the data plate, so (X * w).sum(-1) is (N, 500); a matmul would give (N, 1, 500).
    logits = (_LOGREG_X * w).sum(-1)
    with pyro.plate("data", _LOGREG_X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=_LOGREG_Y)


def banana_draws(num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` exact draws of the banana, shape ``(num, 2)``."""
    z1 = 10.0 * rng.standard_normal(num)
    z2 = 0.03 * z1**2 - 3.0 + rng.standard_normal(num)
    return np.stack([z1, z2], axis=-1)


def banana_log_density(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The banana's normalised log density at ``(z1, z2)``."""
    return dist.Normal(0.0, 10.0).log_prob(z1) + dist.Normal(0.03 * z1**2 - 3.0, 1.0).log_prob(z2)


def linear_regression(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    r"""The README's regression: :math:`y_n \sim N(a + b x_n, \sigma^2)`.

    Priors :math:`a, b \sim N(0, 10^2)`, :math:`\sigma \sim \mathrm{HalfNormal}(5)`;
    sites ``a``, ``b``, ``sigma`` and observed ``y`` (plate ``data``).
    """
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)


def linear_regression_data(
    num_points: int = 50, intercept: float = 1.0, slope: float = 0.5, noise: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for :func:`linear_regression`: ``x`` evenly spaced on [-2, 2]."""
    x = torch.linspace(-2, 2, num_points)
    y = intercept + slope * x + noise * torch.randn(num_points, generator=torch.Generator().manual_seed(seed))
    return x, y


def sample_target(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` exact draws of the demo's density target ``a ~ U[1, 2]``, ``b | a ~ N(a, a)``, shape ``(n, 2)``."""
    a = 1 + torch.rand(n, generator=generator)
    b = a + a.sqrt() * torch.randn(n, generator=generator)
    return torch.stack([a, b], dim=-1)


def target_log_density(x: torch.Tensor) -> torch.Tensor:
    """The exact log-density of ``(a, b)`` at the rows of ``x`` (``log U[1, 2] = 0``)."""
    a, b = x[..., 0], x[..., 1]
    return dist.Normal(a, a.sqrt()).log_prob(b)


def local_linear(x: torch.Tensor, batch_size: int | None = None) -> None:
    r"""One local latent per datum: :math:`z_n \sim N(0, 1)`, :math:`x_n \sim N(2 z_n + 1, 0.5^2)`.

    Sites ``z`` and observed ``x`` in plate ``data``, subsampled to ``batch_size``
    (the amortized guide's benchmark model).
    """
    with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(2 * z + 1, 0.5), obs=x[idx])


#: The five points of Pyro's Gaussian-mixture tutorial.
GAUSSIAN_MIXTURE_DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])


@pyro.infer.config_enumerate
def gaussian_mixture(data: torch.Tensor) -> None:
    """Pyro's Gaussian-mixture tutorial: two components, the assignments enumerated.

    Sites ``weights``, ``scale``, ``locs`` (plate ``components``), the discrete
    ``assignment`` and observed ``obs`` (plate ``data``); train with
    ``TraceEnum_ELBO(max_plate_nesting=1)``.
    """
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(2)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)
