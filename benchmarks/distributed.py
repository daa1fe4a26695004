r"""Distributed SVI on CPU: steps/s and samples/s for 1 vs 2 processes.

A Bayesian logistic regression on ``--num-data`` synthetic points with
``--features`` features, an ``AutoNormal`` guide (``--guide flow`` for
``AutoFlowGuide``), one ELBO particle, trained with
:func:`pyro_flowguide.train.lightning.fit_distributed`. The model takes each
batch's indices and declares ``pyro.plate("data", N, subsample=idx)``, so
every process's minibatch is scaled to the full data. For each per-process
batch size ``B`` it runs:

* 1 process, 1 thread, batch ``B`` and batch ``2B``;
* 1 process, 2 threads (torch intra-op), batch ``2B``;
* 2 processes (DDP, gloo), 1 thread each, batch ``B`` each (``2B`` a step).

Times are taken on rank 0 between step ``--warmup`` and the last step, so
process start-up and the first steps are left out. ``samples/s`` counts data
points per second over all processes (global batch x steps/s).

Usage::

    python benchmarks/distributed.py                      # the table below
    python benchmarks/distributed.py --batch 1024 --steps 50 --num-data 100000

Measured on this project's 2-core CPU machine while it was *heavily shared*
with other jobs (load average 15-24 throughout, so both cores were rarely free
for us and every figure is several times slower than on an idle machine),
torch 2.13, Lightning 2.6, ``ddp_spawn``, N = 10^6, 50 features, AutoNormal;
150 timed steps (30 for the last block, run separately). Compare rows within a
block; the ratios, not the absolute rates, are the result::

    | processes | threads | batch/process | batch/step | steps/s | samples/s | ms/step |
    |---|---|---|---|---|---|---|
    | 1 | 1 | 512    | 512    | 15.9 |   8,130 |   63 |
    | 1 | 1 | 1024   | 1024   | 13.2 |  13,518 |   76 |
    | 1 | 2 | 1024   | 1024   |  6.3 |   6,502 |  157 |
    | 2 | 1 | 512    | 1024   |  8.5 |   8,679 |  118 |
    | 1 | 1 | 8192   | 8192   |  8.8 |  72,304 |  113 |
    | 1 | 1 | 16384  | 16384  |  6.2 | 101,689 |  161 |
    | 1 | 2 | 16384  | 16384  |  3.9 |  63,720 |  257 |
    | 2 | 1 | 8192   | 16384  |  7.8 | 127,147 |  129 |
    | 1 | 1 | 65536  | 65536  |  3.5 | 230,038 |  285 |
    | 1 | 1 | 131072 | 131072 |  1.6 | 207,646 |  631 |
    | 1 | 2 | 131072 | 131072 |  0.9 | 111,922 | 1171 |
    | 2 | 1 | 65536  | 131072 |  1.8 | 240,843 |  544 |
    | 1 | 1 | 262144 | 262144 | 0.70 | 183,723 | 1427 |
    | 1 | 1 | 524288 | 524288 | 0.36 | 186,808 | 2807 |
    | 1 | 2 | 524288 | 524288 | 0.40 | 207,667 | 2525 |
    | 2 | 1 | 262144 | 524288 | 0.52 | 274,249 | 1912 |

Same data per step, 2 processes against 1: 0.64x the steps/s at 1,024 points
a step, 1.25x at 16,384, 1.16x at 131,072 and 1.47x at 524,288.

When distribution pays off on CPU. A DDP step costs a whole per-process step
(Python, Pyro tracing, Lightning hooks: milliseconds whatever the batch) plus
a gloo all-reduce that waits for the slower process. At small batches that
fixed cost dominates and one process is faster (0.64x above at 1,024 points
a step). Two processes start to pay once each one's arithmetic is large
against it: here from about 10^4 points a step, by 1.2-1.5x, short of 2x
because the cores were shared (a process that is descheduled stalls the
other at the all-reduce). A second torch thread in one process did worse than
a second process at every size on this loaded machine. On an idle machine
expect the same crossover, with larger gains at large batches; we could not
measure one. The strong reason to distribute on CPU is data or memory that
one process cannot hold, or several machines (``num_nodes``); on a small,
busy box, prefer one process and a larger batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from lightning.pytorch import Callback
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule

from pyro_flowguide import AutoFlowGuide
from pyro_flowguide.train.lightning import fit_distributed


class LogisticRegression(PyroModule):
    """w ~ N(0, I), b ~ N(0, 1), y ~ Bernoulli(logits = x w + b); the plate is scaled to N."""

    def __init__(self, num_data: int, features: int) -> None:
        super().__init__()
        self.num_data = num_data
        self.features = features

    def forward(self, idx, x, y=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(self.features), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", self.num_data, subsample=idx):
            pyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)


class _Timer(Callback):
    """Rank 0 writes the seconds and steps between step ``warmup`` and the end."""

    def __init__(self, warmup: int, path: str) -> None:
        self.warmup, self.path, self.start = warmup, path, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            seconds = time.perf_counter() - self.start
            Path(self.path).write_text(json.dumps({"seconds": seconds, "steps": trainer.global_step - self.warmup}))


def _data(num_data: int, features: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_data, features, generator=g)
    w = torch.randn(features, generator=g) / math.sqrt(features)
    y = torch.bernoulli(torch.sigmoid(x @ w), generator=g)
    return torch.arange(num_data), x, y


def _run(data, args, *, devices: int, batch: int, threads: int, strategy: str) -> dict:
    pyro.clear_param_store()
    torch.set_num_threads(threads)
    model = LogisticRegression(args.num_data, args.features)
    guide = AutoNormal(model) if args.guide == "normal" else AutoFlowGuide(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timing.json")
        fit_distributed(
            model, guide, data, steps=args.warmup + args.steps, batch_size=batch,
            devices=devices, strategy=strategy if devices > 1 else "auto", seed=0,
            callbacks=[_Timer(args.warmup, path)], default_root_dir=tmp, progress=False,
        )
        timing = json.loads(Path(path).read_text())
    steps_per_s = timing["steps"] / timing["seconds"]
    return {
        "processes": devices,
        "threads": threads,
        "batch": batch,
        "global": batch * devices,
        "steps/s": steps_per_s,
        "samples/s": steps_per_s * batch * devices,
        "ms/step": 1000 / steps_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-data", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--batch", type=int, nargs="+", default=[512, 8192, 65536],
                        help="per-process batch sizes")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--guide", choices=["normal", "flow"], default="normal")
    parser.add_argument("--strategy", default="ddp_spawn",
                        help="DDP strategy ('ddp' would re-run this script; 'ddp_fork' after "
                             "multi-threaded runs risks OpenMP hangs)")
    args = parser.parse_args()
    strategy = args.strategy
    data = _data(args.num_data, args.features)
    rows = []
    for batch in args.batch:
        for devices, b, threads in [(1, batch, 1), (1, 2 * batch, 1), (1, 2 * batch, 2), (2, batch, 1)]:
            rows.append(_run(data, args, devices=devices, batch=b, threads=threads, strategy=strategy))
            print(rows[-1], flush=True)
    print(f"\nN = {args.num_data}, {args.features} features, guide {args.guide}, "
          f"{args.steps} timed steps, DDP strategy {strategy}, load average {os.getloadavg()[0]:.1f}\n")
    print("| processes | threads | batch/process | batch/step | steps/s | samples/s | ms/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['threads']} | {r['batch']} | {r['global']} | "
              f"{r['steps/s']:.1f} | {r['samples/s']:,.0f} | {r['ms/step']:.1f} |")


if __name__ == "__main__":
    main()
