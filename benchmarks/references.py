r"""Long-NUTS reference draws for the benchmark targets without an exact sampler.

The draws are built once and cached as ``benchmarks/.cache/<target>.npz``
(git-ignored) holding ``draws`` of shape ``(chains, draws, dim)`` in the
target's flat constrained order (see ``benchmarks/targets.py``), the seeds, the
settings, per-coordinate r-hat and bulk ESS (ArviZ), and the wall time.

* ``eight_schools_centered``: NUTS on the non-centered parameterisation (the
  easy geometry), mapped back to ``(mu, tau, theta)``.
* ``logreg``: NUTS on the model itself.

Chains run one after another in this process (one thread each), so the build
does not fight other jobs for cores.

Usage::

    python benchmarks/references.py              # build every missing reference
    python benchmarks/references.py --force      # rebuild
    python benchmarks/references.py --noise-floors  # and print every target's w1 noise floor
    python benchmarks/references.py --targets logreg --chains 4 --warmup 1000 --draws 5000

Example:
    >>> from benchmarks.references import load_reference
    >>> ref = load_reference("logreg")          # builds it the first time (minutes)
    >>> ref["draws"].shape
    (4, 5000, 25)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.targets import (  # noqa: E402
    eight_schools_noncentered,
    get_target,
    logreg,
)

__all__ = ["CACHE_DIR", "NUTS_TARGETS", "build_reference", "load_reference", "noise_floor"]

#: Where the ``.npz`` files live (ignored by git).
CACHE_DIR = Path(__file__).resolve().parent / ".cache"

#: Target name -> (model NUTS runs on, function mapping its samples to the flat order).
NUTS_TARGETS = {
    "eight_schools_centered": (
        eight_schools_noncentered,
        lambda s: np.concatenate([s["mu"][:, None], s["tau"][:, None], s["theta"]], axis=-1),
    ),
    "logreg": (logreg, lambda s: s["w"]),
}

_SETTINGS = {"chains": 4, "warmup": 1000, "draws": 5000, "seed": 0}


def _run_chain(model, warmup: int, draws: int, seed: int) -> dict[str, np.ndarray]:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True, target_accept_prob=0.9)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True)
    mcmc.run()
    samples = {k: v.numpy() for k, v in mcmc.get_samples().items()}
    # deterministic sites (theta of the non-centered model) are not in get_samples
    if model is eight_schools_noncentered:
        samples["theta"] = samples["mu"][:, None] + samples["tau"][:, None] * samples["theta_tilde"]
    return samples


def build_reference(
    name: str,
    chains: int = 4,
    warmup: int = 1000,
    draws: int = 5000,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    r"""Runs NUTS for target ``name`` and writes ``CACHE_DIR / f"{name}.npz"``.

    Arguments:
        name: A target in :data:`NUTS_TARGETS`.
        chains: Number of chains (run in sequence; chain ``c`` uses seed ``seed + c``).
        warmup: Warm-up steps per chain.
        draws: Kept draws per chain.
        seed: Base seed.
        verbose: Print diagnostics when done.

    Returns:
        The cached record (see :func:`load_reference`).
    """
    if name not in NUTS_TARGETS:
        raise ValueError(
            f"target {name!r} needs no NUTS reference; NUTS targets: {', '.join(NUTS_TARGETS)}"
        )
    torch.set_num_threads(1)
    model, to_flat = NUTS_TARGETS[name]
    start = time.perf_counter()
    per_chain = []
    for c in range(chains):
        t0 = time.perf_counter()
        per_chain.append(to_flat(_run_chain(model, warmup, draws, seed + c)))
        if verbose:
            print(f"  {name}: chain {c} done in {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - start
    stacked = np.stack(per_chain).astype(np.float64)  # (chains, draws, dim)
    dim = get_target(name).dim
    if stacked.shape != (chains, draws, dim):
        raise RuntimeError(f"{name}: NUTS draws have shape {stacked.shape}, expected {(chains, draws, dim)}")
    dataset = az.convert_to_dataset({"x": stacked})
    record = {
        "draws": stacked,
        "rhat": az.rhat(dataset)["x"].values,
        "ess_bulk": az.ess(dataset, method="bulk")["x"].values,
        "ess_tail": az.ess(dataset, method="tail")["x"].values,
        "wall_s": np.float64(wall),
        "chains": chains,
        "warmup": warmup,
        "num_draws": draws,
        "seed": seed,
    }
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # write then rename, so a concurrent reader never sees half a file
    partial = CACHE_DIR / f"{name}.partial.npz"
    np.savez(partial, **record)
    os.replace(partial, CACHE_DIR / f"{name}.npz")
    if verbose:
        _print_diagnostics(name, record)
    return record


def load_reference(name: str) -> dict[str, Any]:
    r"""The cached NUTS record of target ``name``, built first if missing.

    Returns:
        A dict with ``draws`` ``(chains, draws, dim)``, ``rhat``, ``ess_bulk``,
        ``ess_tail`` (per coordinate), ``wall_s`` and the settings used.
    """
    path = CACHE_DIR / f"{name}.npz"
    if not path.exists():
        print(f"building the NUTS reference for {name!r} (minutes; cached in {path})", flush=True)
        return build_reference(name, **{k: v for k, v in _SETTINGS.items()})
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def noise_floor(name: str, num: int = 2000, seed: int = 1, repeats: int = 10) -> float:
    r"""The ``w1`` that ``num`` good draws score against the reference.

    Exact targets: the mean over ``repeats`` sets of ``num`` fresh exact draws
    (seeds ``seed, seed + 1, ...``) against the reference; one set alone varies
    by about +-30 %. NUTS targets: ``num`` evenly spaced draws of chain 0
    against chains 1.. pooled (``seed`` and ``repeats`` unused).
    """
    from benchmarks.targets import metrics

    target = get_target(name)
    if target.exact is not None:
        ref = target.reference_draws()
        scores = [metrics(target.exact_draws(num, seed + r), ref)["w1"] for r in range(repeats)]
        return float(np.mean(scores))
    draws = load_reference(name)["draws"]
    index = np.linspace(0, draws.shape[1] - 1, num).round().astype(int)
    return metrics(draws[0, index], draws[1:].reshape(-1, draws.shape[-1]))["w1"]


def _print_diagnostics(name: str, record: dict[str, Any]) -> None:
    print(
        f"{name}: {int(record['chains'])} chains x ({int(record['warmup'])} warmup + "
        f"{int(record['num_draws'])} draws) in {float(record['wall_s']):.0f} s; "
        f"r-hat max {record['rhat'].max():.4f}; bulk ESS min {record['ess_bulk'].min():.0f}, "
        f"tail ESS min {record['ess_tail'].min():.0f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(NUTS_TARGETS))
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--chains", type=int, default=_SETTINGS["chains"])
    parser.add_argument("--warmup", type=int, default=_SETTINGS["warmup"])
    parser.add_argument("--draws", type=int, default=_SETTINGS["draws"])
    parser.add_argument("--seed", type=int, default=_SETTINGS["seed"])
    parser.add_argument(
        "--noise-floors", action="store_true", help="also print the w1 noise floor of every target"
    )
    args = parser.parse_args(argv)
    for name in args.targets.split(","):
        path = CACHE_DIR / f"{name}.npz"
        if path.exists() and not args.force:
            print(f"{name}: cached at {path}")
            _print_diagnostics(name, load_reference(name))
            continue
        build_reference(name, args.chains, args.warmup, args.draws, args.seed)
    if args.noise_floors:
        from benchmarks.targets import target_names

        for name in target_names():
            print(f"noise floor (w1 of 2000 good draws) {name}: {noise_floor(name):.3f}")


if __name__ == "__main__":
    main()
