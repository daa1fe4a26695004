"""Functional checks of AutoStructuredFlowGuide (light: a few steps each).

    PYTHONPATH=/work/scratch/scale python test_structured.py
"""
import torch
import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO, Predictive
from pyro.optim import ClippedAdam

import pyro_flowguide as pfg
from structured import AutoStructuredFlowGuide

torch.set_num_threads(1)


def fit(model, guide, *args, steps=20, mpn=None):
    svi = SVI(model, guide, ClippedAdam({"lr": 1e-2}),
              Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=mpn))
    return [svi.step(*args) for _ in range(steps)]


# 1. globals only (eight schools, non-centred by AutoFlowGuide): delegation to AutoFlowGuide.
y8 = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
s8 = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y, s):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    loc, scale = (v[..., None].expand(v.shape + (8,)) for v in (mu, tau))
    theta = pyro.sample("theta", dist.Normal(loc, scale).to_event(1))
    pyro.sample("y", dist.Normal(theta, s).to_event(1), obs=y)


pyro.clear_param_store()
pyro.set_rng_seed(0)
g = AutoStructuredFlowGuide(eight_schools)
fit(eight_schools, g, y8, s8, mpn=0)
assert g.delegate is not None and isinstance(g.delegate, pfg.AutoFlowGuide), g.structure()
pyro.clear_param_store()
pyro.set_rng_seed(0)
ref = pfg.AutoFlowGuide(eight_schools)
fit(eight_schools, ref, y8, s8, mpn=0)
pyro.set_rng_seed(1)
a = g.sample_posterior(5, y8, s8)
pyro.set_rng_seed(1)
b = ref.sample_posterior(5, y8, s8)
assert all(torch.allclose(a[k], b[k]) for k in a), "globals-only model must reproduce AutoFlowGuide"
print("1 globals-only: delegates to AutoFlowGuide, identical draws for the same seed:", g.structure())


# 2. locals with an event dim, two plates (one nested), a constrained local, a chain.
def zoo(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5))
    with pyro.plate("g", 6, dim=-1):
        a = pyro.sample("a", dist.Normal(mu, tau))
        w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))  # event dim inside the plate
        with pyro.plate("k", 4, dim=-2):
            b = pyro.sample("b", dist.Normal(a, 1.0))  # nested plates
            lam = pyro.sample("lam", dist.Gamma(2.0, 2.0))  # constrained local
    x = pyro.sample("x", dist.Normal(0.0, 1.0).expand([50]).to_event(1))  # chain
    with pyro.plate("g2", 6, dim=-1), pyro.plate("k2", 4, dim=-2):
        pyro.sample("obs", dist.Normal(b + w[..., 0] + lam.log(), 1.0), obs=y)
    pyro.sample("obs_x", dist.Normal(x.sum(-1, keepdim=True), 1.0).to_event(1), obs=torch.ones(1))


pyro.clear_param_store()
y = torch.randn(4, 6)
g = AutoStructuredFlowGuide(zoo)
losses = fit(zoo, g, y, mpn=2, steps=30)
assert all(torch.isfinite(torch.tensor(losses)))
st = g.structure()
assert st == {"global": ("mu", "tau"), "local": ("a", "w", "b", "lam"), "chain": ("x",)}, st
d = g.sample_posterior(3, y)
assert d["w"].shape == (3, 6, 3) and torch.allclose(d["w"].sum(-1), torch.ones(3, 6))
assert d["b"].shape == (3, 4, 6) and (d["lam"] > 0).all() and d["x"].shape == (3, 50)
m = g.median(y)
assert m["b"].shape == (4, 6) and m["x"].shape == (50,)
pred = Predictive(zoo, guide=g, num_samples=3, parallel=True)(y)
assert pred["obs"].shape[0] == 3
pred = Predictive(zoo, guide=g, num_samples=2)(y)
print("2 zoo (event dims in plates, nested plates, constrained locals, chain): ok", st)

# 3. identity at initialisation: locals are AutoNormal's Gaussian with scale init_scale.
pyro.clear_param_store()
g = AutoStructuredFlowGuide(zoo, init_scale=0.1)
g(y)
d = g.sample_posterior(4000, y)
sd = torch.distributions.biject_to(dist.Gamma(2.0, 2.0).support).inv(d["lam"]).std(0)
assert (sd - 0.1).abs().max() < 0.02, sd
print("3 initialisation: local sds", round(float(sd.mean()), 4), "(init_scale 0.1)")

# 4. a subsampled plate is refused with a clear error.
def sub(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("d", 100, subsample_size=10):
        pyro.sample("z", dist.Normal(mu, 1.0))


try:
    AutoStructuredFlowGuide(sub)(None)
except pfg.GuideSetupError as e:
    print("4 subsampled plate refused:", str(e)[:90])
print("all checks passed")
