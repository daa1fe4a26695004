"""Scaling benchmark of the structured guide (project issue 30).

Worker (one guide, one model, one D, in its own process):
    python bench_scale.py run --model hier --D 1000 --guide structured --steps 1500
Driver (one subprocess per guide; prints a table and appends JSON lines to --out):
    python bench_scale.py table --model hier --D 100 1000 --guides structured autonormal lowrank --steps 1500

Models (D = number of latents):
  hier: mu ~ N(0, 5), tau ~ HalfNormal(5), theta_j ~ N(mu, tau) (centred, plate of J = D - 2),
        y_jk ~ N(theta_j, 1), k = 1..3. Reference: exact moments from a grid over (mu, log tau)
        of the marginal likelihood (theta integrated out), mixed with the exact Gaussian
        conditionals of theta given (mu, tau).
  sv:   mu ~ N(0, 2), (phi + 1) / 2 ~ Beta(20, 1.5), sigma ~ HalfNormal(0.5), h ~ AR1(mu, phi, sigma) one vector
        site of T = D - 3 log-volatilities (centred), y_t ~ N(0, exp(h_t / 2)).
        Reference: NumPyro NUTS (long run), where feasible (see --ref).
Training: SVI, Trace_ELBO(num_particles=4, vectorize_particles=True), ClippedAdam lr 1e-2
decayed geometrically to 1e-3 over the run's steps. Every figure is on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


# --------------------------------------------------------------------------- references
def hier_reference(y: torch.Tensor, sigma_y: float = 1.0, n_grid: int = 300) -> dict:
    """Exact posterior means and sds (constrained) of mu, tau, theta for the hierarchical model."""
    y = y.double()
    J, K = y.shape
    ybar = y.mean(1)
    s2 = sigma_y**2 / K

    def logpost(mu, logtau):  # density of (mu, log tau)
        tau = logtau.exp()
        var = tau[..., None] ** 2 + s2
        ll = (-0.5 * (ybar - mu[..., None]) ** 2 / var - 0.5 * var.log()).sum(-1)
        lp_mu = -0.5 * (mu / 5.0) ** 2
        lp_tau = -0.5 * (tau / 5.0) ** 2 + logtau  # HalfNormal(5) density times the Jacobian
        return ll + lp_mu + lp_tau

    # mode and curvature
    x = torch.tensor([ybar.mean().item(), 0.5 * math.log(max(ybar.var().item() - s2, 1e-2))], dtype=torch.double,
                     requires_grad=True)
    opt = torch.optim.LBFGS([x], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -logpost(x[0], x[1])
        loss.backward()
        return loss

    opt.step(closure)
    H = torch.autograd.functional.hessian(lambda v: -logpost(v[0], v[1]), x.detach())
    sd = torch.linalg.inv(H).diagonal().sqrt()
    mu_g = torch.linspace(x[0].item() - 10 * sd[0].item(), x[0].item() + 10 * sd[0].item(), n_grid, dtype=torch.double)
    lt_g = torch.linspace(x[1].item() - 10 * sd[1].item(), x[1].item() + 10 * sd[1].item(), n_grid, dtype=torch.double)
    M, LT = torch.meshgrid(mu_g, lt_g, indexing="ij")
    lp = torch.cat([logpost(M[i : i + 20], LT[i : i + 20]) for i in range(0, n_grid, 20)])
    w = (lp - lp.max()).exp()
    w = (w / w.sum()).reshape(-1)
    mu, tau = M.reshape(-1), LT.reshape(-1).exp()
    t2 = tau**2
    c1 = mu * s2 / (t2 + s2)
    c2 = t2 / (t2 + s2)
    v = t2 * s2 / (t2 + s2)
    E = lambda f: (w * f).sum()
    Ec1, Ec2, Ec11, Ec12, Ec22, Ev = E(c1), E(c2), E(c1 * c1), E(c1 * c2), E(c2 * c2), E(v)
    th_mean = Ec1 + Ec2 * ybar
    th_m2 = Ev + Ec11 + 2 * Ec12 * ybar + Ec22 * ybar**2
    th_sd = (th_m2 - th_mean**2).clamp_min(0).sqrt()
    m_mu, m_tau = E(mu), E(tau)
    mean = torch.cat([m_mu[None], m_tau[None], th_mean])
    sdv = torch.cat([(E(mu**2) - m_mu**2).sqrt()[None], (E(tau**2) - m_tau**2).sqrt()[None], th_sd])
    return {"names": ["mu", "tau", "theta"], "mean": mean, "sd": sdv}


def sv_reference_nuts(y: torch.Tensor, num_samples: int, num_warmup: int, seed: int = 0) -> dict:
    """NumPyro NUTS on the same stochastic-volatility density (two chains, sequential)."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
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
        lp = lp + nd.Normal(phi * x[:-1], sigma).log_prob(x[1:]).sum()
        numpyro.factor("ar1", lp)
        numpyro.sample("y", nd.Normal(0.0, jnp.exp(h / 2)), obs=yj)

    mcmc = MCMC(NUTS(model, target_accept_prob=0.9), num_warmup=num_warmup, num_samples=num_samples, num_chains=2,
                chain_method="sequential", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed))
    s = mcmc.get_samples()
    import numpy as np

    flat = np.concatenate([np.asarray(s["mu"])[:, None], np.asarray(s["phi01"])[:, None], np.asarray(s["sigma"])[:, None],
                           np.asarray(s["h"])], 1)
    from numpyro.diagnostics import effective_sample_size

    chains = flat.reshape(2, -1, flat.shape[1])
    ess = effective_sample_size(chains)
    return {"names": ["mu", "phi01", "sigma", "h"], "mean": torch.tensor(flat.mean(0)), "sd": torch.tensor(flat.std(0)),
            "min_ess": float(np.min(ess))}


# --------------------------------------------------------------------------- worker
def make_guide(name: str, model, D: int):
    import pyro.infer.autoguide as ag

    if name == "structured":
        from structured import AutoStructuredFlowGuide

        return AutoStructuredFlowGuide(model)
    if name.startswith("structured{"):  # structured{"json": "keyword arguments"}
        from structured import AutoStructuredFlowGuide

        return AutoStructuredFlowGuide(model, **json.loads(name[len("structured"):]))
    if name == "structured_nocond":
        from structured import AutoStructuredFlowGuide

        return AutoStructuredFlowGuide(model, conditional=False)
    if name == "structured_nocoup":
        from structured import AutoStructuredFlowGuide

        return AutoStructuredFlowGuide(model, coupling=False)
    if name == "structured_affine":
        from structured import AutoStructuredFlowGuide

        return AutoStructuredFlowGuide(model, conditional=False, coupling=False)
    if name == "autonormal":
        return ag.AutoNormal(model)
    if name == "lowrank":
        return ag.AutoLowRankMultivariateNormal(model)
    if name == "iaf":
        return ag.AutoIAFNormal(model)
    if name == "autoflow":
        import pyro_flowguide as pfg

        return pfg.AutoFlowGuide(model)
    raise ValueError(name)


def flat_draws(samples: dict, names: list[str]) -> torch.Tensor:
    n = next(iter(samples.values())).shape[0]
    return torch.cat([samples[k].reshape(n, -1).double() for k in names], 1)


def guide_draws(guide, name: str, data, n: int, mpn: int) -> dict:
    import pyro
    from pyro import poutine

    if name.startswith("structured"):
        return guide.sample_posterior(n, data)
    with torch.no_grad(), poutine.block(), pyro.plate("_draws", n, dim=-(mpn + 1)):
        tr = poutine.trace(guide).get_trace(data)
    out = {}
    for k, s in tr.nodes.items():
        if (s["type"] == "sample" and not s["is_observed"] and not k.startswith("_")
                and not s["infer"].get("is_auxiliary") and type(s["fn"]).__name__ != "_Subsample"):
            out[k] = s["value"]
    return out


def log_weights(model, guide, data, n: int, mpn: int) -> torch.Tensor:
    import pyro
    from pyro import poutine

    with torch.no_grad(), poutine.block(), pyro.plate("_iw", n, dim=-(mpn + 1)):
        gtr = poutine.trace(guide).get_trace(data)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(data)

    def total(tr):
        lw = torch.zeros(n, dtype=torch.double)
        for k, s in tr.nodes.items():
            if s["type"] != "sample" or k == "_iw" or type(s["fn"]).__name__ == "_Subsample":
                continue
            lp = s["fn"].log_prob(s["value"]).double()
            lp = lp.expand(torch.broadcast_shapes(lp.shape, (n,) + (1,) * mpn)) if lp.dim() < mpn + 1 else lp
            lw += lp.reshape(n, -1).sum(1) if lp.numel() >= n else lp.reshape(-1).expand(n)
        return lw

    return total(mtr) - total(gtr)


def worker(a) -> dict:
    torch.set_num_threads(1)
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import ClippedAdam

    import models

    pyro.set_rng_seed(a.seed)
    if a.model == "hier":
        model, data, mpn = models.hier_model, models.hier_data(a.D - 2, seed=a.seed), 2
        names = ["mu", "tau", "theta"]
    else:
        model, data, mpn = models.sv_model, models.sv_data(a.D - 3, seed=a.seed), 0
        names = ["mu", "phi01", "sigma", "h"]
    pyro.clear_param_store()
    guide = make_guide(a.guide, model, a.D)
    total_steps = a.steps
    lrd = 0.1 ** (1.0 / total_steps)
    optim = ClippedAdam({"lr": 1e-2, "lrd": lrd})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=mpn))
    times, losses = [], []
    t_fit = time.perf_counter()
    for i in range(total_steps):
        t0 = time.perf_counter()
        loss = svi.step(data)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if a.time_budget and time.perf_counter() - t_fit > a.time_budget:
            break
    fit_s = time.perf_counter() - t_fit
    steps_done = len(times)
    warm = times[10:60] if steps_done >= 60 else times[min(5, steps_done - 1):]
    ms = 1000 * float(torch.tensor(warm).median())
    n_params = sum(v.numel() for v in pyro.get_param_store().values())
    out = dict(model=a.model, D=a.D, guide=a.guide, steps=steps_done, params=n_params, ms_step=ms,
               fit_s=fit_s, fit3000_s=(fit_s if steps_done == 3000 else 3000 * ms / 1000),
               fit3000_measured=steps_done == 3000, final_loss=float(torch.tensor(losses[-50:]).mean()),
               finite=bool(all(math.isfinite(l) for l in losses)))
    if a.accuracy and steps_done >= 100:
        ref = None
        if a.model == "hier":
            ref = hier_reference(data)
        elif a.ref and os.path.exists(a.ref):
            ref = torch.load(a.ref)
        S, chunk = a.draws, max(1, min(500, int(2e7 // a.D)))
        s1 = s2 = None
        done = 0
        while done < S:
            n = min(chunk, S - done)
            x = flat_draws(guide_draws(guide, a.guide, data, n, mpn), names)
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
            done += n
        qm = s1 / S
        qsd = (s2 / S - qm**2).clamp_min(0).sqrt()
        if ref is not None:
            z = ((qm - ref["mean"]) / ref["sd"]).abs()
            r = qsd / ref["sd"]
            out.update(max_std_mean_err=float(z.max()), sd_ratio_min=float(r.min()), sd_ratio_max=float(r.max()),
                       glob_std_mean_err=[round(float(v), 3) for v in z[: len(names) - 1]],
                       glob_sd_ratio=[round(float(v), 3) for v in r[: len(names) - 1]], draws=S)
        if a.khat_draws:
            import arviz

            lw = torch.cat([log_weights(model, guide, data, min(chunk, a.khat_draws - k), mpn)
                            for k in range(0, a.khat_draws, chunk)])
            _, khat = arviz.psislw(lw.detach().numpy().copy())
            out["khat"] = float(khat)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# --------------------------------------------------------------------------- driver
COLS = ["model", "D", "guide", "steps", "params", "ms_step", "fit3000_s", "peak_rss_mb", "max_std_mean_err",
        "sd_ratio_min", "sd_ratio_max", "khat", "glob_std_mean_err", "glob_sd_ratio"]


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["run", "table", "ref"])
    p.add_argument("--model", default="hier")
    p.add_argument("--D", type=int, nargs="+", default=[100])
    p.add_argument("--guide", default="structured")
    p.add_argument("--guides", nargs="+", default=["structured", "autonormal", "lowrank"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accuracy", type=int, default=1)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--khat-draws", type=int, default=1000)
    p.add_argument("--time-budget", type=float, default=0.0)
    p.add_argument("--ref", default="")
    p.add_argument("--nuts", type=int, nargs=2, default=[5000, 1000])
    p.add_argument("--out", default=os.path.join(HERE, "results.jsonl"))
    a = p.parse_args()
    if a.mode == "run":
        a.D = a.D[0]
        print(json.dumps(worker(a)))
        return
    if a.mode == "ref":  # NUTS reference for sv at each D
        import models

        for D in a.D:
            t = time.time()
            ref = sv_reference_nuts(models.sv_data(D - 3, seed=a.seed), *a.nuts, seed=a.seed)
            path = os.path.join(HERE, f"ref_sv_D{D}_seed{a.seed}.pt")
            torch.save(ref, path)
            print(f"D={D}: {path}, min ESS {ref['min_ess']:.0f}, {time.time() - t:.0f}s")
        return
    print(" | ".join(COLS))
    for D in a.D:
        for g in a.guides:
            cmd = [sys.executable, os.path.abspath(__file__), "run", "--model", a.model, "--D", str(D), "--guide", g,
                   "--steps", str(a.steps), "--seed", str(a.seed), "--accuracy", str(a.accuracy), "--draws",
                   str(a.draws), "--khat-draws", str(a.khat_draws), "--time-budget", str(a.time_budget)]
            ref = os.path.join(HERE, f"ref_sv_D{D}_seed{a.seed}.pt")
            if a.model == "sv":
                cmd += ["--ref", ref]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
            if not lines:
                print(f"{a.model} | {D} | {g} | FAILED: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
                continue
            res = json.loads(lines[-1])
            with open(a.out, "a") as f:
                f.write(json.dumps(res) + "\n")
            print(" | ".join(fmt(res.get(c, "-")) for c in COLS), flush=True)


if __name__ == "__main__":
    main()
