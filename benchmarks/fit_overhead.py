r"""What ``pyro_flowguide.fit`` costs over a bare ``svi.step`` loop, and whether its memory stays flat.

Overhead (default): for each target and guide, the same number of steps with
the same settings (``Trace_ELBO`` with 4 vectorised particles,
``ClippedAdam(lr=1e-2, clip_norm=10)`` decayed to 1e-3) run three ways, each
from a fresh param store and the same seed, interleaved over several repeats:

* ``bare``: ``svi = SVI(model, guide, optim, loss); for _ in range(steps): svi.step()``
* ``fit``: ``fit(model, guide, steps=steps, progress=False)`` (every default:
  guard, cache clearing, its one set-up trace and particle probe)
* ``fit+bar``: the same with the progress bar on (written to ``/dev/null``).

It prints the median wall time per step of each and ``fit``'s overhead in %.
The target is <= 5 %. Timings share the machine's cores with whatever else
runs: compare within one run, and use the medians.

Memory (``--memory``): 20,000 steps of ``fit`` with ``AutoFlowGuide`` on the
banana, resident set size before and after (after a 500-step warm-up).

Example:
    python benchmarks/fit_overhead.py
    python benchmarks/fit_overhead.py --targets banana --guides autoflow --steps 2000 --repeats 5
    python benchmarks/fit_overhead.py --memory
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro_flowguide as pfg  # noqa: E402
from benchmarks.targets import get_target  # noqa: E402
from pyro_flowguide.infer import ProgressBar, default_optim, fit  # noqa: E402

GUIDES = {
    "autonormal": lambda model: AutoNormal(model),
    "autoflow": lambda model: pfg.AutoFlowGuide(model),
}


def _bare(model, guide, steps: int, max_plate_nesting: int) -> float:
    t = time.perf_counter()
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=max_plate_nesting)
    svi = SVI(model, guide, default_optim(steps), loss)
    for _ in range(steps):
        svi.step()
    return time.perf_counter() - t


def _fit(model, guide, steps: int, bar: bool) -> float:
    t = time.perf_counter()
    if bar:
        with open(os.devnull, "w") as sink:
            fit(model, guide, steps=steps, callbacks=[ProgressBar(file=sink)])
    else:
        fit(model, guide, steps=steps, progress=False)
    return time.perf_counter() - t


def overhead(targets: list[str], guides: list[str], steps: int, repeats: int, seed: int) -> None:
    torch.set_num_threads(1)
    print(f"{'target':<12} {'guide':<11} {'bare ms/step':>12} {'fit ms/step':>12} {'fit+bar':>9} {'overhead':>9} {'+bar':>7}")
    for target_name in targets:
        target = get_target(target_name)
        for guide_name in guides:
            times: dict[str, list[float]] = {"bare": [], "fit": [], "fit+bar": []}
            # Warm-up: lazy imports, allocator, the optimiser's first construction.
            pyro.clear_param_store()
            fit(target.model, GUIDES[guide_name](target.model), steps=20, progress=False, seed=seed)
            for _ in range(repeats):
                for how in times:
                    pyro.clear_param_store()
                    pyro.set_rng_seed(seed)
                    guide = GUIDES[guide_name](target.model)
                    if how == "bare":
                        wall = _bare(target.model, guide, steps, target.max_plate_nesting)
                    else:
                        wall = _fit(target.model, guide, steps, bar=how == "fit+bar")
                    times[how].append(1e3 * wall / steps)
            med = {k: statistics.median(v) for k, v in times.items()}
            over = 100 * (med["fit"] / med["bare"] - 1)
            over_bar = 100 * (med["fit+bar"] / med["bare"] - 1)
            print(
                f"{target_name:<12} {guide_name:<11} {med['bare']:>12.3f} {med['fit']:>12.3f} "
                f"{med['fit+bar']:>9.3f} {over:>8.1f}% {over_bar:>6.1f}%",
                flush=True,
            )
            spread = {k: f"{min(v):.3f}-{max(v):.3f}" for k, v in times.items()}
            print(f"{'':<24} range over {repeats} repeats (ms/step): {spread}", flush=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory(steps: int, seed: int) -> None:
    torch.set_num_threads(1)
    target = get_target("banana")
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(target.model)
    fit(target.model, guide, steps=500, progress=False, seed=seed)
    before = _rss_mb()
    t = time.perf_counter()
    result = fit(target.model, guide, steps=steps, progress=False)
    wall = time.perf_counter() - t
    after = _rss_mb()
    print(
        f"fit, AutoFlowGuide (default flow) on banana: {result.steps} steps in {wall:.0f} s; "
        f"RSS {before:.1f} MB -> {after:.1f} MB, grew {after - before:+.2f} MB (target < 20 MB)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="banana,logreg")
    parser.add_argument("--guides", default="autonormal,autoflow")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", action="store_true", help="measure RSS growth over --memory-steps instead")
    parser.add_argument("--memory-steps", type=int, default=20_000)
    args = parser.parse_args(argv)
    if args.memory:
        memory(args.memory_steps, args.seed)
    else:
        overhead(args.targets.split(","), args.guides.split(","), args.steps, args.repeats, args.seed)


if __name__ == "__main__":
    main()
