"""Fit guides to the real-model targets and score them against the NUTS references.

For each target x guide x seed: build the guide, train it with
``pfg.fit(model, guide, *args, steps=steps, progress=False)`` (the same trainer and
budget for every guide; ``--lr`` instead runs a plain ``pyro.infer.SVI`` loop with
``Trace_ELBO`` and ``pyro.optim.Adam({"lr": lr})``), record a non-finite stop
(``pfg.NonFiniteLossError``) or any exception as a failed row, draw 4,000 guide
samples in constrained space and compare them with the cached reference
(``references.py``):

* ``sme_max`` / ``sme_med``: largest / median |mean_q - mean_ref| / sd_ref over coordinates
* ``sd_min`` / ``sd_max``: smallest / largest sd_q / sd_ref (``worst_sd``: the coordinate of the
  largest |log sd ratio|; ``worst``: that of the largest mean error)
* ``w1``: mean over coordinates of the Wasserstein-1 distance / sd_ref
* ``khat``: PSIS k-hat of log p(x, z) - log q(z) (``pfg.psis_diagnostic``, 1,000 draws)
* ``ms/step`` and ``fit_s``: training wall time per step and in total; ``cpu_ms``: process CPU
  time per step (steadier than wall time on a shared machine)

(horseshoe_logreg: its positive scales are compared on the log scale, see models.py.)

    python benchmarks/real/run.py --targets radon,baseball --guides autonormal,autoflow --seeds 0 --steps 300
    python benchmarks/real/run.py --steps 3000 --seeds 0,1,2 --json benchmarks/.cache/real/run.json
    python benchmarks/real/run.py --targets stoch_vol --guides autonormal,autoflow --lr 0.01 --steps 3000
    python benchmarks/real/run.py --summary run_autoflow.json,run_anchors.json   # seed means, default vs best anchor
    python benchmarks/real/run.py --targets baseball --guides 'autoflow:{"estimator": "reparam"}' --lr 0.1 --steps 500
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from models import TARGETS  # noqa: E402

GUIDES = ("autonormal", "automvn", "autolowrank", "autoiaf", "autoflow")
MVN_MAX_DIM = 300


def make_guide(name, model):
    from pyro.infer import autoguide as ag

    if name == "autonormal":
        return ag.AutoNormal(model)
    if name == "automvn":
        return ag.AutoMultivariateNormal(model)
    if name == "autolowrank":
        return ag.AutoLowRankMultivariateNormal(model)
    if name == "autoiaf":
        return ag.AutoIAFNormal(model)
    if name == "autoflow" or name.startswith("autoflow:"):
        import pyro_flowguide as pfg

        options = json.loads(name[len("autoflow:"):]) if ":" in name else {}
        return pfg.AutoFlowGuide(model, **options)
    if name.startswith("autostructured:"):
        import pyro_flowguide as pfg

        return pfg.AutoStructuredFlowGuide(model, **json.loads(name[len("autostructured:"):]))
    raise ValueError(
        f"unknown guide {name!r}; choose from {GUIDES}, autoflow:{{json options}} or autostructured:{{json options}}"
    )


def draw(guide, args, num):
    import pyro

    with torch.no_grad():
        if hasattr(guide, "sample_posterior"):
            return guide.sample_posterior(num, *args)
        with pyro.plate("_draws", num, dim=-1):
            return guide(*args)


def metrics(t, ref, q):
    from scipy.stats import wasserstein_distance

    ref, q = t.for_metrics(ref), t.for_metrics(q)
    m_r, s_r = ref.mean(0), ref.std(0)
    out = dict(sme_max=math.nan, sme_med=math.nan, sd_min=math.nan, sd_max=math.nan, w1=math.nan,
               nonfinite_draws=int((~np.isfinite(q)).any(1).sum()))
    if not np.isfinite(q).all():
        return out
    sme = np.abs(q.mean(0) - m_r) / s_r
    ratio = q.std(0) / s_r
    w1 = np.array([wasserstein_distance(q[:, j], ref[:, j]) for j in range(ref.shape[1])]) / s_r
    out.update(sme_max=float(sme.max()), sme_med=float(np.median(sme)), sd_min=float(ratio.min()),
               sd_max=float(ratio.max()), w1=float(w1.mean()), worst=t.labels[int(np.argmax(sme))],
               worst_sd=t.labels[int(np.argmax(np.abs(np.log(ratio))))])
    return out


def psis_khat(model, guide, args, num=1000):
    try:
        import pyro_flowguide as pfg

        return float(pfg.psis_diagnostic(model, guide, *args, num_samples=num).khat)
    except TypeError:
        pass
    import arviz as az
    from pyro.infer.importance import vectorized_importance_weights

    lw, _ = vectorized_importance_weights(model, guide, *args, num_samples=num, max_plate_nesting=0)
    _, k = az.psislw(lw.detach().cpu().numpy())
    return float(k)


def train(model, guide, args, steps, lr):
    """-> dict(status, steps, skipped, wall, cpu_s, final_loss, first_nonfinite)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = _train(model, guide, args, steps, lr, t0)
    out["cpu_s"] = time.process_time() - c0
    return out


def _train(model, guide, args, steps, lr, t0):
    import pyro
    import pyro_flowguide as pfg

    if lr is None:
        try:
            res = pfg.fit(model, guide, *args, steps=steps, progress=False)
        except pfg.NonFiniteLossError as e:
            return dict(status="nonfinite", steps=None, skipped=None, wall=time.perf_counter() - t0,
                        final_loss=math.nan, error=str(e).splitlines()[0][:200])
        losses = np.asarray(res.losses, dtype=float)
        return dict(status="ok", steps=int(getattr(res, "steps", len(losses))),
                    skipped=getattr(res, "num_skipped", None), wall=time.perf_counter() - t0,
                    final_loss=float(np.nanmean(losses[-100:])) if len(losses) else math.nan,
                    num_particles=getattr(res, "num_particles", None))
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}), pyro.infer.Trace_ELBO())
    losses, first_bad = [], None
    for i in range(steps):
        loss = svi.step(*args)
        losses.append(loss)
        if not math.isfinite(loss):
            first_bad = i
            break
    wall = time.perf_counter() - t0
    return dict(status="ok" if first_bad is None else "nonfinite", steps=len(losses), skipped=None, wall=wall,
                final_loss=float(np.mean(losses[-100:])), first_nonfinite=first_bad)


def run_one(t, gname, seed, steps, lr, ref, num_samples, psis_samples):
    import pyro

    row = dict(target=t.name, dim=t.dim, guide=gname, seed=seed, steps=steps, lr=lr)
    if gname == "automvn" and t.dim > MVN_MAX_DIM:
        row.update(status="skipped", error=f"dim {t.dim} > {MVN_MAX_DIM}")
        return row
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    args = t.pyro_args()
    try:
        guide = make_guide(gname, t.pyro_model)
        row.update(train(t.pyro_model, guide, args, steps, lr))
    except Exception as e:  # noqa: BLE001
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
        traceback.print_exc(limit=3)
        return row
    if row.get("steps"):
        row["ms_step"] = 1000 * row["wall"] / row["steps"]
        row["cpu_ms_step"] = 1000 * row["cpu_s"] / row["steps"]
    if row["status"] != "ok":
        return row
    try:
        q = t.flatten(draw(guide, args, num_samples))
        if ref is not None:
            row.update(metrics(t, ref, q))
    except Exception as e:  # noqa: BLE001
        row.update(status="error", error=f"sampling: {type(e).__name__}: {e}"[:300])
        return row
    try:
        row["khat"] = psis_khat(t.pyro_model, guide, args, psis_samples)
    except Exception as e:  # noqa: BLE001
        row["khat"] = math.nan
        row["khat_error"] = f"{type(e).__name__}: {e}"[:200]
    return row


def fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def print_table(t, rows):
    print(f"\n{t.name} (dim {t.dim})")
    print(f"{'guide':12s} {'seed':>4s} {'status':9s} {'skip':>4s} {'sme_max':>8s} {'sme_med':>8s} {'sd_min':>7s} "
          f"{'sd_max':>7s} {'w1':>6s} {'khat':>6s} {'ms/step':>8s} {'cpu_ms':>7s} {'fit_s':>7s}")
    for r in rows:
        status = r["status"] + (f"@{r['first_nonfinite']}" if r.get("first_nonfinite") is not None else "")
        print(f"{r['guide']:12s} {r['seed']:4d} {status:9s} {fmt(r.get('skipped'), 'd'):>4s} "
              f"{fmt(r.get('sme_max'), '.3f'):>8s} {fmt(r.get('sme_med'), '.3f'):>8s} "
              f"{fmt(r.get('sd_min'), '.3f'):>7s} {fmt(r.get('sd_max'), '.3f'):>7s} {fmt(r.get('w1'), '.3f'):>6s} "
              f"{fmt(r.get('khat'), '.2f'):>6s} {fmt(r.get('ms_step'), '.1f'):>8s} "
              f"{fmt(r.get('cpu_ms_step'), '.1f'):>7s} {fmt(r.get('wall'), '.1f'):>7s}"
              + (f"  worst={r['worst']}" if r.get("worst") else "")
              + (f" worst_sd={r['worst_sd']}" if r.get("worst_sd") else "")
              + (f"  {r['error'].splitlines()[0]}" if r.get("error") else ""), flush=True)


def summarize(paths):
    """Per target and guide, over seeds: stops, skipped steps, and the mean of the largest standardised
    mean error, of the worst |log sd ratio|, of w1 and of k-hat; then the default guide against the best anchor."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)
    table = {}
    for r in rows:
        table.setdefault((r["target"], r["guide"]), []).append(r)
    print("| target | guide | seeds | stopped | skipped | max SME | worst abs log sd ratio | w1 | k-hat |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for (target, guide), rs in sorted(table.items()):
        ok = [r for r in rs if r.get("sme_max") is not None]
        mean = lambda key: float(np.mean([key(r) for r in ok])) if ok else math.nan  # noqa: E731
        sme = mean(lambda r: r["sme_max"])
        lsd = mean(lambda r: max(abs(math.log(r["sd_min"])), abs(math.log(r["sd_max"]))))
        summary[target, guide] = (sme, lsd)
        print(f"| {target} | {guide} | {','.join(str(r['seed']) for r in rs)} | {len(rs) - len(ok)} | "
              f"{sum(int(r.get('skipped') or 0) for r in ok)} | {sme:.3f} | {lsd:.3f} | "
              f"{mean(lambda r: r['w1']):.3f} | {mean(lambda r: r['khat']):.2f} |")
    print()
    print("| target | default: max SME / worst abs log sd ratio | best anchor on each | default better by >= 20% on both |")
    print("|---|---|---|---|")
    for target in sorted({t for t, _ in summary}):
        mine = summary.get((target, "autoflow"))
        anchors = {g: v for (t, g), v in summary.items() if t == target and g != "autoflow" and not math.isnan(v[0])}
        if mine is None or not anchors:
            continue
        best_sme = min(anchors.items(), key=lambda kv: kv[1][0])
        best_lsd = min(anchors.items(), key=lambda kv: kv[1][1])
        better = mine[0] <= 0.8 * best_sme[1][0] and mine[1] <= 0.8 * best_lsd[1][1]
        print(f"| {target} | {mine[0]:.3f} / {mine[1]:.3f} | {best_sme[1][0]:.3f} ({best_sme[0]}) / "
              f"{best_lsd[1][1]:.3f} ({best_lsd[0]}) | {'yes' if better else 'no'} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--guides", default=",".join(GUIDES))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=None,
                    help="plain SVI + Trace_ELBO + Adam(lr) instead of pfg.fit")
    ap.add_argument("--num-samples", type=int, default=4000)
    ap.add_argument("--psis-samples", type=int, default=1000)
    ap.add_argument("--json", default=None, help="append rows to this file (rewritten after every row)")
    ap.add_argument("--summary", default=None, help="comma-separated JSON files of earlier runs: print seed means and stop")
    a = ap.parse_args(argv)
    if a.summary:
        summarize(a.summary.split(","))
        return
    torch.set_num_threads(1)
    from references import load_reference

    rows_all = []
    if a.json and os.path.exists(a.json):
        with open(a.json) as f:
            rows_all = json.load(f)
    for name in a.targets.split(","):
        t = TARGETS[name]
        ref = load_reference(name)
        if ref is None:
            print(f"[{name}] no reference cached: run references.py first; metrics left empty", flush=True)
        rows = []
        for g in a.guides.split(","):
            for s in (int(x) for x in a.seeds.split(",")):
                r = run_one(t, g, s, a.steps, a.lr, ref, a.num_samples, a.psis_samples)
                rows.append(r)
                rows_all.append(r)
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump(rows_all, f, indent=1, default=float)
        print_table(t, rows)


if __name__ == "__main__":
    main()
