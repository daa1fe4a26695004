"""Real-model posteriors for benchmarking guides (issue 29, item 1).

Every target is a classic, publicly documented model, written twice:

* ``pyro_model(*pyro_args)``: what the guides fit.  No plates: vector latents are
  ``.expand([K]).to_event(1)`` and observations ``.to_event(1)``, so that a
  vectorised-particle plate lands at dim -1 and scalar latents get shape ``(P,)``;
  the code therefore indexes with ``[..., None]`` / ``[..., idx]``.
* ``numpyro_model(*numpyro_args)``: the same density in NumPyro, same site names,
  same constrained coordinates (checked by ``checks.py``).
* ``nuts_model``: what the reference NUTS runs.  Either ``numpyro_model`` itself
  or a reparameterised version with ``numpyro.deterministic`` sites carrying the
  Pyro-coordinate values (checked the same way, with the Jacobian).

Data are either shipped by a registry package (statsmodels' sunspots), a small
published literal table (Efron-Morris hits), or synthetic with a fixed
``numpy.random.default_rng`` seed and a realistic shape.

Importing this module only needs numpy and torch/pyro; NumPyro and JAX are
imported inside the NumPyro model bodies.

Flat order: latent sites in ``latents`` order (= Pyro trace order), each
flattened row-major; ``Target.flatten`` maps a dict of draws (leading sample
dim) to a ``(num, dim)`` array.  ``Target.metric_transform`` (optional) is
applied to flat arrays before computing accuracy metrics (used for the
horseshoe's Cauchy-tailed scales, compared on the log scale).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch

# --------------------------------------------------------------------------- #
# Target container
# --------------------------------------------------------------------------- #


@dataclass
class Target:
    name: str
    description: str
    source: str
    pyro_model: Callable
    numpyro_model: Callable
    make_data: Callable[[], dict]          # numpy arrays / python scalars
    arg_names: tuple                       # order of model arguments
    latents: dict                          # site -> (shape, flat-label prefix)
    nuts_model: Callable | None = None     # default: numpyro_model
    nuts: dict = field(default_factory=dict)   # warm-up, draws, target_accept, dense_mass, ...
    postprocess: Callable | None = None    # (pooled flat draws, rng) -> draws, e.g. symmetrise
    metric_transform: Callable | None = None
    notes: str = ""

    @cached_property
    def data(self) -> dict:
        return self.make_data()

    def pyro_args(self, dtype=None):
        dtype = dtype or torch.get_default_dtype()
        out = []
        for k in self.arg_names:
            v = self.data[k]
            if isinstance(v, np.ndarray):
                v = torch.as_tensor(v, dtype=torch.long if v.dtype.kind in "iu" else dtype)
            out.append(v)
        return tuple(out)

    def numpyro_args(self):
        import jax.numpy as jnp

        out = []
        for k in self.arg_names:
            v = self.data[k]
            out.append(jnp.asarray(v) if isinstance(v, np.ndarray) else v)
        return tuple(out)

    @property
    def dim(self) -> int:
        return sum(int(np.prod(s)) for s, _ in self.latents.values())

    @property
    def labels(self) -> list[str]:
        out = []
        for name, (shape, _) in self.latents.items():
            n = int(np.prod(shape))
            out += [name] if shape == () else [f"{name}[{i}]" for i in range(n)]
        return out

    def flatten(self, draws: dict) -> np.ndarray:
        """dict site -> array (num, *shape) -> (num, dim), constrained space."""
        cols = []
        for name, (shape, _) in self.latents.items():
            v = draws[name]
            v = v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
            k = int(np.prod(shape))
            v = v.reshape(-1, *shape) if shape else v.reshape(-1)
            cols.append(v.reshape(v.shape[0], k).astype(np.float64))
        return np.concatenate(cols, axis=1)

    def unflatten(self, flat: np.ndarray) -> dict:
        out, i = {}, 0
        for name, (shape, _) in self.latents.items():
            k = int(np.prod(shape))
            out[name] = flat[:, i:i + k].reshape(flat.shape[0], *shape)
            i += k
        return out

    def for_metrics(self, flat: np.ndarray) -> np.ndarray:
        return self.metric_transform(flat) if self.metric_transform else flat


def _t(x):
    """Scalar latent -> broadcastable against a trailing data axis."""
    return x[..., None] if torch.is_tensor(x) else x


# --------------------------------------------------------------------------- #
# 1. radon-like hierarchical regression, centred (Gelman & Hill varying intercept)
# --------------------------------------------------------------------------- #

RADON_J, RADON_N = 85, 919


def radon_data():
    rng = np.random.default_rng(1)
    # county sizes: heavy-tailed like the Minnesota radon survey (many 1-5, a few 50+)
    w = rng.lognormal(0.0, 1.1, RADON_J)
    sizes = np.maximum(1, np.floor(w / w.sum() * (RADON_N - RADON_J)).astype(int) + 1)
    sizes[np.argmax(sizes)] += RADON_N - sizes.sum()
    county = np.repeat(np.arange(RADON_J), sizes)
    floor = (rng.random(RADON_N) < 0.17).astype(float)      # ~17% first-floor measurements
    a = 1.5 + 0.32 * rng.standard_normal(RADON_J)
    y = a[county] - 0.69 * floor + 0.73 * rng.standard_normal(RADON_N)
    return dict(county=county.astype(np.int64), floor=floor, log_radon=y)


def radon_numpyro(county, floor, log_radon):
    import numpyro
    import numpyro.distributions as nd

    mu_a = numpyro.sample("mu_a", nd.Normal(0.0, 10.0))
    sigma_a = numpyro.sample("sigma_a", nd.HalfNormal(5.0))
    a = numpyro.sample("a", nd.Normal(mu_a, sigma_a).expand([RADON_J]).to_event(1))
    b = numpyro.sample("b", nd.Normal(0.0, 10.0))
    sigma_y = numpyro.sample("sigma_y", nd.HalfNormal(5.0))
    numpyro.sample("y", nd.Normal(a[county] + b * floor, sigma_y).to_event(1), obs=log_radon)


def _locscale(model, sites):
    """NUTS version: LocScaleReparam(0) (non-centred) on `sites`; the Pyro-coordinate
    values come back as deterministic sites of the same names."""

    def nuts_model(*args):
        from numpyro.handlers import reparam
        from numpyro.infer.reparam import LocScaleReparam

        with reparam(config={s: LocScaleReparam(0) for s in sites}):
            model(*args)

    nuts_model.__name__ = model.__name__ + "_noncentred"
    return nuts_model


# Pyro's expand on a batched Normal: write the hierarchical sites with a helper.
def _hier(name, loc, scale, k):
    """pyro.sample of k iid Normal(loc, scale) as one event, batch-aware."""
    loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
    batch = torch.broadcast_shapes(loc.shape, scale.shape)
    return pyro.sample(name, dist.Normal(loc[..., None], scale[..., None]).expand(batch + (k,)).to_event(1))


def radon_pyro(county, floor, log_radon):
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(5.0))
    a = _hier("a", mu_a, sigma_a, RADON_J)
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(5.0))
    mean = a[..., county] + _t(b) * floor
    pyro.sample("y", dist.Normal(mean, _t(sigma_y)).to_event(1), obs=log_radon)


# --------------------------------------------------------------------------- #
# 2. Poisson GLMM with random intercepts
# --------------------------------------------------------------------------- #

GLMM_G, GLMM_N = 60, 600


def glmm_data():
    rng = np.random.default_rng(2)
    sizes = rng.multinomial(GLMM_N - 3 * GLMM_G, np.ones(GLMM_G) / GLMM_G) + 3
    group = np.repeat(np.arange(GLMM_G), sizes)
    x = np.stack([rng.standard_normal(GLMM_N), rng.random(GLMM_N) < 0.5], axis=1).astype(float)
    u = 0.5 * rng.standard_normal(GLMM_G)
    rate = np.exp(0.4 + x @ np.array([0.3, -0.25]) + u[group])
    y = rng.poisson(rate).astype(float)
    return dict(group=group.astype(np.int64), x=x, counts=y)


def glmm_pyro(group, x, counts):
    b0 = pyro.sample("b0", dist.Normal(0.0, 5.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    sigma_u = pyro.sample("sigma_u", dist.HalfNormal(1.0))
    u = _hier("u", torch.zeros(()), sigma_u, GLMM_G)
    eta = _t(b0) + (beta[..., None, :] * x).sum(-1) + u[..., group]
    pyro.sample("y", dist.Poisson(eta.exp()).to_event(1), obs=counts)


def glmm_numpyro(group, x, counts):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    b0 = numpyro.sample("b0", nd.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", nd.Normal(0.0, 1.0).expand([2]).to_event(1))
    sigma_u = numpyro.sample("sigma_u", nd.HalfNormal(1.0))
    u = numpyro.sample("u", nd.Normal(0.0, sigma_u).expand([GLMM_G]).to_event(1))
    eta = b0 + x @ beta + u[group]
    numpyro.sample("y", nd.Poisson(jnp.exp(eta)).to_event(1), obs=counts)


# --------------------------------------------------------------------------- #
# 3. Efron-Morris batting averages: hierarchical binomial on the log-odds scale
#    (the "partial pooling, log odds" model of the Stan case study)
# --------------------------------------------------------------------------- #

# Hits in the first 45 at-bats of the 1970 season, Efron & Morris (1975), Table 1:
# Clemente, F. Robinson, F. Howard, Johnstone, Berry, Spencer, Kessinger, L. Alvarado,
# Santo, Swoboda, Unser, Williams, Scott, Petrocelli, E. Rodriguez, Campaneris,
# Munson, Alvis.
EFRON_MORRIS_HITS = [18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7]


def baseball_data():
    return dict(at_bats=np.full(18, 45.0), hits=np.array(EFRON_MORRIS_HITS, dtype=float))


def baseball_pyro(at_bats, hits):
    mu = pyro.sample("mu", dist.Normal(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    alpha = _hier("alpha", mu, sigma, 18)
    pyro.sample("y", dist.Binomial(at_bats, logits=alpha).to_event(1), obs=hits)


def baseball_numpyro(at_bats, hits):
    import numpyro
    import numpyro.distributions as nd

    mu = numpyro.sample("mu", nd.Normal(-1.0, 1.0))
    sigma = numpyro.sample("sigma", nd.HalfNormal(1.0))
    alpha = numpyro.sample("alpha", nd.Normal(mu, sigma).expand([18]).to_event(1))
    numpyro.sample("y", nd.Binomial(at_bats, logits=alpha).to_event(1), obs=hits)


# --------------------------------------------------------------------------- #
# 4. Sparse logistic regression, regularised horseshoe (Piironen & Vehtari 2017)
# --------------------------------------------------------------------------- #

HS_N, HS_D, HS_P0 = 200, 24, 3          # rows, predictors, prior guess of non-zeros
HS_SLAB_SCALE, HS_SLAB_DF = 2.0, 4.0


def horseshoe_data():
    rng = np.random.default_rng(4)
    # moderately correlated design (AR(1) correlation 0.5), standardised
    cov = 0.5 ** np.abs(np.subtract.outer(np.arange(HS_D), np.arange(HS_D)))
    X = rng.multivariate_normal(np.zeros(HS_D), cov, size=HS_N)
    X = (X - X.mean(0)) / X.std(0)
    w = np.zeros(HS_D)
    w[[0, 5, 11]] = [2.0, -1.5, 1.0]
    y = (rng.random(HS_N) < 1 / (1 + np.exp(-(-0.3 + X @ w)))).astype(float)
    # tau0 = p0 / (D - p0) * pseudo_sigma / sqrt(n), pseudo_sigma = 2 for logistic
    tau0 = HS_P0 / (HS_D - HS_P0) * 2.0 / math.sqrt(HS_N)
    return dict(X=X, y=y, tau0=tau0)


def horseshoe_pyro(X, y, tau0):
    b0 = pyro.sample("b0", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(tau0))
    lam = pyro.sample("lam", dist.HalfCauchy(1.0).expand([HS_D]).to_event(1))
    c2 = pyro.sample("c2", dist.InverseGamma(0.5 * HS_SLAB_DF, 0.5 * HS_SLAB_DF * HS_SLAB_SCALE ** 2))
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([HS_D]).to_event(1))
    lam_t = torch.sqrt(_t(c2) * lam ** 2 / (_t(c2) + _t(tau) ** 2 * lam ** 2))
    beta = z * _t(tau) * lam_t
    logits = _t(b0) + (beta[..., None, :] * X).sum(-1)
    pyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=y)


def horseshoe_numpyro(X, y, tau0):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    b0 = numpyro.sample("b0", nd.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", nd.HalfCauchy(tau0))
    lam = numpyro.sample("lam", nd.HalfCauchy(1.0).expand([HS_D]).to_event(1))
    c2 = numpyro.sample("c2", nd.InverseGamma(0.5 * HS_SLAB_DF, 0.5 * HS_SLAB_DF * HS_SLAB_SCALE ** 2))
    z = numpyro.sample("z", nd.Normal(0.0, 1.0).expand([HS_D]).to_event(1))
    lam_t = jnp.sqrt(c2 * lam ** 2 / (c2 + tau ** 2 * lam ** 2))
    beta = z * tau * lam_t
    numpyro.sample("obs", nd.Bernoulli(logits=b0 + X @ beta).to_event(1), obs=y)


def _horseshoe_metric_transform(flat):
    # columns: b0, tau, lam[24], c2, z[24]; tau, lam, c2 have Cauchy / inverse-gamma
    # tails (lam: no mean) -> compare them on the log scale.
    out = flat.copy()
    out[:, 1:2 + HS_D + 1] = np.log(out[:, 1:2 + HS_D + 1])
    return out


# --------------------------------------------------------------------------- #
# 5. Stochastic volatility (Stan User's Guide, sec. "Stochastic volatility models")
# --------------------------------------------------------------------------- #

SV_T = 200


def sv_data():
    rng = np.random.default_rng(5)
    mu, phi, sigma = -1.0, 0.95, 0.25
    h = np.empty(SV_T)
    h[0] = mu + sigma / math.sqrt(1 - phi ** 2) * rng.standard_normal()
    for t in range(1, SV_T):
        h[t] = mu + phi * (h[t - 1] - mu) + sigma * rng.standard_normal()
    y = np.exp(h / 2) * rng.standard_normal(SV_T)
    return dict(returns=y)


def sv_pyro(returns):
    mu = pyro.sample("mu", dist.Cauchy(0.0, 10.0))
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(5.0))
    # h: no density of its own (a masked Normal so it can be initialised/sampled),
    # the stationary AR(1) density is added as a factor: p(h | mu, phi, sigma).
    h = pyro.sample("h", dist.Normal(0.0, 1.0).expand([SV_T]).to_event(1).mask(False))
    mu_, phi_, sigma_ = _t(mu), _t(phi), _t(sigma)
    lp0 = dist.Normal(mu, sigma / torch.sqrt(1 - phi ** 2)).log_prob(h[..., 0])
    lp = dist.Normal(mu_ + phi_ * (h[..., :-1] - mu_), sigma_).log_prob(h[..., 1:]).sum(-1)
    pyro.factor("h_ar1", lp0 + lp)
    pyro.sample("y", dist.Normal(0.0, torch.exp(h / 2)).to_event(1), obs=returns)


def sv_numpyro(returns):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    mu = numpyro.sample("mu", nd.Cauchy(0.0, 10.0))
    phi = numpyro.sample("phi", nd.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", nd.HalfCauchy(5.0))
    h = numpyro.sample("h", nd.Normal(0.0, 1.0).expand([SV_T]).to_event(1).mask(False))
    lp0 = nd.Normal(mu, sigma / jnp.sqrt(1 - phi ** 2)).log_prob(h[0])
    lp = nd.Normal(mu + phi * (h[:-1] - mu), sigma).log_prob(h[1:]).sum()
    numpyro.factor("h_ar1", lp0 + lp)
    numpyro.sample("y", nd.Normal(0.0, jnp.exp(h / 2)).to_event(1), obs=returns)


def sv_nuts(returns):
    """Non-centred SV for NUTS: standard-normal innovations h_std, h rebuilt by a scan."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    mu = numpyro.sample("mu", nd.Cauchy(0.0, 10.0))
    phi = numpyro.sample("phi", nd.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", nd.HalfCauchy(5.0))
    h_std = numpyro.sample("h_std", nd.Normal(0.0, 1.0).expand([SV_T]).to_event(1))
    h0 = mu + sigma / jnp.sqrt(1 - phi ** 2) * h_std[0]

    def step(prev, e):
        cur = mu + phi * (prev - mu) + sigma * e
        return cur, cur

    _, rest = jax.lax.scan(step, h0, h_std[1:])
    h = numpyro.deterministic("h", jnp.concatenate([h0[None], rest]))
    numpyro.sample("y", nd.Normal(0.0, jnp.exp(h / 2)).to_event(1), obs=returns)


# --------------------------------------------------------------------------- #
# 6. Two-parameter logistic item response model (2PL IRT)
# --------------------------------------------------------------------------- #

IRT_S, IRT_I = 400, 50


def irt_data():
    rng = np.random.default_rng(6)
    theta = rng.standard_normal(IRT_S)
    a = np.exp(0.3 * rng.standard_normal(IRT_I))
    b = 0.2 + 1.0 * rng.standard_normal(IRT_I)
    p = 1 / (1 + np.exp(-a * (theta[:, None] - b)))
    y = (rng.random((IRT_S, IRT_I)) < p).astype(float)
    return dict(responses=y)


def irt_pyro(responses):
    theta = pyro.sample("theta", dist.Normal(0.0, 1.0).expand([IRT_S]).to_event(1))
    a = pyro.sample("a", dist.LogNormal(0.0, 0.5).expand([IRT_I]).to_event(1))
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, 5.0))
    sigma_b = pyro.sample("sigma_b", dist.HalfNormal(2.0))
    b = _hier("b", mu_b, sigma_b, IRT_I)
    logits = a[..., None, :] * (theta[..., :, None] - b[..., None, :])
    pyro.sample("y", dist.Bernoulli(logits=logits).to_event(2), obs=responses)


def irt_numpyro(responses):
    import numpyro
    import numpyro.distributions as nd

    theta = numpyro.sample("theta", nd.Normal(0.0, 1.0).expand([IRT_S]).to_event(1))
    a = numpyro.sample("a", nd.LogNormal(0.0, 0.5).expand([IRT_I]).to_event(1))
    mu_b = numpyro.sample("mu_b", nd.Normal(0.0, 5.0))
    sigma_b = numpyro.sample("sigma_b", nd.HalfNormal(2.0))
    b = numpyro.sample("b", nd.Normal(mu_b, sigma_b).expand([IRT_I]).to_event(1))
    logits = a[None, :] * (theta[:, None] - b[None, :])
    numpyro.sample("y", nd.Bernoulli(logits=logits).to_event(2), obs=responses)


# --------------------------------------------------------------------------- #
# 7. AR(5) on the yearly sunspot numbers 1700-2008 (statsmodels.datasets.sunspots)
# --------------------------------------------------------------------------- #

AR_P = 5


def ar5_data():
    from statsmodels.datasets import sunspots

    y = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=float)
    y = (y - y.mean()) / y.std()          # standardised, so the priors are scale-free
    lags = np.stack([y[AR_P - k - 1:len(y) - k - 1] for k in range(AR_P)], axis=1)   # (T-5, 5): y_{t-1..t-5}
    return dict(lags=lags, y=y[AR_P:])


def linear_pyro(X, y, names, prior_sd, noise_sd):
    """y ~ N(intercept + X beta, sigma): the sites ``names`` = (intercept, coefficients, noise scale)."""
    b0 = pyro.sample(names[0], dist.Normal(0.0, prior_sd))
    beta = pyro.sample(names[1], dist.Normal(0.0, prior_sd).expand([X.shape[-1]]).to_event(1))
    sigma = pyro.sample(names[2], dist.HalfNormal(noise_sd))
    mean = _t(b0) + (beta[..., None, :] * X).sum(-1)
    pyro.sample("obs", dist.Normal(mean, _t(sigma)).to_event(1), obs=y)


def linear_numpyro(X, y, names, prior_sd, noise_sd):
    """:func:`linear_pyro` in NumPyro."""
    import numpyro
    import numpyro.distributions as nd

    b0 = numpyro.sample(names[0], nd.Normal(0.0, prior_sd))
    beta = numpyro.sample(names[1], nd.Normal(0.0, prior_sd).expand([X.shape[-1]]).to_event(1))
    sigma = numpyro.sample(names[2], nd.HalfNormal(noise_sd))
    numpyro.sample("obs", nd.Normal(b0 + X @ beta, sigma).to_event(1), obs=y)


AR5 = dict(names=("c", "phi", "sigma"), prior_sd=1.0, noise_sd=1.0)
ar5_pyro = functools.partial(linear_pyro, **AR5)
ar5_numpyro = functools.partial(linear_numpyro, **AR5)


# --------------------------------------------------------------------------- #
# 8. GARCH(1,1) (Bollerslev 1986; Stan User's Guide); (alpha, beta, 1-alpha-beta) ~
#    Dirichlet(1,1,1) keeps the stationarity constraint alpha + beta < 1.
# --------------------------------------------------------------------------- #

GARCH_T = 500


def garch_data():
    rng = np.random.default_rng(8)
    mu, omega, alpha, beta = 0.05, 0.1, 0.12, 0.8
    r = np.empty(GARCH_T)
    s2 = omega / (1 - alpha - beta)
    for t in range(GARCH_T):
        r[t] = mu + math.sqrt(s2) * rng.standard_normal()
        s2 = omega + alpha * (r[t] - mu) ** 2 + beta * s2
    return dict(returns=r, sigma2_1=float(np.var(r)))


def _garch_sigma2_torch(omega, alpha, beta, mu, r, s2_1):
    """sigma2_t = omega + alpha (r_{t-1}-mu)^2 + beta sigma2_{t-1}, sigma2_1 fixed, as a
    geometric-kernel matrix product (vectorised over particles)."""
    T = r.shape[-1]
    e2 = (r[..., :-1] - _t(mu)) ** 2                               # (..., T-1)
    drive = _t(omega) + _t(alpha) * e2                             # (..., T-1): input at t=2..T
    t = torch.arange(T - 1, dtype=r.dtype)
    lag = t[:, None] - t[None, :]                                  # (T-1, T-1)
    mask = lag >= 0
    logb = torch.log(beta)[..., None, None]
    K = torch.where(mask, torch.exp(logb * lag.clamp(min=0)), torch.zeros((), dtype=r.dtype))
    s2_rest = (K * drive[..., None, :]).sum(-1) + torch.exp(logb[..., 0] * (t + 1)) * s2_1
    s2_first = torch.full_like(s2_rest[..., :1], s2_1)
    return torch.cat([s2_first, s2_rest], -1)


def garch_pyro(returns, sigma2_1):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    omega = pyro.sample("omega", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=returns.dtype)))
    s2 = _garch_sigma2_torch(omega, w[..., 0], w[..., 1], mu, returns, sigma2_1)
    pyro.sample("r", dist.Normal(_t(mu), s2.sqrt()).to_event(1), obs=returns)


def garch_numpyro(returns, sigma2_1):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    mu = numpyro.sample("mu", nd.Normal(0.0, 1.0))
    omega = numpyro.sample("omega", nd.HalfNormal(1.0))
    w = numpyro.sample("w", nd.Dirichlet(jnp.ones(3)))
    alpha, beta = w[0], w[1]

    def step(s2, r_prev):
        s2 = omega + alpha * (r_prev - mu) ** 2 + beta * s2
        return s2, s2

    _, rest = jax.lax.scan(step, jnp.asarray(sigma2_1, returns.dtype), returns[:-1])
    s2 = jnp.concatenate([jnp.full((1,), sigma2_1, returns.dtype), rest])
    numpyro.sample("r", nd.Normal(mu, jnp.sqrt(s2)).to_event(1), obs=returns)


# --------------------------------------------------------------------------- #
# 9. Linear regression, 25 strongly correlated predictors, 5,000 rows
# --------------------------------------------------------------------------- #

LR_N, LR_D = 5000, 25


def corr_linreg_data():
    rng = np.random.default_rng(9)
    # one common factor: pairwise correlation ~0.95 between predictors
    f = rng.standard_normal(LR_N)
    X = 0.975 * f[:, None] + math.sqrt(1 - 0.975 ** 2) * rng.standard_normal((LR_N, LR_D))
    w = rng.normal(0, 0.5, LR_D)
    y = 1.0 + X @ w + 1.0 * rng.standard_normal(LR_N)
    return dict(X=X, y=y)


CORR_LINREG = dict(names=("b0", "beta", "sigma"), prior_sd=10.0, noise_sd=5.0)
corr_linreg_pyro = functools.partial(linear_pyro, **CORR_LINREG)
corr_linreg_numpyro = functools.partial(linear_numpyro, **CORR_LINREG)


# --------------------------------------------------------------------------- #
# 10. Two-component Gaussian mixture with exchangeable labels (bimodal: label switching)
# --------------------------------------------------------------------------- #

MIX_N = 200


def mixture_data():
    rng = np.random.default_rng(10)
    z = rng.random(MIX_N) < 0.4
    y = np.where(z, -1.5, 1.5) + rng.standard_normal(MIX_N)
    return dict(y=y)


def mixture_pyro(y):
    w = pyro.sample("w", dist.Beta(2.0, 2.0))
    locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    w_, s_ = _t(w), _t(sigma)
    lp = torch.logaddexp(torch.log(w_) + dist.Normal(locs[..., :1], s_).log_prob(y),
                         torch.log1p(-w_) + dist.Normal(locs[..., 1:], s_).log_prob(y))
    pyro.factor("lik", lp.sum(-1))


def mixture_numpyro(y):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    w = numpyro.sample("w", nd.Beta(2.0, 2.0))
    locs = numpyro.sample("locs", nd.Normal(0.0, 5.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", nd.HalfNormal(2.0))
    lp = jnp.logaddexp(jnp.log(w) + nd.Normal(locs[0], sigma).log_prob(y),
                       jnp.log1p(-w) + nd.Normal(locs[1], sigma).log_prob(y))
    numpyro.factor("lik", lp.sum())


def mixture_nuts(y):
    """The same density restricted to locs[0] < locs[1] (one of the two label-switched
    halves, each holding exactly half the mass): an ordered-vector site with no density
    plus the Normal(0, 5) prior as a factor."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from numpyro.distributions import constraints

    w = numpyro.sample("w", nd.Beta(2.0, 2.0))
    locs = numpyro.sample("locs", nd.ImproperUniform(constraints.ordered_vector, (), (2,)))
    numpyro.factor("locs_prior", nd.Normal(0.0, 5.0).log_prob(locs).sum())
    sigma = numpyro.sample("sigma", nd.HalfNormal(2.0))
    lp = jnp.logaddexp(jnp.log(w) + nd.Normal(locs[0], sigma).log_prob(y),
                       jnp.log1p(-w) + nd.Normal(locs[1], sigma).log_prob(y))
    numpyro.factor("lik", lp.sum())


def mixture_symmetrise(flat, rng):
    """The posterior is invariant under (w, l0, l1, s) -> (1-w, l1, l0, s). NUTS ran on
    the half l0 < l1 (exact, since that half is the posterior conditioned on the event,
    which has probability 1/2); applying the swap to each draw with probability 1/2
    gives exact draws of the full bimodal posterior."""
    out = flat.copy()
    swap = rng.random(len(out)) < 0.5
    out[swap, 0] = 1.0 - flat[swap, 0]
    out[swap, 1], out[swap, 2] = flat[swap, 2], flat[swap, 1]
    return out


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

TARGETS: dict[str, Target] = {}


def _add(t: Target):
    TARGETS[t.name] = t


_add(Target(
    "radon", "Radon-like varying-intercept regression, centred: y_ij = a_j + b x_ij + e, a_j ~ N(mu_a, sigma_a)",
    "synthetic, default_rng(1): 85 counties with heavy-tailed sizes, 919 houses, binary floor covariate",
    radon_pyro, radon_numpyro, radon_data, ("county", "floor", "log_radon"),
    {"mu_a": ((), ""), "sigma_a": ((), ""), "a": ((RADON_J,), ""), "b": ((), ""), "sigma_y": ((), "")},
    nuts_model=_locscale(radon_numpyro, ["a"]),
    nuts=dict(warmup=1000, draws=2000, target_accept=0.9),
))
_add(Target(
    "poisson_glmm", "Poisson GLMM with random intercepts: y ~ Poisson(exp(b0 + x beta + u_g)), u_g ~ N(0, sigma_u)",
    "synthetic, default_rng(2): 60 groups, 600 rows, 2 covariates",
    glmm_pyro, glmm_numpyro, glmm_data, ("group", "x", "counts"),
    {"b0": ((), ""), "beta": ((2,), ""), "sigma_u": ((), ""), "u": ((GLMM_G,), "")},
    nuts_model=_locscale(glmm_numpyro, ["u"]),
    nuts=dict(warmup=1000, draws=2000, target_accept=0.9),
))
_add(Target(
    "baseball", "Efron-Morris batting: hits_i ~ Binomial(45, logit^-1 alpha_i), alpha_i ~ N(mu, sigma), centred",
    "Efron & Morris (1975) hits in the first 45 at-bats of 18 players (literal)",
    baseball_pyro, baseball_numpyro, baseball_data, ("at_bats", "hits"),
    {"mu": ((), ""), "sigma": ((), ""), "alpha": ((18,), "")},
    nuts_model=_locscale(baseball_numpyro, ["alpha"]),
    nuts=dict(warmup=1000, draws=3000, target_accept=0.95),
))
_add(Target(
    "horseshoe_logreg", "Sparse logistic regression, regularised horseshoe (Piironen & Vehtari 2017)",
    "synthetic, default_rng(4): 200 rows, 24 AR(0.5)-correlated standardised predictors, 3 non-zero",
    horseshoe_pyro, horseshoe_numpyro, horseshoe_data, ("X", "y", "tau0"),
    {"b0": ((), ""), "tau": ((), ""), "lam": ((HS_D,), ""), "c2": ((), ""), "z": ((HS_D,), "")},
    nuts=dict(warmup=1500, draws=3000, target_accept=0.99, max_tree_depth=10),
    metric_transform=_horseshoe_metric_transform,
))
_add(Target(
    "stoch_vol", "Stochastic volatility (AR(1) log-volatility), centred h",
    "synthetic, default_rng(5): T=200 returns from mu=-1, phi=0.95, sigma=0.25",
    sv_pyro, sv_numpyro, sv_data, ("returns",),
    {"mu": ((), ""), "phi": ((), ""), "sigma": ((), ""), "h": ((SV_T,), "")},
    nuts_model=sv_nuts,
    nuts=dict(warmup=1500, draws=2500, target_accept=0.98),
))
_add(Target(
    "irt_2pl", "Two-parameter logistic IRT: y_si ~ Bernoulli(logit^-1 a_i (theta_s - b_i))",
    "synthetic, default_rng(6): 400 students x 50 items",
    irt_pyro, irt_numpyro, irt_data, ("responses",),
    {"theta": ((IRT_S,), ""), "a": ((IRT_I,), ""), "mu_b": ((), ""), "sigma_b": ((), ""), "b": ((IRT_I,), "")},
    nuts=dict(warmup=1000, draws=2500, target_accept=0.85),
))
_add(Target(
    "ar5_sunspots", "AR(5), conditional likelihood: y_t = c + sum_k phi_k y_{t-k} + e_t",
    "statsmodels.datasets.sunspots (yearly 1700-2008, 309 values, standardised)",
    ar5_pyro, ar5_numpyro, ar5_data, ("lags", "y"),
    {"c": ((), ""), "phi": ((AR_P,), ""), "sigma": ((), "")},
    nuts=dict(warmup=1000, draws=2000, target_accept=0.9),
))
_add(Target(
    "garch11", "GARCH(1,1): r_t ~ N(mu, sigma_t), sigma_t^2 = omega + alpha (r_{t-1}-mu)^2 + beta sigma_{t-1}^2",
    "synthetic, default_rng(8): T=500 returns from mu=0.05, omega=0.1, alpha=0.12, beta=0.8",
    garch_pyro, garch_numpyro, garch_data, ("returns", "sigma2_1"),
    {"mu": ((), ""), "omega": ((), ""), "w": ((3,), "")},
    nuts=dict(warmup=1000, draws=2500, target_accept=0.9),
))
_add(Target(
    "corr_linreg", "Linear regression, 25 predictors with pairwise correlation ~0.95",
    "synthetic, default_rng(9): 5,000 rows, one common factor",
    corr_linreg_pyro, corr_linreg_numpyro, corr_linreg_data, ("X", "y"),
    {"b0": ((), ""), "beta": ((LR_D,), ""), "sigma": ((), "")},
    nuts=dict(warmup=1000, draws=1500, target_accept=0.85, dense_mass=True),
))
_add(Target(
    "mixture2", "Two-component Gaussian mixture, exchangeable labels: bimodal by label switching",
    "synthetic, default_rng(10): 200 points from 0.4 N(-1.5,1) + 0.6 N(1.5,1)",
    mixture_pyro, mixture_numpyro, mixture_data, ("y",),
    {"w": ((), ""), "locs": ((2,), ""), "sigma": ((), "")},
    nuts_model=mixture_nuts,
    nuts=dict(warmup=1000, draws=2000, target_accept=0.9),
    postprocess=mixture_symmetrise,
))
