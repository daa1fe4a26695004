r"""How guides scale with the number of latents D: cost and accuracy on two models of known posterior.

Models (``benchmarks/scale_models.py``; ``linreg``, a regression on correlated
predictors with an exact reference, as well): ``hier``, a hierarchical normal model
with J = D - 2 groups and known noise (exact reference from a grid), and
``sv``, a centred stochastic-volatility model whose D - 3 log-volatilities are
one vector site (NumPyro NUTS reference, cached in ``benchmarks/.cache/scale/``).
Guides: ``autoflow`` (:class:`~pyro_flowguide.AutoFlowGuide` with every
default: its full flow below ``STRUCTURED_MIN_DIM`` latents, the structured
posterior from there), ``structured`` (:class:`~pyro_flowguide.guides.AutoStructuredFlowGuide`),
``autonormal``, ``autolowrank`` (``AutoLowRankMultivariateNormal``), ``automvn``
(``AutoMultivariateNormal``), ``autoiaf``
(``AutoIAFNormal``; a case it cannot run prints its error) and ``autoflow_full``
(``AutoFlowGuide(structure="full")``, only where D <= 200).

Every guide is trained the same way: SVI with ``Trace_ELBO(num_particles=4,
vectorize_particles=True)`` and ``ClippedAdam`` at lr 1e-2 decayed
geometrically to 1e-3 over ``--steps`` (clip 10), one torch thread;
``--particles 32 --final-lr 3e-4`` is the budget ``fit`` gives ``AutoFlowGuide``;
``--trainer fit`` trains each guide with ``pfg.fit`` and every default instead. Columns:
parameters, median ms/step, peak RSS at the end of the fit (before
scoring), the whole fit's seconds, and on
``--draws`` guide draws the largest standardised mean error
``max |mean_q - mean_ref| / sd_ref`` and the min / max of ``sd_q / sd_ref``
over every coordinate, and PSIS k-hat on ``--khat-draws`` draws.

Usage::

    python benchmarks/scale.py --models hier,sv --D 100,1000 --steps 3000 --guides autoflow,autonormal,autolowrank
    python benchmarks/scale.py --models hier --D 100 --steps 200 --inline   # all cases in this process
    python benchmarks/scale.py --worker hier 100 autoflow --steps 200     # one case, one JSON line

Each case runs in a subprocess of its own so that its peak RSS is its own;
with ``--inline`` they run in this process and peak RSS is the process's
peak so far. ``--out FILE`` appends one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.scale_models import MODELS  # noqa: E402

GUIDES = ("autoflow", "structured", "autonormal", "autolowrank", "automvn", "autoiaf", "autoflow_full")
AUTOFLOW_MAX_D = 200
CACHE = HERE / ".cache" / "scale"
COLUMNS = [
    ("model", "model"), ("D", "D"), ("guide", "guide"), ("steps", "steps"), ("params", "params"),
    ("ms_step", "ms/step"), ("peak_rss_mb", "peak RSS MB"), ("fit_s", "fit s"),
    ("max_std_mean_err", "max std mean err"), ("sd_ratio_min", "sd ratio min"),
    ("sd_ratio_max", "sd ratio max"), ("khat", "k-hat"),
]


def make_guide(name: str, model, D: int):
    """The guide ``name`` for ``model`` at ``D`` latents, or a string saying why there is none."""
    import pyro.infer.autoguide as ag

    if name == "structured":
        from pyro_flowguide.guides import AutoStructuredFlowGuide

        return AutoStructuredFlowGuide(model)
    if name == "autonormal":
        return ag.AutoNormal(model)
    if name == "autolowrank":
        return ag.AutoLowRankMultivariateNormal(model)
    if name == "automvn":
        return ag.AutoMultivariateNormal(model)
    if name == "autoiaf":
        return ag.AutoIAFNormal(model)
    if name == "autoflow":
        from pyro_flowguide import AutoFlowGuide

        return AutoFlowGuide(model)
    if name == "autoflow_full":
        if D > AUTOFLOW_MAX_D:
            return f"skipped (D > {AUTOFLOW_MAX_D})"
        from pyro_flowguide import AutoFlowGuide

        return AutoFlowGuide(model, structure="full")
    raise ValueError(f"unknown guide {name!r}; choose from {', '.join(GUIDES)}")


@torch.no_grad()
def guide_moments(guide, data, names: list[str], num: int, mpn: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of ``num`` guide draws of the flat constrained latents, drawn in chunks."""
    chunk = max(1, min(500, int(2e7 // D)))
    s1 = s2 = None
    for start in range(0, num, chunk):
        n = min(chunk, num - start)
        with poutine.block(), pyro.plate("_draws", n, dim=-(mpn + 1)):
            trace = poutine.trace(guide).get_trace(data)
        x = torch.cat([trace.nodes[k]["value"].reshape(n, -1).double() for k in names], 1)
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
    mean = s1 / num
    return mean, (s2 / num - mean**2).clamp_min(0).sqrt()


def run_case(model_name: str, D: int, guide_name: str, steps: int, seed: int = 0, draws: int = 2000,
             khat_draws: int = 1000, nuts: tuple[int, int] = (3000, 1000), particles: int = 4,
             final_lr: float = 1e-3, trainer: str = "svi") -> dict:
    """Trains one guide on one model at ``D`` latents and scores it; returns one row."""
    import pyro_flowguide as pfg
    from pyro_flowguide.train import default_optim
    from pyro_flowguide.transforms import flow_cache_clearers

    torch.set_num_threads(1)
    model, make_data, mpn, names, reference = MODELS[model_name]
    row = {"model": model_name, "D": D, "guide": guide_name, "steps": 0, "particles": particles, "final_lr": final_lr}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    data = make_data(D, seed)
    guide = make_guide(guide_name, model, D)
    if isinstance(guide, str):
        return {**row, "error": guide}
    svi = SVI(model, guide, default_optim(steps, final_lr),
              Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=mpn))
    times, losses, clears = [], [], None
    start = time.perf_counter()
    try:
        if trainer == "fit":  # every default of fit; ms/step is the whole fit's mean
            row.update(particles=None, final_lr=None)
            losses = list(pfg.fit(model, guide, data, steps=steps, progress=False, seed=seed).losses)
            times = [(time.perf_counter() - start) / max(1, steps)] * steps
        for _ in range(steps if trainer == "svi" else 0):
            t0 = time.perf_counter()
            losses.append(svi.step(data))
            clears = flow_cache_clearers(guide) if clears is None else clears
            for clear in clears:  # the flow caches hold last step's graph
                clear()
            times.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - a guide that cannot run this model is a result
        return {**row, "steps": len(times), "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # of the fit, before scoring
    row.update(steps=steps, fit_s=time.perf_counter() - start,
               params=sum(v.numel() for v in pyro.get_param_store().values()),
               ms_step=1000 * statistics.median(times[min(10, len(times) - 1):]) if times else float("nan"),
               final_loss=statistics.fmean(losses[-50:]) if losses else float("nan"),
               finite=all(math.isfinite(v) for v in losses))
    ref = reference(data, seed, str(CACHE)) if draws else None
    if ref is not None:
        for key in ("min_ess", "max_rhat"):  # the NUTS reference's own checks
            if ref.get(key) is not None:
                row["ref_" + key] = ref[key]
        mean, sd = guide_moments(guide, data, names, draws, mpn, D)
        err, ratio = ((mean - ref["mean"]) / ref["sd"]).abs(), sd / ref["sd"]
        row.update(max_std_mean_err=float(err.max()), sd_ratio_min=float(ratio.min()),
                   sd_ratio_max=float(ratio.max()), draws=draws)
    if khat_draws:
        row["khat"] = float(pfg.psis_diagnostic(model, guide, data, num_samples=khat_draws).khat)
    return row


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e5 else f"{value:.3e}"
    return "-" if value is None else str(value)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['model']} | {row['D']} | {row['guide']} | {row['error']} |"
    return "| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |"


def _subprocess_case(args, model: str, D: int, guide: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, str(D), guide, "--steps",
           str(args.steps), "--seed", str(args.seed), "--draws", str(args.draws), "--khat-draws",
           str(args.khat_draws), "--nuts", args.nuts, "--particles", str(args.particles),
           "--final-lr", str(args.final_lr), "--trainer", args.trainer]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = done.stderr.strip().splitlines()
    return {"model": model, "D": D, "guide": guide, "error": tail[-1] if tail else f"exit {done.returncode}"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="hier,sv")
    p.add_argument("--D", default="100,1000", help="comma-separated numbers of latents")
    p.add_argument("--guides", default="autoflow,autonormal,autolowrank,autoiaf")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=2000, help="guide draws for the moments (0: no accuracy)")
    p.add_argument("--khat-draws", type=int, default=1000, help="draws for PSIS k-hat (0: none)")
    p.add_argument("--nuts", default="3000,1000", help="draws,warm-up per chain of the sv reference")
    p.add_argument("--particles", type=int, default=4, help="vectorised particles of Trace_ELBO")
    p.add_argument("--final-lr", type=float, default=1e-3, help="where the learning rate decays to")
    p.add_argument("--trainer", choices=("svi", "fit"), default="svi",
                   help="fit: pfg.fit with every default instead (--particles and --final-lr unused)")
    p.add_argument("--inline", action="store_true", help="run every case in this process")
    p.add_argument("--out", default="", help="append one JSON line per case to this file")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "D", "GUIDE"), help="run one case, print it as JSON")
    args = p.parse_args(argv)
    nuts = tuple(int(v) for v in args.nuts.split(","))
    if args.worker:
        model, D, guide = args.worker
        print(json.dumps(run_case(model, int(D), guide, args.steps, args.seed, args.draws, args.khat_draws, nuts,
                                  args.particles, args.final_lr, args.trainer)))
        return
    print("| " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for model in args.models.split(","):
        for D in (int(v) for v in args.D.split(",")):
            for guide in args.guides.split(","):
                if args.inline:
                    row = run_case(model, D, guide, args.steps, args.seed, args.draws, args.khat_draws, nuts,
                                   args.particles, args.final_lr, args.trainer)
                else:
                    row = _subprocess_case(args, model, D, guide)
                print(format_row(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
