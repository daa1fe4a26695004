r"""Density estimation: speed and test NLL of this package's flows against the alternatives.

One run prints one table: milliseconds per training step and test NLL (nats
per point on fresh draws) beside the true NLL of the generating density.

* **overhead**: a Zuko spline-coupling flow trained in a plain torch loop on
  ``-flow().log_prob(x)`` (Zuko alone), the same flow (identical initial
  weights) wrapped by :func:`~pyro_flowguide.transforms.flow_transform` inside
  a Pyro ``TransformedDistribution`` in the same loop, and the wrapped flow
  under Pyro SVI. The three are stepped in turn, so a busy machine slows them
  alike; the overhead is the ratio of median step times.
* **circles, 1,000 points** (the classic Pyro flow tutorial's set-up: full
  batch, Adam lr 5e-3): Pyro's ``spline_coupling(2, count_bins=16)`` beside
  this package's spline coupling (Zuko NSF with ``passes=2``), one layer of the
  same size and the registry's default depth; and the factorisation
  :math:`p(x_1)\,p(x_2 \mid x_1)` with a conditional spline flow.
* **circles, 20,000 points**: spline coupling under Pyro SVI.
* **a ~ U[1, 2], b | a ~ N(a, a)**: affine coupling with a learned L U mixing.
* **two moons**: MAF with random permutations, and a longer fit of a spline
  coupling flow as a reference for what the data allow.

Truths: circles and moons put a uniform angle on their curves and add
N(0, 0.05^2) noise, so their densities are a closed form (a Bessel function)
and a 1-D quadrature; the a/b density is exact.

Usage (from the repository root)::

    python benchmarks/density.py                 # a few minutes on 2 cores
    python benchmarks/density.py --steps 5000    # the tutorial's 5,000 steps
    python benchmarks/density.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from sklearn.datasets import make_circles, make_moons
from sklearn.preprocessing import StandardScaler

from pyro_flowguide._zuko import zuko
from pyro_flowguide.examples import sample_target, target_log_density
from pyro_flowguide.flows import base_distribution
from pyro_flowguide.transforms import clear_flow_caches, flow_transform

NOISE = 0.05


# ---------------------------------------------------------------------------
# Data and exact densities


def _circles_log_density(x: torch.Tensor) -> torch.Tensor:
    r = x.double().norm(dim=-1)
    s2 = NOISE**2
    rings = [
        -math.log(2 * math.pi * s2) - (r - R) ** 2 / (2 * s2) + torch.special.i0e(r * R / s2).log()
        for R in (1.0, 0.5)
    ]
    return torch.logsumexp(torch.stack(rings), dim=0) - math.log(2)


def _moons_log_density(x: torch.Tensor, nodes: int = 4000) -> torch.Tensor:
    theta = (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes * math.pi
    curve = torch.cat(
        [
            torch.stack([theta.cos(), theta.sin()], dim=-1),
            torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=-1),
        ]
    )
    d2 = (x.double()[:, None, :] - curve).square().sum(-1)
    return (
        torch.logsumexp(-d2 / (2 * NOISE**2), dim=-1)
        - math.log(2 * nodes)
        - math.log(2 * math.pi * NOISE**2)
    )


def sklearn_set(name: str, n_train: int):
    """Train / test tensors standardised by the 1,000-point training set's scaler, and the true test NLL."""
    make, kwargs, log_density = {
        "circles": (make_circles, {"factor": 0.5}, _circles_log_density),
        "moons": (make_moons, {}, _moons_log_density),
    }[name]
    small, _ = make(1000, noise=NOISE, random_state=0, **kwargs)
    scaler = StandardScaler().fit(small)
    train = small if n_train == 1000 else make(n_train, noise=NOISE, random_state=2, **kwargs)[0]
    test, _ = make(5000, noise=NOISE, random_state=1, **kwargs)
    log_scale = float(torch.tensor(scaler.scale_).log().sum())
    truth = -(log_density(torch.tensor(test)) + log_scale).mean().item()

    def as_tensor(a):
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    return as_tensor(train), as_tensor(test), truth


def ab_set(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    train, test = sample_target(10_000, g), sample_target(20_000, g)
    return train, test, -target_log_density(test).mean().item()


# ---------------------------------------------------------------------------
# Training


@dataclass
class Row:
    target: str
    method: str
    steps: int
    ms_per_step: float
    test_nll: float
    true_nll: float

    def line(self) -> str:
        gap = self.test_nll - self.true_nll
        return (
            f"| {self.target} | {self.method} | {self.steps} | {self.ms_per_step:.2f} | "
            f"{self.test_nll:.3f} | {self.true_nll:.3f} | {gap:+.3f} |"
        )


class _Learner:
    """One flow density with its own optimiser; ``step(batch)`` returns the step's seconds."""

    def __init__(self, log_prob, parameters, lr, steps, module=None, svi=False, clear=None):
        self.log_prob, self.module, self.times, self.clear = log_prob, module, [], clear
        parameters = list(parameters)
        if svi:
            def model(x):
                pyro.module("flow", module)
                # Nats per point, as in the torch loop: ClippedAdam clips each
                # gradient element, so the scale of the loss matters.
                with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=1.0 / x.shape[0]):
                    pyro.sample("x", self._dist, obs=x)

            optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.05 ** (1 / steps)})
            self._svi = SVI(model, lambda x: None, optim, Trace_ELBO())
        else:
            self._svi = None
            self.opt = torch.optim.Adam(parameters, lr=lr)

    def step(self, batch):
        start = time.perf_counter()
        if self._svi is not None:
            self._svi.step(batch)
        else:
            loss = -self.log_prob(batch).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        if self.module is not None:
            clear_flow_caches(self.module)  # the cache holds this step's graph
        if self.clear is not None:
            self.clear()
        self.times.append(time.perf_counter() - start)

    def ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    def nll(self, data) -> float:
        if self.module is not None:
            clear_flow_caches(self.module)
        with torch.no_grad():
            return -self.log_prob(data).mean().item()


def _density_learner(T, lr, steps, svi=False, base=None):
    flow = dist.TransformedDistribution(base or base_distribution("real", T.features), [T])
    learner = _Learner(flow.log_prob, T.parameters(), lr, steps, module=T, svi=svi)
    learner._dist = flow
    return learner


def _train(learners, data, steps, batch=None, seed=0):
    """Steps every learner in turn on the same batches."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xb = data if batch is None else data[torch.randint(0, len(data), (batch,), generator=g)]
        for learner in learners:
            learner.step(xb)


def overhead(steps: int) -> list[Row]:
    train, test, truth = sklearn_set("circles", 20_000)
    torch.manual_seed(0)
    zuko_flow = zuko.flows.NSF(2, passes=2, transforms=3, hidden_features=(64, 64))
    wrapped = flow_transform(copy.deepcopy(zuko_flow), 2, direction="density")
    under_svi = flow_transform(copy.deepcopy(zuko_flow), 2, direction="density")
    plain = _Learner(lambda x: zuko_flow().log_prob(x), zuko_flow.parameters(), 3e-3, steps)
    ours = _density_learner(wrapped, 3e-3, steps)
    ours_svi = _density_learner(under_svi, 3e-3, steps, svi=True)
    _train([plain, ours, ours_svi], train, steps, batch=256)
    target = "circles 20k (overhead)"
    rows = [
        Row(target, "Zuko NSF coupling, plain torch loop", steps, plain.ms(), plain.nll(test), truth),
        Row(target, "same flow via flow_transform, torch loop", steps, ours.ms(), ours.nll(test), truth),
        Row(target, "same flow via flow_transform, Pyro SVI", steps, ours_svi.ms(), ours_svi.nll(test), truth),
    ]
    return rows


def circles_small(steps: int) -> list[Row]:
    train, test, truth = sklearn_set("circles", 1000)
    target = "circles 1k (tutorial set-up)"
    torch.manual_seed(0)
    pyro_T = dist.transforms.spline_coupling(2, count_bins=16)
    pyro_flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2), torch.ones(2)), [pyro_T])
    # Pyro's transform caches its last value: with a full batch (the same tensor
    # every step) it must be cleared every step, as the tutorial does.
    pyro_learner = _Learner(pyro_flow.log_prob, pyro_T.parameters(), 5e-3, steps, clear=pyro_flow.clear_cache)
    one = _density_learner(
        flow_transform("NSF", 2, direction="density", passes=2, transforms=1, bins=16, hidden_features=(20, 20)),
        5e-3,
        steps,
    )
    deep = _density_learner(flow_transform("NSF", 2, direction="density", passes=2), 5e-3, steps)
    # p(x1) p(x2 | x1): a 1-D spline flow and a conditional one.
    marginal = flow_transform("NSF", 1, direction="density")
    conditional = flow_transform("NSF", 1, context=1, direction="density")
    p1 = dist.TransformedDistribution(base_distribution("real", 1), [marginal])
    p21 = dist.ConditionalTransformedDistribution(base_distribution("real", 1), [conditional])
    both = torch.nn.ModuleList([marginal, conditional])

    def factorised(x):
        return p1.log_prob(x[:, :1]) + p21.condition(x[:, :1]).log_prob(x[:, 1:])

    fact = _Learner(factorised, both.parameters(), 5e-3, steps, module=both)
    learners = [pyro_learner, one, deep, fact]
    _train(learners, train, steps)
    return [
        Row(target, "Pyro spline_coupling(count_bins=16)", steps, pyro_learner.ms(), pyro_learner.nll(test), truth),
        Row(target, "spline coupling, 1 layer, 16 bins, hidden (20, 20)", steps, one.ms(), one.nll(test), truth),
        Row(target, "spline coupling, registry NSF defaults (3 layers)", steps, deep.ms(), deep.nll(test), truth),
        Row(target, "p(x1) p(x2 given x1), conditional NSF", steps, fact.ms(), fact.nll(test), truth),
    ]


def circles_large(steps: int) -> list[Row]:
    train, test, truth = sklearn_set("circles", 20_000)
    torch.manual_seed(0)
    T = flow_transform("NSF", 2, direction="density", passes=2, transforms=4, bins=16, hidden_features=(32, 32))
    learner = _density_learner(T, 1e-2, steps, svi=True)
    _train([learner], train, steps, batch=512)
    return [Row("circles 20k", "spline coupling 4 x 16 bins, Pyro SVI", steps, learner.ms(), learner.nll(test), truth)]


def ab_target(steps: int) -> list[Row]:
    train, test, truth = ab_set()
    loc, scale = train.mean(0), train.std(0)
    torch.manual_seed(0)
    parts = []
    for i in range(4):
        mask = torch.arange(2) % 2 == i % 2
        parts.append(zuko.flows.GeneralCouplingTransform(2, mask=mask, hidden_features=(64, 64)))
        parts.append(zuko.flows.UnconditionalTransform(zuko.transforms.LULinearTransform, torch.eye(2)))
    T = flow_transform(zuko.lazy.LazyComposedTransform(*parts), 2, direction="density")
    learner = _density_learner(T, 5e-3, steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(learner.opt, steps)
    z = (train - loc) / scale
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        learner.step(z[torch.randint(0, len(z), (256,), generator=g)])
        sched.step()
    nll = learner.nll((test - loc) / scale) + scale.log().sum().item()
    return [Row("a~U[1,2], b|a~N(a,a)", "affine coupling + LU, 4 layers", steps, learner.ms(), nll, truth)]


def moons(steps: int, long_steps: int) -> list[Row]:
    train, test, truth = sklearn_set("moons", 20_000)
    torch.manual_seed(0)
    maf = _density_learner(flow_transform("MAF", 2, direction="density", randperm=True, transforms=5), 5e-3, steps)
    maf_sched = torch.optim.lr_scheduler.CosineAnnealingLR(maf.opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        maf.step(train[torch.randint(0, len(train), (512,), generator=g)])
        maf_sched.step()
    torch.manual_seed(0)
    ref_T = flow_transform("NSF", 2, direction="density", passes=2, transforms=4, bins=16)
    ref = _density_learner(ref_T, 5e-3, long_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref.opt, long_steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(long_steps):
        ref.step(train[torch.randint(0, len(train), (512,), generator=g)])
        sched.step()
    return [
        Row("moons 20k", "MAF, 5 layers, random permutations", steps, maf.ms(), maf.nll(test), truth),
        Row("moons 20k", "reference: spline coupling 4 x 16 bins, long fit", long_steps, ref.ms(), ref.nll(test), truth),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps of the overhead, 1k-circles and moons MAF rows")
    parser.add_argument("--large-steps", type=int, default=800, help="steps of the 20k-circles and a/b rows")
    parser.add_argument("--long-steps", type=int, default=3000, help="steps of the moons reference fit")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke run)")
    parser.add_argument("--only", nargs="*", default=None, help="overhead circles_small circles_large ab moons")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.large_steps, args.long_steps = 20, 20, 40
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)

    sections = {
        "overhead": lambda: overhead(args.steps),
        "circles_small": lambda: circles_small(args.steps),
        "circles_large": lambda: circles_large(args.large_steps),
        "ab": lambda: ab_target(args.large_steps),
        "moons": lambda: moons(args.steps, args.long_steps),
    }
    rows: list[Row] = []
    start = time.perf_counter()
    for name, run in sections.items():
        if args.only is None or name in args.only:
            pyro.clear_param_store()
            t0 = time.perf_counter()
            new = run()
            rows += new
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
            for row in new:
                print("  " + row.line(), flush=True)

    print()
    print("| target | method | steps | ms/step | test NLL | true NLL | gap |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())
    by_method = {r.method: r for r in rows}
    plain = by_method.get("Zuko NSF coupling, plain torch loop")
    if plain is not None:
        for method in ("same flow via flow_transform, torch loop", "same flow via flow_transform, Pyro SVI"):
            r = by_method[method]
            print(f"overhead of '{method}' over plain Zuko: {100 * (r.ms_per_step / plain.ms_per_step - 1):+.1f} %")
    print(f"total {time.perf_counter() - start:.0f} s (median step times; the machine may be shared)")


if __name__ == "__main__":
    main()
