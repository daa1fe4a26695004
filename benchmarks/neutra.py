r"""NUTS with and without a trained flow (NeuTra) on the funnel and on centred eight schools.

For each target: train ``AutoFlowGuide(model)`` with ``pfg.fit`` (every
default, ``--steps``), then run Pyro's NUTS ``--chains`` times (one chain
each, ``--warmup`` + ``--samples`` draws, seeds 0, 1, ...) on the model as it
is and on the model under ``NeuTraReparam(guide)`` (NUTS in the flow's base
space; draws mapped back with ``neutra.transform_sample``). Columns, over the
pooled chains: the smallest bulk ESS over coordinates (ArviZ's ``ess``, the
chains as chains), that ESS per second of sampling (warm-up included; the
guide's training time is reported apart), the number of divergences, the
largest R-hat and w1 to the reference draws (exact for the funnel, the cached
NUTS reference for eight schools; see ``targets.py``).

    python benchmarks/neutra.py
    python benchmarks/neutra.py --targets funnel10 --chains 2 --warmup 300 --samples 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.reparam import NeuTraReparam

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.targets import get_target, metrics  # noqa: E402

COLUMNS = ("target", "sampler", "chains", "min ESS", "ESS/s", "divergences", "max R-hat", "w1", "seconds")


def run_chain(model, seed: int, warmup: int, samples: int) -> tuple[dict, int, float]:
    """One NUTS chain: its draws by site, its divergences and its wall time."""
    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(model), num_samples=samples, warmup_steps=warmup, num_chains=1, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())  # indices of divergent draws
    return mcmc.get_samples(), divergences, seconds


def sample(target, guide, chains: int, warmup: int, samples: int) -> tuple[np.ndarray, int, float]:
    """Draws ``(chains, samples, D)`` in the target's flat order, total divergences and seconds."""
    model = target.model
    draws, divergences, seconds = [], 0, 0.0
    for chain in range(chains):
        if guide is None:
            got, div, sec = run_chain(model, chain, warmup, samples)
        else:
            neutra = NeuTraReparam(guide)
            reparam_model = poutine.reparam(model, config=lambda _: neutra)
            got, div, sec = run_chain(reparam_model, chain, warmup, samples)
            first = next(name for name, _ in guide.prototype_trace.iter_stochastic_nodes())
            latent = got[f"{first}_shared_latent"]
            # The draws' batch dim goes left of the model's plates, as transform_sample asks.
            nesting = max((-f.dim for f in guide._prototype_frames.values()), default=0)
            got = neutra.transform_sample(latent.reshape(latent.shape[:1] + (1,) * nesting + latent.shape[-1:]))
        draws.append(target.flatten({k: v.detach() for k, v in got.items()}, samples))
        divergences += div
        seconds += sec
    return np.stack(draws), divergences, seconds


def summarise(name: str, sampler: str, draws: np.ndarray, divergences: int, seconds: float, ref) -> dict:
    import arviz as az

    coords = range(draws.shape[-1])
    ess = min(float(az.ess(draws[..., i])) for i in coords)
    rhat = max(float(az.rhat(draws[..., i])) for i in coords) if draws.shape[0] > 1 else float("nan")
    w1 = metrics(draws.reshape(-1, draws.shape[-1]), ref)["w1"]
    return {"target": name, "sampler": sampler, "chains": draws.shape[0], "min ESS": ess,
            "ESS/s": ess / seconds, "divergences": divergences, "max R-hat": rhat, "w1": w1, "seconds": seconds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="funnel10,eight_schools_centered")
    p.add_argument("--steps", type=int, default=3000, help="fit steps of the guide")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args(argv)

    import pyro_flowguide as pfg

    torch.set_num_threads(1)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for name in args.targets.split(","):
        target = get_target(name)
        ref = target.reference_draws()
        pyro.clear_param_store()
        guide = pfg.AutoFlowGuide(target.model, structure="full")
        start = time.perf_counter()
        pfg.fit(target.model, guide, steps=args.steps, progress=False, seed=0)
        trained = time.perf_counter() - start
        for sampler, g in (("NUTS", None), (f"NeuTra NUTS (guide {trained:.0f} s)", guide)):
            draws, divergences, seconds = sample(target, g, args.chains, args.warmup, args.samples)
            row = summarise(name, sampler, draws, divergences, seconds, ref)
            cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
