"""Density checks: the Pyro model, the NumPyro model and the NUTS model agree.

``check_target(t)`` runs, in float64:

1. **pyro == numpyro**: at ``n`` random constrained points (unconstrained
   coordinates ~ Uniform(-2, 2) pushed through each site's ``biject_to``) the Pyro
   ``poutine.trace(poutine.condition(model, values)).get_trace(*args).log_prob_sum()``
   equals ``numpyro.infer.util.log_density(...)``.
2. **batched pyro**: the same ``n`` points stacked under a ``pyro.plate`` at dim -1
   (what vectorised particles do) give the same per-point log densities.
3. **nuts model** (when it is a reparameterisation): at ``n`` random unconstrained
   points ``u`` of the NUTS model, with ``g(u)`` = unconstrained coordinates of the
   Pyro-coordinate values it emits,
   ``potential_nuts(u) == potential_numpyro(g(u)) - log|det dg/du|``
   (Jacobian by ``jax.jacfwd``), i.e. the draws mapped back are draws of the same
   posterior.  The mixture's NUTS model lives on the half ``locs[0] < locs[1]``;
   there the same identity holds with ``g`` the identity on constrained values.

Run: ``python benchmarks/real/checks.py [--targets a,b]``.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import TARGETS  # noqa: E402


def _random_points(t, n, seed):
    import jax.numpy as jnp
    from numpyro import handlers
    from numpyro.distributions.transforms import biject_to

    args = t.numpyro_args()
    tr = handlers.trace(handlers.seed(t.numpyro_model, 0)).get_trace(*args)
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(n):
        vals = {}
        for name, site in tr.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            tf = biject_to(site["fn"].support)
            shape = tf.inverse_shape(jnp.shape(site["value"]))
            u = jnp.asarray(rng.uniform(-2, 2, size=shape))
            vals[name] = np.array(tf(u))
        pts.append(vals)
    return pts, [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]


def check_target(t, n=5, seed=0, verbose=True):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import pyro
    from pyro import poutine
    from numpyro.infer.util import log_density, potential_energy, unconstrain_fn, constrain_fn
    from numpyro import handlers
    from numpyro.distributions.transforms import biject_to

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    res = {"target": t.name, "ok": True}
    try:
        pargs, nargs = t.pyro_args(torch.float64), t.numpyro_args()
        pts, np_sites = _random_points(t, n, seed)
        # site lists agree (names and order)
        ptr = poutine.trace(t.pyro_model).get_trace(*pargs)
        p_sites = [k for k, s in ptr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
                   and not s["infer"].get("is_auxiliary")]
        assert p_sites == list(t.latents) == np_sites, (p_sites, list(t.latents), np_sites)
        # 1. pointwise equality
        diffs, lps = [], []
        for vals in pts:
            tv = {k: torch.as_tensor(v) for k, v in vals.items()}
            lp_p = poutine.trace(poutine.condition(t.pyro_model, data=tv)).get_trace(*pargs).log_prob_sum().item()
            lp_n = float(log_density(t.numpyro_model, nargs, {}, {k: jnp.asarray(v) for k, v in vals.items()})[0])
            diffs.append(abs(lp_p - lp_n) / max(1.0, abs(lp_n)))
            lps.append(lp_n)
        res["max_rel_diff"] = max(diffs)
        res["log_densities"] = lps
        # 2. batched (vectorised-particle) Pyro evaluation
        stacked = {k: torch.as_tensor(np.stack([p[k] for p in pts])) for k in pts[0]}
        with pyro.plate("points", n, dim=-1):
            btr = poutine.trace(poutine.condition(t.pyro_model, data=stacked)).get_trace(*pargs)
        btr.compute_log_prob()
        per = sum(s["log_prob"] for s in btr.nodes.values() if s["type"] == "sample" and "log_prob" in s)
        per = per.expand(n).numpy()
        res["max_rel_diff_batched"] = float(np.max(np.abs(per - np.array(lps)) / np.maximum(1.0, np.abs(lps))))
        # 3. NUTS model vs numpyro model, with the Jacobian of the map
        if t.nuts_model is not None:
            from numpyro.infer.initialization import init_to_uniform

            ntr = handlers.trace(handlers.substitute(handlers.seed(t.nuts_model, 0),
                                                     substitute_fn=init_to_uniform)).get_trace(*nargs)
            nsites = {k: s for k, s in ntr.items() if s["type"] == "sample" and not s["is_observed"]}
            shapes = {k: biject_to(s["fn"].support).inverse_shape(jnp.shape(s["value"])) for k, s in nsites.items()}
            sizes = {k: int(np.prod(s)) for k, s in shapes.items()}

            def unflat(u):
                out, i = {}, 0
                for k in nsites:
                    out[k] = u[i:i + sizes[k]].reshape(shapes[k])
                    i += sizes[k]
                return out

            def g(u):
                cons = constrain_fn(t.nuts_model, nargs, {}, unflat(u), return_deterministic=True)
                pv = {k: cons[k] for k in t.latents}
                uc = unconstrain_fn(t.numpyro_model, nargs, {}, pv)
                return jnp.concatenate([jnp.ravel(uc[k]) for k in t.latents])

            rng = np.random.default_rng(seed + 1)
            jd = []
            for _ in range(n):
                u = jnp.asarray(rng.uniform(-2, 2, size=sum(sizes.values())))
                pe_nuts = float(potential_energy(t.nuts_model, nargs, {}, unflat(u)))
                uc = g(u)
                pe_c = float(potential_energy(t.numpyro_model, nargs, {},
                                              _unflat_like(t, nargs, uc)))
                J = jax.jacfwd(g)(u)
                sign, logdet = jnp.linalg.slogdet(J)
                jd.append(abs(pe_nuts - (pe_c - float(logdet))) / max(1.0, abs(pe_nuts)))
            res["max_rel_diff_nuts"] = max(jd)
        tol = 1e-8
        for k in ("max_rel_diff", "max_rel_diff_batched", "max_rel_diff_nuts"):
            if k in res and not res[k] < tol:
                res["ok"] = False
    except Exception as e:  # noqa: BLE001
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        torch.set_default_dtype(old)
    if verbose:
        extra = "" if "error" not in res else "  " + res["error"]
        print(f"{t.name:18s} dim={t.dim:4d} pyro~numpyro {res.get('max_rel_diff', float('nan')):.1e}  "
              f"batched {res.get('max_rel_diff_batched', float('nan')):.1e}  "
              f"nuts-map {format(res['max_rel_diff_nuts'], '.1e') if 'max_rel_diff_nuts' in res else '-'}  "
              f"{'OK' if res['ok'] else 'FAIL'}{extra}", flush=True)
    return res


def _unflat_like(t, nargs, uc):
    """Split a flat unconstrained vector of the NumPyro model into its sites."""
    import jax.numpy as jnp
    from numpyro import handlers
    from numpyro.distributions.transforms import biject_to

    tr = handlers.trace(handlers.seed(t.numpyro_model, 0)).get_trace(*nargs)
    out, i = {}, 0
    for k in t.latents:
        shp = biject_to(tr[k]["fn"].support).inverse_shape(jnp.shape(tr[k]["value"]))
        m = int(np.prod(shp))
        out[k] = uc[i:i + m].reshape(shp)
        i += m
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--points", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = [check_target(TARGETS[n], a.points) for n in a.targets.split(",")]
    bad = [r["target"] for r in results if not r["ok"]]
    print("all density checks passed" if not bad else f"FAILED: {bad}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
