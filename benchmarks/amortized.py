r"""Step time and memory of ``AutoAmortizedFlowGuide`` against the data size N.

An amortized guide under a subsampled plate must cost the same per step
whatever N is: the model sees B rows, the guide encodes B rows. This script
times SVI steps on the model of issue 7 (``z_i ~ N(0, 1)``, ``x_i ~ N(2 z_i + 1,
0.5)``) at several N with batch B, with the training set-up of
:func:`pyro_flowguide.fit` (``Trace_ELBO`` with the guide's default number of
vectorised particles, ClippedAdam with its learning-rate schedule), and
reports for each N:

* the median ms per step (after warm-up), and its ratio to the smallest N;
* the resident memory (RSS) before the data is made, after set-up, and its
  change over the timed steps (flat memory: no growth per step);
* for comparison, what Pyro's own plate subsampling would cost per step
  (``torch.randperm(N)``), which the guide avoids by drawing its own indices.

A second part (``--vae``) compares the held-out importance-weighted bound of a
flow VAE and a diagonal-Normal VAE on ``sklearn``'s digits (acceptance item 4);
see :func:`vae_comparison`.

Usage (repository root, project virtualenv)::

    python benchmarks/amortized.py                      # N = 1e4, 1e5, 1e6, B = 256
    python benchmarks/amortized.py --sizes 10000,1000000 --steps 300 --batch 256
    python benchmarks/amortized.py --vae --vae-steps 3000 --iw-samples 1000

Timings depend on the machine and on what else runs on it: compare rows of one run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import pyro
import pyro.distributions as dist
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyro_flowguide as pfg  # noqa: E402
from benchmarks.memory import rss_mb  # noqa: E402
from pyro_flowguide.examples import local_linear as model  # noqa: E402
from pyro_flowguide.train import default_loss, default_optim  # noqa: E402
from pyro_flowguide.train.defaults import TRAINING_DEFAULTS, training_defaults  # noqa: E402


def time_steps(sizes: list[int], batch: int, steps: int, warmup: int, seed: int = 0, **guide_kwargs) -> list[dict]:
    """Median ms per SVI step and memory for each data size.

    The sizes are timed round-robin (a few steps of each in turn), so a change
    in the machine's load during the run affects every size alike.
    """
    pyro.clear_param_store()
    # A throw-away run first, so one-time allocations (imports, kernels) land in no row.
    warm = pfg.AutoAmortizedFlowGuide(model, amortized={"z": lambda x, batch_size=None: x}, **guide_kwargs)
    warm._pyro_name = "guide_warm"
    defaults = training_defaults(warm)  # fit's defaults for it
    particles, final_lr = defaults.num_particles, defaults.final_lr
    warm_svi = pyro.infer.SVI(model, warm, default_optim(), default_loss(particles, True, 1))
    for _ in range(3):
        warm_svi.step(torch.randn(1000), batch)
    runs = []
    for n in sizes:
        pyro.set_rng_seed(seed)
        gc.collect()
        rss0 = rss_mb()
        x = 2 * torch.randn(n) + 1
        guide = pfg.AutoAmortizedFlowGuide(model, amortized={"z": lambda x, batch_size=None: x}, **guide_kwargs)
        # One param-store prefix per size, so the guides train side by side.
        guide._pyro_name = f"guide_n{n}"
        svi = pyro.infer.SVI(model, guide, default_optim(warmup + steps, final_lr), default_loss(particles, True, 1))
        for _ in range(warmup):
            svi.step(x, batch)
            pfg.transforms.clear_flow_caches(guide)
        gc.collect()
        runs.append({"n": n, "x": x, "guide": guide, "svi": svi, "times": [],
                     "rss_data_setup_mb": rss_mb() - rss0})
    rss1 = rss_mb()
    chunk = 10
    for _ in range(0, steps, chunk):
        for run in runs:
            for _ in range(chunk):
                t = time.perf_counter()
                run["svi"].step(run["x"], batch)
                pfg.transforms.clear_flow_caches(run["guide"])
                run["times"].append(time.perf_counter() - t)
    gc.collect()
    growth = rss_mb() - rss1
    rows = []
    for run in runs:
        n = run["n"]
        t = time.perf_counter()
        reps = 5
        for _ in range(reps):
            torch.randperm(n)[:batch]
        rows.append({
            "n": n,
            "ms": 1000 * statistics.median(run["times"]),
            "rss_data_setup_mb": run["rss_data_setup_mb"],
            "rss_growth_mb": growth,
            "randperm_ms": 1000 * (time.perf_counter() - t) / reps,
        })
    return rows


def vae_comparison(steps: int, iw_samples: int, latent: int = 8, batch: int = 128, seed: int = 0) -> dict:
    """Held-out importance-weighted bound of a flow VAE vs a diagonal-Normal VAE on binarised digits.

    Both use the same decoder architecture, encoder, optimiser and number of
    steps; only the local posterior differs (``flow="NSF"`` vs ``flow=None``).
    Returns the mean per-image held-out bound (nats, higher is better) for each.
    """
    from sklearn.datasets import load_digits

    digits = torch.as_tensor(load_digits().data, dtype=torch.float32)
    data = (digits > 7).float()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(data), generator=g)
    test, train = data[perm[:297]], data[perm[297:]]
    out = {}
    for label, flow in (("flow (NSF)", "NSF"), ("diagonal Normal", None)):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        vae = _vae(latent)
        guide = pfg.AutoAmortizedFlowGuide(
            vae, amortized={"z": lambda x, batch_size=None: x}, flow=flow, encoder_features=(128, 128)
        )
        t = time.perf_counter()
        pfg.fit(vae, guide, train, batch, steps=steps, progress=False, seed=seed)
        wall = time.perf_counter() - t
        bounds = pfg.local_psis_diagnostic(vae, guide, test, num_samples=iw_samples)
        out[label] = {
            "iw_bound": float(bounds.log_evidence.mean()),
            "khat_share_over_0.7": float((bounds.khat > 0.7).float().mean()),
            "fit_s": wall,
        }
    return out


def _vae(latent: int):
    decoder = torch.nn.Sequential(
        torch.nn.Linear(latent, 128), torch.nn.ELU(), torch.nn.Linear(128, 128), torch.nn.ELU(), torch.nn.Linear(128, 64)
    )

    def vae(x: torch.Tensor, batch_size: int | None = None) -> None:
        net = pyro.module("decoder", decoder)
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net(z)).to_event(1), obs=x[idx])

    return vae


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--flow", default="NSF", help="local flow family, or 'none'")
    parser.add_argument("--vae", action="store_true", help="run the digits VAE comparison instead")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--iw-samples", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.vae:
        res = vae_comparison(args.vae_steps, args.iw_samples)
        print(f"digits VAE, {args.vae_steps} steps, held-out bound with {args.iw_samples} importance samples")
        print("| encoder | held-out IW bound (nats/image) | share k-hat > 0.7 | fit s |")
        print("|---|---|---|---|")
        for label, r in res.items():
            print(f"| {label} | {r['iw_bound']:.2f} | {r['khat_share_over_0.7']:.3f} | {r['fit_s']:.0f} |")
        return
    flow = None if args.flow.lower() == "none" else args.flow
    rows = time_steps([int(n) for n in args.sizes.split(",")], args.batch, args.steps, args.warmup, flow=flow)
    base = rows[0]["ms"]
    particles = TRAINING_DEFAULTS[pfg.AutoAmortizedFlowGuide].num_particles
    print(f"AutoAmortizedFlowGuide(flow={flow!r}), batch {args.batch}, {particles} vectorised particles, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print("| N | ms/step | vs first | RSS data + set-up (MB) | RSS growth over all timed steps (MB) | Pyro randperm(N) ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']:.0e} | {r['ms']:.2f} | {r['ms'] / base:.2f} | {r['rss_data_setup_mb']:.1f} | "
            f"{r['rss_growth_mb']:.1f} | {r['randperm_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
