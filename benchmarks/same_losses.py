"""Records or checks the exact training losses of the default guide on the five targets.

A behaviour-preserving change (a refactor) must leave every loss bit-identical:
run ``--record`` before it and ``--check`` after. Both trainers are covered:
protocol A (``SVI`` with 4 vectorised particles) and ``pyro_flowguide.fit``
with every default, seed 0, ``--steps`` steps each.

Usage::

    python benchmarks/same_losses.py --record benchmarks/.cache/losses.json
    python benchmarks/same_losses.py --check benchmarks/.cache/losses.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyro
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.posteriors import _train_fit, _train_svi, make_guide  # noqa: E402
from benchmarks.targets import get_target, target_names  # noqa: E402


def losses(target: str, trainer: str, steps: int, seed: int = 0) -> list[str]:
    """The losses of one run as exact hexadecimal floats."""
    torch.set_num_threads(1)
    spec = get_target(target)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide("autoflow", spec)
    train = _train_svi if trainer == "svi" else _train_fit
    values, _ = train(spec, guide, steps)
    return [float(v).hex() for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path)
    mode.add_argument("--check", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--targets", default=",".join(target_names()))
    args = parser.parse_args()
    runs = {
        f"{target}/{trainer}": losses(target, trainer, args.steps)
        for target in args.targets.split(",")
        for trainer in ("svi", "fit")
    }
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(runs))
        print(f"recorded {len(runs)} runs of {args.steps} steps to {args.record}")
        return
    saved = json.loads(args.check.read_text())
    bad = 0
    for key, values in runs.items():
        same = saved.get(key) == values
        bad += not same
        first = next((i for i, (a, b) in enumerate(zip(saved.get(key, []), values)) if a != b), None)
        print(f"{key:40s} {'identical' if same else f'DIFFERS from step {first}'}")
    print(f"{len(runs) - bad} identical, {bad} differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
