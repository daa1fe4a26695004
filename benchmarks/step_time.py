r"""Step time of AutoFlowGuide against the hand-written Zuko guide with the same flow and size.

Each guide is trained for 30 warm-up steps, then all guides are timed in turn,
in 6 blocks of 50 protocol-A steps, so that a change in machine load hits
them alike; the table gives the median block per guide and particle count,
and its ratio to the first guide at the first count. By default that is the
hand-written Zuko guide with AutoFlowGuide's default flow and size
(``benchmarks.posteriors.ZukoFlowGuide`` with ``SplineMAF``: one NSF layer and
3 MAF layers, hidden ``(H, H)``, ``H = max(64, 4 D)``) at protocol A's 4
particles; ``--guides zuko_maf,'autoflow:{"flow": "MAF"}'`` compares plain MAF.

Usage::

    python benchmarks/step_time.py                      # banana, eight schools, logreg
    python benchmarks/step_time.py --targets funnel10 --blocks 10
    python benchmarks/step_time.py --guides autoflow --particles 4,32   # what fit's 32 particles cost
    python benchmarks/step_time.py --optimizer-only    # why the guide keeps one flat parameter
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.posteriors import (  # noqa: E402
    _clear_caches,
    _split_specs,
    make_guide,
    protocol_a_optimizer,
    protocol_a_svi,
)
from benchmarks.targets import get_target  # noqa: E402

GUIDES = ("zuko_splinemaf", "autoflow", 'autoflow:{"estimator":"reparam"}')


def compare(
    target_name: str,
    blocks: int = 6,
    block_steps: int = 50,
    guides: tuple[str, ...] = GUIDES,
    particles: tuple[int, ...] = (4,),
) -> dict[tuple[str, int], float]:
    """Median ms/step per (guide, particle count) on one target, timed in interleaved blocks."""
    target = get_target(target_name)
    runs = {}
    for spec in guides:
        for n in particles:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            guide = make_guide(spec, target)
            svi, clear = protocol_a_svi(target, guide, 3000, num_particles=n), _clear_caches(guide)
            for _ in range(30):
                svi.step()
                clear()
            runs[spec, n] = (svi, clear, pyro.get_param_store().get_state())
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for _ in range(blocks):
        for key in runs:
            svi, clear, state = runs[key]
            pyro.get_param_store().set_state(state)  # each guide trains on its own parameters
            start = time.perf_counter()
            for _ in range(block_steps):
                svi.step()
                clear()
            times[key].append((time.perf_counter() - start) / block_steps * 1e3)
            runs[key] = (svi, clear, pyro.get_param_store().get_state())
    return {key: statistics.median(t) for key, t in times.items()}


def optimizer_call_ms(dim: int = 10, calls: int = 300) -> tuple[float, float]:
    """ms per ``ClippedAdam`` call over a default-size guide's tensors, separate and as one.

    The tensors of AutoFlowGuide's default at latent size ``dim`` before they
    were packed: three MADE networks (hidden ``max(64, 4 dim)``, two hidden
    layers, weights and biases), the loc, the log-scales and the triangular factor.
    """
    h = max(64, 4 * dim)
    shapes = [(h, dim), (h,), (h, h), (h,), (2 * dim, h), (2 * dim,)] * 3 + [(dim,), (dim,), (dim, dim)]

    def per_call(tensors: list[torch.Tensor]) -> float:
        for p in tensors:
            p.grad = torch.randn_like(p)
        optim = protocol_a_optimizer(3000)
        for _ in range(20):
            optim(tensors)
        start = time.perf_counter()
        for _ in range(calls):
            optim(tensors)
        return (time.perf_counter() - start) / calls * 1e3

    separate = [torch.randn(s, requires_grad=True) for s in shapes]
    packed = [torch.randn(sum(math.prod(s) for s in shapes), requires_grad=True)]
    return per_call(separate), per_call(packed)


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="banana,eight_schools_centered,logreg")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--guides", default=",".join(GUIDES), help="guide specs (commas inside JSON are fine)")
    parser.add_argument("--particles", default="4", help="vectorised particle counts, e.g. 4,32")
    parser.add_argument(
        "--optimizer-only",
        action="store_true",
        help="time one ClippedAdam call over the default guide's tensors, separate and packed",
    )
    args = parser.parse_args()
    if args.optimizer_only:
        for dim in (2, 10, 25):
            separate, packed = optimizer_call_ms(dim)
            print(f"D = {dim:2d}: ClippedAdam over 21 tensors {separate:.2f} ms, over one packed tensor {packed:.2f} ms")
        return
    guides = tuple(_split_specs(args.guides))
    particles = tuple(int(n) for n in args.particles.split(","))
    base = (guides[0], particles[0])
    print(f"{'target':24s} {'guide':34s} {'particles':>9s} {'ms/step':>8s} {'ratio':>6s}  (ratio to {base[0]}, {base[1]} particles)")
    for name in args.targets.split(","):
        ms = compare(name, args.blocks, guides=guides, particles=particles)
        for (spec, n), value in ms.items():
            print(f"{name:24s} {spec:34s} {n:9d} {value:8.2f} {value / ms[base]:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
