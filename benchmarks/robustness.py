"""Does the default guide stop on a non-finite loss? Counts over many runs of the README's example.

Two cases, each trained with ``pfg.fit(model, AutoFlowGuide(model), x, y, steps=...)``
and every default:

* ``readme``: the README's regression (intercept 1), each run on fresh data
  and unseeded (the seed each run drew is printed, so a failure can be
  replayed with ``--seeds``);
* ``intercept9``: the same model with intercept 9, a posterior that the data
  pin far (13 units) from the prior-median start.

Per case it prints the runs that stopped with ``NonFiniteLossError``, the
skipped steps, how many ended with a convergence warning, and the median of
the intercept ``a`` against least squares.

    python benchmarks/robustness.py --runs 100                   # the README example, unseeded
    python benchmarks/robustness.py --case intercept9 --runs 20
    python benchmarks/robustness.py --seeds 2,4,5,7 --steps 150  # replay given seeds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import pyro
import torch

import pyro_flowguide as pfg
from pyro_flowguide.examples import linear_regression, linear_regression_data

INTERCEPT = {"readme": 1.0, "intercept9": 9.0}


def one_run(case: str, seed: int, steps: int) -> dict:
    x, y = linear_regression_data(intercept=INTERCEPT[case], seed=seed)
    a_ls = float(torch.linalg.lstsq(torch.stack([torch.ones_like(x), x], -1), y[:, None]).solution[0])
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(linear_regression)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = pfg.fit(linear_regression, guide, x, y, steps=steps, progress=False)
        except pfg.NonFiniteLossError as err:
            steps_done = err.result.steps if err.result is not None else None
            return {"seed": seed, "stopped": True, "at": steps_done, "why": str(err).splitlines()[0][:160]}
    unconverged = any("converge" in str(w.message) for w in caught)
    a = float(guide.median(x, y)["a"])
    return {
        "seed": seed, "stopped": False, "skipped": result.num_skipped, "unconverged": unconverged,
        "a": a, "a_ls": a_ls, "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(INTERCEPT), default="readme")
    parser.add_argument("--runs", type=int, default=100, help="unseeded runs (seeds drawn from os.urandom)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds instead of unseeded runs")
    parser.add_argument("--steps", type=int, default=2000, help="fit's steps (the README uses 2000)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
    else:
        seeds = [int.from_bytes(os.urandom(4), "little") for _ in range(args.runs)]
    rows = []
    for i, seed in enumerate(seeds):
        row = one_run(args.case, seed, args.steps)
        rows.append(row)
        tag = f"STOPPED at {row['at']}: {row['why']}" if row["stopped"] else (
            f"a {row['a']:.3f} (least squares {row['a_ls']:.3f}), skipped {row['skipped']}"
            f"{', unconverged' if row['unconverged'] else ''}, {row['seconds']:.1f} s"
        )
        print(f"[{i + 1}/{len(seeds)}] seed {seed}: {tag}", flush=True)
    done = [r for r in rows if not r["stopped"]]
    stopped = [r["seed"] for r in rows if r["stopped"]]
    print(f"\n{args.case}, {len(rows)} runs of {args.steps} steps:")
    print(f"  stopped on a non-finite loss: {len(stopped)} {stopped if stopped else ''}")
    if done:
        errors = [abs(r["a"] - r["a_ls"]) for r in done]
        print(f"  skipped steps: total {sum(r['skipped'] for r in done)}, runs with any {sum(r['skipped'] > 0 for r in done)}")
        print(f"  convergence warning: {sum(r['unconverged'] for r in done)} of {len(done)}")
        print(f"  |median a - least squares|: median {statistics.median(errors):.4f}, largest {max(errors):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
