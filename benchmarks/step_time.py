r"""Step time of AutoFlowGuide against the hand-written Zuko guide with the same flow and size.

Each guide is trained for 30 warm-up steps, then all guides are timed in turn,
in 6 blocks of 50 protocol-A steps, so that a change in machine load hits
them alike; the table gives the median block per guide and its ratio to the
hand-written Zuko MAF guide (``benchmarks.posteriors.ZukoFlowGuide``: MAF,
3 transforms, hidden ``(H, H)``, ``H = max(64, 4 D)``, which is also
AutoFlowGuide's default size).

Usage::

    python benchmarks/step_time.py                      # banana, eight schools, logreg
    python benchmarks/step_time.py --targets funnel10 --blocks 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.posteriors import make_guide, protocol_a_optimizer  # noqa: E402
from benchmarks.targets import get_target  # noqa: E402
from pyro_flowguide.transforms import clear_flow_caches  # noqa: E402

GUIDES = ("zuko_maf", "autoflow", 'autoflow:{"estimator":"reparam"}')


def _step(svi: SVI, guide) -> None:
    svi.step()
    if isinstance(guide, torch.nn.Module):
        clear_flow_caches(guide)


def compare(target_name: str, blocks: int = 6, block_steps: int = 50) -> dict[str, float]:
    """Median ms/step per guide on one target, timed in interleaved blocks."""
    target = get_target(target_name)
    runs = {}
    for spec in GUIDES:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make_guide(spec, target)
        elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=target.max_plate_nesting)
        svi = SVI(target.model, guide, protocol_a_optimizer(3000), elbo)
        for _ in range(30):
            _step(svi, guide)
        runs[spec] = (svi, guide, pyro.get_param_store().get_state())
    times: dict[str, list[float]] = {spec: [] for spec in GUIDES}
    for _ in range(blocks):
        for spec in GUIDES:
            svi, guide, state = runs[spec]
            pyro.get_param_store().set_state(state)  # each guide trains on its own parameters
            start = time.perf_counter()
            for _ in range(block_steps):
                _step(svi, guide)
            times[spec].append((time.perf_counter() - start) / block_steps * 1e3)
            runs[spec] = (svi, guide, pyro.get_param_store().get_state())
    return {spec: statistics.median(t) for spec, t in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="banana,eight_schools_centered,logreg")
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    print(f"{'target':24s} {'guide':34s} {'ms/step':>8s} {'vs zuko_maf':>11s}")
    for name in args.targets.split(","):
        ms = compare(name, args.blocks)
        for spec, value in ms.items():
            print(f"{name:24s} {spec:34s} {value:8.2f} {value / ms['zuko_maf']:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
