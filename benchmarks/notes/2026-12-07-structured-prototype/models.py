"""Benchmark models for the structured guide (hierarchical normal, stochastic volatility)."""
import math
import torch
import pyro
import pyro.distributions as dist
from torch.distributions import constraints
from torch.nn import functional as F

SIGMA_Y = 1.0
K_OBS = 3


def hier_data(J, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, tau = 1.0, 1.5
    theta = mu + tau * torch.randn(J, generator=g)
    y = theta[:, None] + SIGMA_Y * torch.randn(J, K_OBS, generator=g)
    return y


def hier_model(y):
    J = y.shape[0]
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", J, dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("obs", y.shape[1], dim=-2):
            pyro.sample("y", dist.Normal(theta, SIGMA_Y), obs=y.T)


def ar1_filter(a, z):
    """x_t = a x_{t-1} + z_t along the last dim (parallel scan, a scalar or broadcastable)."""
    T = z.shape[-1]
    A = torch.as_tensor(a, dtype=z.dtype).expand(z.shape).clone()
    A[..., 0] = 0.0
    x = z
    k = 1
    while k < T:
        x = x + A * F.pad(x[..., :-k], (k, 0))
        A = A * F.pad(A[..., :-k], (k, 0))
        k *= 2
    return x


class AR1(dist.TorchDistribution):
    """Stationary AR(1): h_1 ~ N(mu, sigma / sqrt(1 - phi^2)), h_t ~ N(mu + phi (h_{t-1} - mu), sigma)."""

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, mu, phi, sigma, T, validate_args=None):
        self.mu, self.phi, self.sigma, self.T = mu, phi, sigma, T
        batch_shape = torch.broadcast_shapes(torch.as_tensor(mu).shape, torch.as_tensor(phi).shape,
                                             torch.as_tensor(sigma).shape)
        super().__init__(batch_shape, torch.Size([T]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return AR1(self.mu.expand(batch_shape), self.phi.expand(batch_shape), self.sigma.expand(batch_shape), self.T)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = sample_shape + self.batch_shape + (self.T,)
            eps = torch.randn(shape)
            mu, phi, sigma = (torch.as_tensor(v)[..., None] for v in (self.mu, self.phi, self.sigma))
            z = sigma * eps
            z = torch.cat([z[..., :1] / (1 - phi**2).sqrt().expand(z[..., :1].shape), z[..., 1:]], -1)
            return mu + ar1_filter(phi.expand(shape), z)

    def log_prob(self, h):
        mu, phi, sigma = (torch.as_tensor(v)[..., None] for v in (self.mu, self.phi, self.sigma))
        x = h - mu
        first = dist.Normal(0.0, sigma[..., 0] / (1 - phi[..., 0] ** 2).sqrt()).log_prob(x[..., 0])
        rest = dist.Normal(phi * x[..., :-1], sigma).log_prob(x[..., 1:]).sum(-1)
        return first + rest


SV_TRUE = dict(mu=-1.0, phi=0.95, sigma=0.25)


def sv_data(T, seed=0):
    torch.manual_seed(seed)
    p = SV_TRUE
    h = AR1(torch.tensor(p["mu"]), torch.tensor(p["phi"]), torch.tensor(p["sigma"]), T).sample()
    return (torch.randn(T) * (h / 2).exp())


def sv_model(y):
    """Stochastic volatility, centred: the log-volatilities are ONE vector site h (event shape (T,))."""
    T = y.shape[-1]
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    phi = 2.0 * pyro.sample("phi01", dist.Beta(20.0, 1.5)) - 1.0  # Kim, Shephard & Chib's prior
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    h = pyro.sample("h", AR1(mu, phi, sigma, T))
    # One event of T observations (no plate): h's particle dims are batch dims left of its event.
    pyro.sample("y", dist.Normal(0.0, (h / 2).exp()).to_event(1), obs=y)


def sv_model_nc(y):
    """Stochastic volatility, non-centred: innovations eta_t in a plate, h by the AR(1) filter."""
    T = y.shape[-1]
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    phi = 2.0 * pyro.sample("phi01", dist.Beta(20.0, 1.5)) - 1.0
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    with pyro.plate("time", T, dim=-1):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        z = sigma * eta  # globals broadcast against the plate (particle dims to the left)
        z = torch.cat([z[..., :1] / (1 - phi**2).sqrt().expand(z[..., :1].shape), z[..., 1:]], -1)
        h = mu + ar1_filter(phi, z)
        pyro.sample("y", dist.Normal(0.0, (h / 2).exp()), obs=y)
