"""The models of ``benchmarks/scale.py`` and their reference posteriors.

* ``hier``: ``mu ~ N(0, 5)``, ``tau ~ HalfNormal(5)``, ``theta_j ~ N(mu, tau)``
  (centred, a plate of ``J = D - 2`` groups), ``y_jk ~ N(theta_j, 1)``,
  ``k = 1..3``. Reference: exact moments from a grid over ``(mu, log tau)`` of
  the marginal likelihood (``theta`` integrated out), mixed with the exact
  Gaussian conditionals of ``theta`` given ``(mu, tau)``.
* ``sv``: stochastic volatility, centred: ``mu ~ N(0, 2)``,
  ``(phi + 1) / 2 ~ Beta(20, 1.5)``, ``sigma ~ HalfNormal(0.5)``, the
  ``T = D - 3`` log-volatilities ``h ~ AR1(mu, phi, sigma)`` as ONE vector site,
  ``y_t ~ N(0, exp(h_t / 2))``. Reference: NumPyro NUTS, cached.
* ``linreg``: a linear regression of 500 rows on ``D`` predictors that share
  one factor (pairwise correlation 0.81), coefficients ``w ~ N(0, 1)`` as ONE
  vector site, known noise 1: no plate and no global, a posterior with strong
  correlations between the coefficients. Reference: exact (Gaussian).

Each reference is ``{"names": [...], "mean": (D,), "sd": (D,)}`` over the
constrained latents in the model's flat order (sites in trace order, each
flattened row-major).
"""

from __future__ import annotations

import math
import os

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyro_flowguide.guides.structured_parts import ar1_scan

SIGMA_Y = 1.0
K_OBS = 3
SV_TRUE = {"mu": -1.0, "phi": 0.95, "sigma": 0.25}


# ------------------------------------------------------------------ hierarchical normal
def hier_data(groups: int, seed: int = 0) -> torch.Tensor:
    """``(groups, K_OBS)`` observations from ``mu = 1``, ``tau = 1.5``."""
    gen = torch.Generator().manual_seed(seed)
    theta = 1.0 + 1.5 * torch.randn(groups, generator=gen)
    return theta[:, None] + SIGMA_Y * torch.randn(groups, K_OBS, generator=gen)


def hier_model(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", y.shape[0], dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("obs", y.shape[1], dim=-2):
            pyro.sample("y", dist.Normal(theta, SIGMA_Y), obs=y.T)


def hier_reference(y: torch.Tensor, n_grid: int = 300) -> dict:
    """Exact posterior means and sds of ``mu``, ``tau`` and ``theta`` (a grid over ``(mu, log tau)``)."""
    y = y.double()
    ybar, s2 = y.mean(1), SIGMA_Y**2 / y.shape[1]

    def log_density(mu: torch.Tensor, log_tau: torch.Tensor) -> torch.Tensor:
        tau = log_tau.exp()
        var = tau[..., None] ** 2 + s2
        lik = (-0.5 * (ybar - mu[..., None]) ** 2 / var - 0.5 * var.log()).sum(-1)
        return lik - 0.5 * (mu / 5.0) ** 2 - 0.5 * (tau / 5.0) ** 2 + log_tau  # + log|d tau / d log tau|

    start = [ybar.mean().item(), 0.5 * math.log(max(ybar.var().item() - s2, 1e-2))]
    x = torch.tensor(start, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([x], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -log_density(x[0], x[1])
        loss.backward()
        return loss

    opt.step(closure)
    hess = torch.autograd.functional.hessian(lambda v: -log_density(v[0], v[1]), x.detach())
    sd = torch.linalg.inv(hess).diagonal().sqrt()
    grids = [torch.linspace(x[i].item() - 10 * sd[i].item(), x[i].item() + 10 * sd[i].item(), n_grid,
                            dtype=torch.double) for i in range(2)]
    mu, log_tau = torch.meshgrid(*grids, indexing="ij")
    rows = max(1, min(20, int(2e7 // (n_grid * y.shape[0]))))  # grid rows per pass: about 160 MB of doubles
    lp = torch.cat([log_density(mu[i : i + rows], log_tau[i : i + rows]) for i in range(0, n_grid, rows)])
    w = (lp - lp.max()).exp().reshape(-1)
    w = w / w.sum()
    mu, tau2 = mu.reshape(-1), log_tau.reshape(-1).exp() ** 2
    shrink = s2 / (tau2 + s2)  # theta | mu, tau ~ N(shrink mu + (1 - shrink) ybar, tau2 shrink)

    def mean_of(f: torch.Tensor) -> torch.Tensor:
        return (w * f).sum()

    c1, c2, var = mu * shrink, 1 - shrink, tau2 * shrink
    th_mean = mean_of(c1) + mean_of(c2) * ybar
    th_m2 = mean_of(var) + mean_of(c1 * c1) + 2 * mean_of(c1 * c2) * ybar + mean_of(c2 * c2) * ybar**2
    tau = tau2.sqrt()
    mean = torch.cat([mean_of(mu)[None], mean_of(tau)[None], th_mean])
    sd = torch.cat([(mean_of(mu**2) - mean_of(mu) ** 2).sqrt()[None],
                    (mean_of(tau2) - mean_of(tau) ** 2).sqrt()[None],
                    (th_m2 - th_mean**2).clamp_min(0).sqrt()])
    return {"names": ["mu", "tau", "theta"], "mean": mean, "sd": sd}


# ------------------------------------------------------------------ stochastic volatility
class AR1(dist.TorchDistribution):
    """Stationary AR(1): ``h_1 ~ N(mu, sigma / sqrt(1 - phi^2))``, ``h_t ~ N(mu + phi (h_{t-1} - mu), sigma)``."""

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, mu, phi, sigma, length: int, validate_args=None) -> None:
        self.mu, self.phi, self.sigma = torch.as_tensor(mu), torch.as_tensor(phi), torch.as_tensor(sigma)
        self.length = length
        batch_shape = torch.broadcast_shapes(self.mu.shape, self.phi.shape, self.sigma.shape)
        super().__init__(batch_shape, torch.Size([length]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return AR1(self.mu.expand(batch_shape), self.phi.expand(batch_shape), self.sigma.expand(batch_shape),
                   self.length)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = sample_shape + self.batch_shape + (self.length,)
            mu, phi, sigma = (v[..., None] for v in (self.mu, self.phi, self.sigma))
            z = sigma * torch.randn(shape)
            first = z[..., :1] / (1 - phi**2).sqrt().expand(z[..., :1].shape)
            return mu + ar1_scan(torch.as_tensor(phi, dtype=z.dtype).expand(shape), torch.cat([first, z[..., 1:]], -1))

    def log_prob(self, h):
        mu, phi, sigma = (v[..., None] for v in (self.mu, self.phi, self.sigma))
        x = h - mu
        first = dist.Normal(0.0, sigma[..., 0] / (1 - phi[..., 0] ** 2).sqrt()).log_prob(x[..., 0])
        return first + dist.Normal(phi * x[..., :-1], sigma).log_prob(x[..., 1:]).sum(-1)


def sv_data(length: int, seed: int = 0) -> torch.Tensor:
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    p = SV_TRUE
    h = AR1(p["mu"], p["phi"], p["sigma"], length).sample()
    y = torch.randn(length) * (h / 2).exp()
    torch.set_rng_state(gen_state)
    return y


def sv_model(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    phi = 2.0 * pyro.sample("phi01", dist.Beta(20.0, 1.5)) - 1.0  # Kim, Shephard & Chib's prior
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    h = pyro.sample("h", AR1(mu, phi, sigma, y.shape[-1]))
    # One event of T observations: h's particle dimensions are batch dimensions left of its event.
    pyro.sample("y", dist.Normal(0.0, (h / 2).exp()).to_event(1), obs=y)


def sv_reference_nuts(y: torch.Tensor, num_samples: int, num_warmup: int, seed: int = 0) -> dict:
    """NumPyro NUTS on the same density, two chains run one after the other."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as nd
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS

    jax.config.update("jax_enable_x64", True)
    yj = jnp.asarray(y.double().numpy())

    def model():
        mu = numpyro.sample("mu", nd.Normal(0.0, 2.0))
        phi = 2.0 * numpyro.sample("phi01", nd.Beta(20.0, 1.5)) - 1.0
        sigma = numpyro.sample("sigma", nd.HalfNormal(0.5))
        h = numpyro.sample("h", nd.ImproperUniform(nd.constraints.real_vector, (), (yj.shape[0],)))
        x = h - mu
        lp = nd.Normal(0.0, sigma / jnp.sqrt(1 - phi**2)).log_prob(x[0])
        numpyro.factor("ar1", lp + nd.Normal(phi * x[:-1], sigma).log_prob(x[1:]).sum())
        numpyro.sample("y", nd.Normal(0.0, jnp.exp(h / 2)), obs=yj)

    mcmc = MCMC(NUTS(model, target_accept_prob=0.9), num_warmup=num_warmup, num_samples=num_samples,
                num_chains=2, chain_method="sequential", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed))
    s = mcmc.get_samples()
    flat = np.concatenate([np.asarray(s["mu"])[:, None], np.asarray(s["phi01"])[:, None],
                           np.asarray(s["sigma"])[:, None], np.asarray(s["h"])], 1)
    chains = flat.reshape(2, -1, flat.shape[1])
    ess, rhat = effective_sample_size(chains), split_gelman_rubin(chains)
    return {"names": ["mu", "phi01", "sigma", "h"], "mean": torch.tensor(flat.mean(0)),
            "sd": torch.tensor(flat.std(0)), "min_ess": float(np.min(ess)), "max_rhat": float(np.max(rhat))}


def sv_reference(y: torch.Tensor, seed: int, cache_dir: str, nuts: tuple[int, int] = (3000, 1000)) -> dict | None:
    """The cached NUTS reference of ``sv`` at ``len(y) + 3`` latents, computed once; ``None`` without NumPyro."""
    path = os.path.join(cache_dir, f"sv_D{y.shape[-1] + 3}_seed{seed}_nuts{nuts[0]}x{nuts[1]}.pt")
    if os.path.exists(path):
        return torch.load(path)
    try:
        import numpyro  # noqa: F401
    except ImportError:
        return None
    ref = sv_reference_nuts(y, *nuts, seed=seed)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(ref, path)
    return ref


# ------------------------------------------------------------------ correlated regression
def linreg_data(predictors: int, seed: int = 0, rows: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)``: predictors of pairwise correlation 0.81 and ``y = X w + noise``."""
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn(rows, 1, generator=gen)
    X = 0.9 * factor + math.sqrt(1 - 0.81) * torch.randn(rows, predictors, generator=gen)
    w = 0.5 * torch.randn(predictors, generator=gen)
    return X, X @ w + torch.randn(rows, generator=gen)


def linreg_model(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    X, y = data
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(w @ X.T, 1.0).to_event(1), obs=y)


def linreg_reference(data: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The exact posterior's means and sds: precision ``I + X^T X``."""
    X, y = (t.double() for t in data)
    cov = torch.linalg.inv(torch.eye(X.shape[1], dtype=X.dtype) + X.T @ X)
    return {"names": ["w"], "mean": cov @ (X.T @ y), "sd": cov.diagonal().sqrt()}


#: name -> (model, data for D latents and a seed, max plate nesting, site names, reference(data, seed, cache)).
MODELS = {
    "hier": (hier_model, lambda D, seed: hier_data(D - 2, seed), 2, ["mu", "tau", "theta"],
             lambda y, seed, cache: hier_reference(y)),
    "sv": (sv_model, lambda D, seed: sv_data(D - 3, seed), 0, ["mu", "phi01", "sigma", "h"], sv_reference),
    "linreg": (linreg_model, lambda D, seed: linreg_data(D, seed), 0, ["w"],
               lambda data, seed, cache: linreg_reference(data)),
}
