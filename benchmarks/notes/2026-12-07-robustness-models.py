import math, time, warnings, sys
import torch, pyro, pyro.distributions as dist
torch.set_num_threads(1)
import pyro_flowguide as pfg

def readme_model(x, y=None):
    a = pyro.sample("a", dist.Normal(0., 10.)); b = pyro.sample("b", dist.Normal(0., 10.))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)

def readme_data(seed, intercept=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-2, 2, 50); y = intercept + 0.5 * x + 0.3 * torch.randn(50, generator=g)
    return x, y

# ---------------- failure-mode B models (synthetic data, fixed seeds)
def hier_data(seed=0, groups=85, n=900):
    g = torch.Generator().manual_seed(1000 + seed)
    grp = torch.randint(0, groups, (n,), generator=g)
    x = torch.randint(0, 2, (n,), generator=g).float()
    a_true = 1.5 + 0.3 * torch.randn(groups, generator=g)
    y = a_true[grp] - 0.7 * x + 0.7 * torch.randn(n, generator=g)
    return grp, x, y

def hier_model(grp, x, y=None, groups=85):
    mu_a = pyro.sample("mu_a", dist.Normal(0., 10.))
    sigma_a = pyro.sample("sigma_a", dist.HalfCauchy(5.))
    b = pyro.sample("b", dist.Normal(0., 10.))
    sigma_y = pyro.sample("sigma_y", dist.HalfCauchy(5.))
    with pyro.plate("groups", groups):
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
    with pyro.plate("obs", x.shape[0]):
        pyro.sample("y", dist.Normal(a[..., grp] + b * x, sigma_y), obs=y)

def sv_data(seed=0, T=100):
    g = torch.Generator().manual_seed(2000 + seed)
    h = torch.zeros(T); h[0] = -1.0
    for t in range(1, T):
        h[t] = -1.0 + 0.95 * (h[t - 1] + 1.0) + 0.25 * torch.randn((), generator=g)
    y = torch.exp(h / 2) * torch.randn(T, generator=g)
    return (y,)

def sv_model(y):
    T = y.shape[-1]
    mu = pyro.sample("mu", dist.Normal(0., 5.))
    phi = pyro.sample("phi", dist.Uniform(-1., 1.))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.))
    h = pyro.sample("h", SVPrior(mu, phi, sigma, T))
    pyro.sample("y", dist.Normal(0., torch.exp(h / 2)).to_event(1), obs=y)

class SVPrior(dist.TorchDistribution):
    """AR(1) prior of the centred log-volatilities, as one vector site."""
    arg_constraints = {}
    support = dist.constraints.real_vector
    has_rsample = False
    def __init__(self, mu, phi, sigma, T):
        self.mu, self.phi, self.sigma, self.T = mu, phi, sigma, T
        batch = torch.broadcast_shapes(torch.as_tensor(mu).shape, torch.as_tensor(phi).shape, torch.as_tensor(sigma).shape)
        super().__init__(batch, torch.Size([T]), validate_args=False)
    def expand(self, batch_shape, _instance=None):
        return SVPrior(self.mu.expand(batch_shape), self.phi.expand(batch_shape), self.sigma.expand(batch_shape), self.T)
    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = sample_shape + self.batch_shape
            mu = self.mu.expand(shape); phi = self.phi.expand(shape); s = self.sigma.expand(shape)
            hs = [mu + s / torch.sqrt(1 - phi ** 2) * torch.randn(shape)]
            for _ in range(1, self.T):
                hs.append(mu + phi * (hs[-1] - mu) + s * torch.randn(shape))
            return torch.stack(hs, -1)
    def log_prob(self, h):
        mu = self.mu.unsqueeze(-1); phi = self.phi.unsqueeze(-1); s = self.sigma.unsqueeze(-1)
        lp0 = dist.Normal(mu[..., 0], s[..., 0] / torch.sqrt(1 - phi[..., 0] ** 2)).log_prob(h[..., 0])
        rest = dist.Normal(mu + phi * (h[..., :-1] - mu), s).log_prob(h[..., 1:]).sum(-1)
        return lp0 + rest

def horseshoe_data(seed=0, n=200, d=24):
    g = torch.Generator().manual_seed(3000 + seed)
    X = torch.randn(n, d, generator=g)
    w = torch.zeros(d); w[:3] = torch.tensor([2.0, -1.5, 1.0])
    y = torch.bernoulli(torch.sigmoid(X @ w + 0.3), generator=g)
    return X, y

def horseshoe_model(X, y=None):
    d = X.shape[-1]
    tau = pyro.sample("tau", dist.HalfCauchy(1.))
    with pyro.plate("feat", d):
        lam = pyro.sample("lam", dist.HalfCauchy(1.))
        w = pyro.sample("w", dist.Normal(0., tau * lam))
    b0 = pyro.sample("b0", dist.Normal(0., 5.))
    logits = (X * w.unsqueeze(-2)).sum(-1) + b0
    with pyro.plate("obs", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

# ---------------- failure mode C: a well-posed 5-D posterior (Bayesian linear regression with unknown noise)
def lin5_data(seed=0, n=100):
    g = torch.Generator().manual_seed(4000 + seed)
    X = torch.randn(n, 4, generator=g)
    y = X @ torch.tensor([1.0, -0.5, 0.25, 0.0]) + 0.5 + 0.8 * torch.randn(n, generator=g)
    return X, y

def lin5_model(X, y=None):
    w = pyro.sample("w", dist.Normal(0., 5.).expand([4]).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0., 1.))
    with pyro.plate("obs", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w.unsqueeze(-2)).sum(-1), sigma), obs=y)

def flow_probe(guide, n=256, seed=123):
    """Per layer of the default flow: max |output|, max |shift|, max |log-scale| over n fixed base draws."""
    import pyro_flowguide._made_score as ms
    from pyro_flowguide.guides import _made_layers
    with torch.no_grad():
        parts = guide.get_transform()
        layers = _made_layers(parts[:-1])
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, guide.latent_dim, generator=g)
        out = []
        for layer, kind, const in layers:
            y, ladj, keep = ms._layer_forward(layer, kind, const, x)
            if kind == "affine":
                phi = keep[1]
                t = keep[2]
                out.append((kind, y.abs().max().item(), phi[..., 0].abs().max().item(), torch.as_tensor(t.log_scale).abs().max().item() if hasattr(t, 'log_scale') else float('nan')))
            else:
                out.append((kind, y.abs().max().item(), float('nan'), float('nan')))
            x = y
        return out
