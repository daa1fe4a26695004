r"""What ``pyro_flowguide.fit`` costs over a bare ``svi.step`` loop, and whether its memory stays flat.

Overhead (default): for each target and guide, the same number of steps with
the same settings (4 vectorised particles of the loss ``fit`` picks for the
guide: ``Trace_ELBO``, or the loss ``fit`` picks for it (``pyro_flowguide.train.defaults``);
``ClippedAdam(lr=1e-2, clip_norm=10)`` decayed to the guide's final lr) run three ways, each
from a fresh param store and the same seed, interleaved over several repeats (the order rotating from one repeat to the next):

* ``bare``: ``svi = SVI(model, guide, optim, loss); for _ in range(steps): svi.step()``
* ``fit``: ``fit(model, guide, steps=steps, num_particles=4, progress=False)``
  (every other default: guard, cache clearing, its one set-up trace and
  particle probe; the particle count is pinned because AutoFlowGuide's own
  default is 32)
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
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro_flowguide as pfg  # noqa: E402
from benchmarks.memory import rss_mb  # noqa: E402
from benchmarks.targets import get_target  # noqa: E402
from pyro_flowguide.train import ProgressBar, default_optim, fit  # noqa: E402
from pyro_flowguide.train.defaults import training_defaults  # noqa: E402

GUIDES = {
    "autonormal": lambda model: AutoNormal(model),
    "autoflow": lambda model: pfg.AutoFlowGuide(model),
}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def _bare(model, guide, steps: int, max_plate_nesting: int) -> tuple[float, float]:
    t = _clock()
    # the loss and schedule fit() picks for this guide, set up as fit does
    defaults = training_defaults(guide)
    guide()
    loss = defaults.loss(guide, 4, True, max_plate_nesting)
    svi = SVI(model, guide, default_optim(steps, defaults.final_lr), loss)
    for _ in range(steps):
        svi.step()
    return _since(t)


def _fit(model, guide, steps: int, bar: bool) -> tuple[float, float]:
    t = _clock()
    if bar:
        with open(os.devnull, "w") as sink:
            fit(model, guide, steps=steps, num_particles=4, callbacks=[ProgressBar(file=sink)])
    else:
        fit(model, guide, steps=steps, num_particles=4, progress=False)
    return _since(t)


def overhead(targets: list[str], guides: list[str], steps: int, repeats: int, seed: int) -> None:
    torch.set_num_threads(1)
    modes = ("bare", "fit", "fit+bar")
    print("ms per step, median over repeats; wall clock, and this process's CPU time in brackets")
    print(f"{'target':<8} {'guide':<11} " + " ".join(f"{m:>17}" for m in modes) + f" {'fit overhead':>20} {'+bar':>16}")
    for target_name in targets:
        target = get_target(target_name)
        for guide_name in guides:
            wall: dict[str, list[float]] = {m: [] for m in modes}
            cpu: dict[str, list[float]] = {m: [] for m in modes}
            # Warm-up: lazy imports, allocator, the optimiser's first construction.
            pyro.clear_param_store()
            fit(target.model, GUIDES[guide_name](target.model), steps=20, progress=False, seed=seed)
            for r in range(repeats):
                # Rotate which mode runs first, so drift in machine load favours none of them.
                for how in modes[r % 3 :] + modes[: r % 3]:
                    pyro.clear_param_store()
                    pyro.set_rng_seed(seed)
                    guide = GUIDES[guide_name](target.model)
                    if how == "bare":
                        w, c = _bare(target.model, guide, steps, target.max_plate_nesting)
                    else:
                        w, c = _fit(target.model, guide, steps, bar=how == "fit+bar")
                    wall[how].append(1e3 * w / steps)
                    cpu[how].append(1e3 * c / steps)
            mw = {k: statistics.median(v) for k, v in wall.items()}
            mc = {k: statistics.median(v) for k, v in cpu.items()}

            def pct(a: float, b: float) -> str:
                return f"{100 * (a / b - 1):+.1f}%"

            cells = " ".join(f"{mw[m]:>8.3f} [{mc[m]:>6.3f}]" for m in modes)
            print(
                f"{target_name:<8} {guide_name:<11} {cells} "
                f"{pct(mw['fit'], mw['bare']):>9} [{pct(mc['fit'], mc['bare']):>7}] "
                f"{pct(mw['fit+bar'], mw['bare']):>7} [{pct(mc['fit+bar'], mc['bare']):>6}]",
                flush=True,
            )


def memory(steps: int, seed: int) -> None:
    torch.set_num_threads(1)
    target = get_target("banana")
    pyro.clear_param_store()
    guide = pfg.AutoFlowGuide(target.model)
    fit(target.model, guide, steps=500, progress=False, seed=seed)
    before = rss_mb()
    t = time.perf_counter()
    result = fit(target.model, guide, steps=steps, progress=False)
    wall = time.perf_counter() - t
    after = rss_mb()
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
