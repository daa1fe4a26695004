"""Reference posterior draws for the real-model targets: NumPyro NUTS.

4 chains run one after another (``chain_method="sequential"``, one CPU thread), in
float64, on each target's ``nuts_model`` (the NumPyro model or a reparameterised
version checked by ``checks.py``); the Pyro-coordinate values are read from its
sites (sampled or deterministic), flattened in the target's flat order, pooled
and, for ``mixture2``, symmetrised (see ``models.mixture_symmetrise``).

Printed per target: max split R-hat (rank-normalised), min bulk ESS, min tail
ESS (arviz), divergences, wall time; a target passes when R-hat < 1.01 and bulk
ESS > 1000 on every coordinate.  Cached as
``benchmarks/.cache/real/<target>.npz`` with ``draws`` (num, dim), ``labels``,
``rhat``, ``ess_bulk``, ``ess_tail``, ``divergences``, ``wall_s`` and the NUTS
settings.

    python benchmarks/real/references.py                      # build what is missing
    python benchmarks/real/references.py --targets radon,irt_2pl --force
    python benchmarks/real/references.py --scale 2            # twice the draws (and warm-up)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from models import TARGETS  # noqa: E402

CACHE = os.path.join(HERE, "..", ".cache", "real")
NUM_CHAINS = 4


def cache_path(name):
    return os.path.abspath(os.path.join(CACHE, f"{name}.npz"))


def load_reference(name):
    """Pooled constrained reference draws (num, dim) of a target, or None."""
    p = cache_path(name)
    if not os.path.exists(p):
        return None
    return np.load(p)["draws"]


def diagnostics(chains):
    """chains: (chain, draw, dim) -> rank-normalised split R-hat, bulk/tail ESS per coordinate."""
    import arviz as az

    ds = az.convert_to_dataset({"x": chains})
    rhat = az.rhat(ds, method="rank")["x"].values
    ess_b = az.ess(ds, method="bulk")["x"].values
    ess_t = az.ess(ds, method="tail")["x"].values
    return rhat, ess_b, ess_t


def build(t, scale=1.0, seed=0, verbose=True):
    import jax

    jax.config.update("jax_enable_x64", True)
    from numpyro.infer import MCMC, NUTS

    cfg = dict(t.nuts)
    warmup = int(cfg.pop("warmup") * scale)
    draws = int(cfg.pop("draws") * scale)
    kernel = NUTS(t.nuts_model or t.numpyro_model,
                  target_accept_prob=cfg.get("target_accept", 0.8),
                  dense_mass=cfg.get("dense_mass", False),
                  max_tree_depth=cfg.get("max_tree_depth", 10))
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=draws, num_chains=NUM_CHAINS,
                chain_method="sequential", progress_bar=False)
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), *t.numpyro_args(), extra_fields=("diverging", "num_steps"))
    wall = time.perf_counter() - t0
    s = mcmc.get_samples(group_by_chain=True)
    chains = np.stack([t.flatten({k: np.asarray(s[k][c]) for k in t.latents}) for c in range(NUM_CHAINS)])
    rhat, ess_b, ess_t = diagnostics(chains)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    div = int(np.asarray(extra["diverging"]).sum())
    mean_steps = float(np.asarray(extra["num_steps"]).mean())
    pooled = chains.reshape(-1, chains.shape[-1])
    if t.postprocess is not None:
        pooled = t.postprocess(pooled, np.random.default_rng(seed))
    os.makedirs(CACHE, exist_ok=True)
    info = dict(warmup=warmup, draws=draws, chains=NUM_CHAINS, seed=seed, **cfg)
    np.savez(cache_path(t.name), draws=pooled, labels=np.array(t.labels), rhat=rhat, ess_bulk=ess_b,
             ess_tail=ess_t, divergences=div, wall_s=wall, mean_leapfrog=mean_steps, settings=json.dumps(info))
    row = dict(target=t.name, dim=t.dim, max_rhat=float(np.max(rhat)), min_ess_bulk=float(np.min(ess_b)),
               min_ess_tail=float(np.min(ess_t)), divergences=div, wall_s=wall, mean_leapfrog=mean_steps,
               worst=t.labels[int(np.argmin(ess_b))], **info)
    row["pass"] = row["max_rhat"] < 1.01 and row["min_ess_bulk"] > 1000
    if verbose:
        print_row(row)
    return row


def summary(name):
    p = cache_path(name)
    z = np.load(p)
    return dict(target=name, dim=int(z["draws"].shape[1]), max_rhat=float(z["rhat"].max()),
                min_ess_bulk=float(z["ess_bulk"].min()), min_ess_tail=float(z["ess_tail"].min()),
                divergences=int(z["divergences"]), wall_s=float(z["wall_s"]),
                mean_leapfrog=float(z["mean_leapfrog"]),
                worst=str(z["labels"][int(np.argmin(z["ess_bulk"]))]), **json.loads(str(z["settings"])),
                **{"pass": bool(z["rhat"].max() < 1.01 and z["ess_bulk"].min() > 1000)})


def print_row(r):
    print(f"{r['target']:18s} dim={r['dim']:4d} chains={r['chains']}x({r['warmup']}+{r['draws']}) "
          f"max_rhat={r['max_rhat']:.4f} min_ess_bulk={r['min_ess_bulk']:7.0f} ({r['worst']}) "
          f"min_ess_tail={r['min_ess_tail']:7.0f} divergences={r['divergences']} "
          f"leapfrog/draw={r['mean_leapfrog']:.1f} wall={r['wall_s']:.0f}s {'PASS' if r['pass'] else 'FAIL'}",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply warm-up and draws")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip the density checks")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = a.targets.split(",")
    if not a.no_check:
        from checks import check_target

        print("density checks (pyro vs numpyro, batched pyro, nuts map):", flush=True)
        for n in names:
            check_target(TARGETS[n])
    print("references:", flush=True)
    for n in names:
        if os.path.exists(cache_path(n)) and not a.force:
            print_row(summary(n))
            continue
        build(TARGETS[n], scale=a.scale, seed=a.seed)


if __name__ == "__main__":
    main()
