"""Reproduces the numerical failures of AutoFlowGuide (A-D) with counts over seeds.

Run against the untouched copy or the patched snapshot:
    PYTHONPATH=/work/scratch/robust/orig python repro.py --cases A1,A9,B,C,D
    PYTHONPATH=/work/scratch/robust      python repro.py --cases A1,A9,B,C,D [--guide-kw '{"network_scale": null}']
A1: README example (intercept 1), seeds 0-19, fit's default schedule for 2000 steps, first --a-steps steps.
A9: the same with intercept 9, seeds 0-7.
B:  centred hierarchical regression (85 groups, 900 obs), stochastic volatility (100 log-vols),
    horseshoe logistic regression (50 latents) under plain SVI + Adam + Trace_ELBO, seeds 0-2.
C:  Adam lr grid 0.001/0.01/0.03/0.1 on a 5-D Bayesian linear regression and the README model, seeds 0-2.
D:  fit(steps=300): does fit warn, and how far is the result from a 3000-step fit?
"""
import argparse, json, math, sys, time, warnings
import torch
torch.set_num_threads(1)
import pyro
from pyro.infer import SVI, Trace_ELBO
from common import (readme_model, readme_data, hier_model, hier_data, sv_model, sv_data,
                    horseshoe_model, horseshoe_data, lin5_model, lin5_data)
import pyro_flowguide as pfg
from pyro_flowguide.infer import default_optim

MODELS = {"hier": (hier_model, hier_data), "sv": (sv_model, sv_data), "hs": (horseshoe_model, horseshoe_data),
          "lin5": (lin5_model, lin5_data), "readme": (readme_model, lambda s: readme_data(s, 1.0))}


def run_fit_A(seed, intercept, steps, total, kw):
    x, y = readme_data(seed, intercept)
    pyro.set_rng_seed(seed); pyro.clear_param_store()
    g = pfg.AutoFlowGuide(readme_model, **kw)
    try:
        r = pfg.fit(readme_model, g, x, y, steps=steps, optim=default_optim(total, g.default_final_lr), progress=False)
        med = g.median(x, y)
        return {"fail": False, "skipped": r.num_skipped, "a": float(med["a"]), "b": float(med["b"]), "sigma": float(med["sigma"])}
    except pfg.NonFiniteLossError as e:
        return {"fail": True, "at": e.result.steps if e.result is not None else None}


def run_svi(name, seed, lr, steps, kw, guide="flow"):
    model, data = MODELS[name]; args = data(seed)
    pyro.set_rng_seed(seed); pyro.clear_param_store()
    if guide == "flow":
        g = pfg.AutoFlowGuide(model, **kw)
    else:
        import pyro.infer.autoguide as ag
        g = getattr(ag, guide)(model)
    svi = SVI(model, g, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    losses = []
    for i in range(steps):
        try:
            l = svi.step(*args)
        except (ValueError, RuntimeError) as e:
            return {"fail": True, "at": i, "why": str(e).split("\n")[0][:100]}
        if not math.isfinite(l):
            return {"fail": True, "at": i, "why": f"loss {l}"}
        losses.append(l)
    tail = sorted(losses[-max(steps // 10, 10):])
    return {"fail": False, "tail_median": tail[len(tail) // 2]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="A1,A9,B,C,D")
    p.add_argument("--guide-kw", default="{}")
    p.add_argument("--a-steps", type=int, default=150)
    p.add_argument("--b-steps", type=int, default=120)
    p.add_argument("--b-lrs", default="0.03")
    p.add_argument("--c-steps", type=int, default=300)
    p.add_argument("--seeds-a1", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--no-mask", action="store_true", help="RenyiDReG_ELBO.mask_negligible = False (ablation)")
    p.add_argument("--no-backoff", action="store_true", help="NonFiniteGuard without lr back-off (ablation)")
    a = p.parse_args()
    kw = json.loads(a.guide_kw)
    if a.no_mask:
        pfg.RenyiDReG_ELBO.mask_negligible = False
    if a.no_backoff and "backoff_every" in pfg.NonFiniteGuard.__init__.__code__.co_varnames:
        pfg.NonFiniteGuard.__init__.__defaults__ = (20, None)
    cases = a.cases.split(",")
    print("pyro_flowguide from", pfg.__file__, "guide kwargs", kw, flush=True)
    res = {}
    warnings.filterwarnings("ignore", category=UserWarning, module="pyro")
    if "A1" in cases or "A9" in cases:
        for tag, icpt, n in (("A1", 1.0, a.seeds_a1), ("A9", 9.0, 8)):
            if tag not in cases:
                continue
            rows = [run_fit_A(s, icpt, a.a_steps, 2000, kw) for s in range(n)]
            fails = [s for s, r in enumerate(rows) if r["fail"]]
            res[tag] = rows
            ok = [r for r in rows if not r["fail"]]
            print(f"{tag}: intercept {icpt}: NonFiniteLossError in {len(fails)}/{n} runs (seeds {fails}); "
                  f"median a over finished runs: {[round(r['a'], 2) for r in ok]}", flush=True)
    if "B" in cases:
        for lr in map(float, a.b_lrs.split(",")):
            for name in ("hier", "sv", "hs"):
                rows = [run_svi(name, s, lr, a.b_steps, kw) for s in range(3)]
                res[f"B-{name}-{lr}"] = rows
                print(f"B {name} lr {lr}: non-finite in {sum(r['fail'] for r in rows)}/3 "
                      + str([("FAIL@%d" % r["at"]) if r["fail"] else "ok %.4g" % r["tail_median"] for r in rows]), flush=True)
    if "C" in cases:
        for name in ("lin5", "readme"):
            for lr in (0.001, 0.01, 0.03, 0.1):
                rows = [run_svi(name, s, lr, a.c_steps, kw) for s in range(3)]
                res[f"C-{name}-{lr}"] = rows
                bad = sum(r["fail"] or r["tail_median"] > 1e4 for r in rows)
                print(f"C {name} lr {lr}: non-finite or diverged (tail loss > 1e4) in {bad}/3 "
                      + str([("FAIL@%d" % r["at"]) if r["fail"] else "%.4g" % r["tail_median"] for r in rows]), flush=True)
    if "D" in cases:
        X, y = lin5_data(0)
        out = {}
        for steps in (300,):
            pyro.set_rng_seed(0); pyro.clear_param_store()
            g = pfg.AutoFlowGuide(lin5_model, **kw)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                r = pfg.fit(lin5_model, g, X, y, steps=steps, progress=False)
            msgs = [str(m.message)[:160] for m in w if "converge" in str(m.message).lower()]
            out[steps] = {"final_smoothed_loss": r.smoothed_loss, "warnings": msgs,
                          "median_sigma": float(g.median(X, y)["sigma"])}
        res["D"] = out
        print(f"D: fit(steps=300) on the 5-D model: smoothed loss {out[300]['final_smoothed_loss']:.2f}, "
              f"median sigma {out[300]['median_sigma']:.3f}; convergence warning: {bool(out[300]['warnings'])} "
              f"{out[300]['warnings'][:1]}", flush=True)
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
