r"""Protocol A: fit each guide to each target and score it against the reference.

Protocol A (the budget every guide gets): 3000 SVI steps of ``Trace_ELBO``
with 4 vectorised particles, ``ClippedAdam(lr=1e-2, clip_norm=10)`` decayed
geometrically to 1e-3 over the steps (``lrd``), then 2000 vectorised draws of
the fitted guide scored by :func:`benchmarks.targets.metrics`. With
``--trainer fit`` the guide is trained by ``pyro_flowguide.fit(model, guide,
steps=...)`` with all its defaults instead.

Guides (``--guides``, comma separated; any name may carry keyword arguments
as JSON after a colon, e.g. ``zuko_nsf:{"transforms": 4}``):

* ``autonormal``, ``automvn``: Pyro's ``AutoNormal``, ``AutoMultivariateNormal``.
* ``autoiaf``: ``AutoIAFNormal`` with 3 transforms and one hidden layer of
  ``H = max(64, 4 D)``.
* ``zuko_<family>`` (``zuko_maf``, ``zuko_nsf``, ``zuko_splinemaf`` for
  AutoFlowGuide's default family, ...): the hand-written guide of
  Pyro's "SVI with a normalizing flow guide" tutorial, :class:`ZukoFlowGuide`:
  a Zuko flow of that family over the flat unconstrained latent, inverted so
  that sampling is one pass, 3 transforms, hidden ``(H, H)``. Keyword
  arguments: ``transforms``, ``hidden`` (int or list) and any other Zuko option.
* ``exact``: no training; ``draws`` exact posterior draws scored like a
  guide's (the noise floor of w1 and of the std ratio at that many draws).
  Exact targets only; skipped with a note on the NUTS targets.
* ``autoflow`` and the named variants in :data:`AUTOFLOW_VARIANTS`:
  ``pyro_flowguide.AutoFlowGuide(model, **kwargs)``. ``autoflow:{...}`` passes
  the JSON keyword arguments. Skipped with a note while the class does not exist.

Usage::

    python benchmarks/posteriors.py                          # every target, the anchors + autoflow, seeds 0,1,2
    python benchmarks/posteriors.py --targets banana --guides zuko_maf,autoflow --seeds 0 --verbose
    python benchmarks/posteriors.py --trainer fit --guides autoflow

From Python::

    from benchmarks.posteriors import run_one
    row = run_one("banana", "zuko_maf", seed=0, steps=3000, trainer="svi")
    row["w1"], row["khat"], row["ms_per_step"]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import zuko
from pyro import poutine
from pyro.contrib.zuko import ZukoToPyro
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.importance import vectorized_importance_weights
from pyro.optim import ClippedAdam
from pyro.poutine.util import site_is_subsample

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.targets import Target, get_target, metrics, target_names  # noqa: E402

__all__ = [
    "ANCHORS",
    "AUTOFLOW_VARIANTS",
    "GuideUnavailable",
    "ZukoFlowGuide",
    "format_grid",
    "format_table",
    "make_guide",
    "protocol_a_optimizer",
    "run_one",
    "run_grid",
    "summarise",
]

#: The anchor guides every run is compared against.
ANCHORS = ("autonormal", "automvn", "autoiaf", "zuko_maf")

#: Named ``AutoFlowGuide`` variants: name -> keyword arguments. Add rows to tune.
AUTOFLOW_VARIANTS: dict[str, dict[str, Any]] = {
    "autoflow": {},
    "autoflow_maf": {"flow": "MAF"},
    "autoflow_nsf": {"flow": "NSF"},
}

_LR, _LR_END, _CLIP = 1e-2, 1e-3, 10.0
_PARTICLES = 4


class GuideUnavailable(RuntimeError):
    """A guide whose code does not exist (yet) in this checkout."""


def _hidden_width(dim: int) -> int:
    return max(64, 4 * dim)


# ------------------------------------------------------------ hand-written Zuko guide


class ZukoFlowGuide:
    r"""A Zuko flow guide written by hand, as in Pyro's flow-guide tutorial.

    Traces the model once, maps each latent site to unconstrained space with
    ``biject_to(support)``, flattens the sites into one vector of size ``D`` and
    gives it a Zuko flow. The flow is inverted (``Flow(flow.transform.inv,
    flow.base)``) so that drawing is one network pass for autoregressive
    families, and ``ZukoToPyro`` reuses the log density of that same pass. Each
    site is then emitted as ``Delta(value, log_density=log|d u / d x|)`` inside
    the model's vectorised plates, so the guide composes with an outer particle
    plate. Parameters are registered with ``pyro.module``.

    Arguments:
        model: A Pyro model without subsampled plates.
        family: A Zuko flow class name (``"MAF"``, ``"NSF"``, ...), any case, or
            ``"SplineMAF"`` (``pyro_flowguide.flows.SplineMAF``: Zuko's NSF and
            MAF transforms composed, AutoFlowGuide's default family).
        transforms: Number of flow transforms.
        hidden: Hidden width ``H`` (hidden features ``(H, H)``) or a list of
            widths; default ``max(64, 4 D)``.
        **zuko_kwargs: Passed to the Zuko flow class.

    Example:
        >>> from benchmarks.targets import banana
        >>> guide = ZukoFlowGuide(banana, "MAF")
        >>> sorted(guide()) == ["z1", "z2"]
        True
    """

    def __init__(
        self,
        model: Callable,
        family: str = "MAF",
        transforms: int = 3,
        hidden: int | list[int] | None = None,
        name: str = "zuko_flow",
        **zuko_kwargs: Any,
    ) -> None:
        self.model = model
        self.name = name
        classes = {n.lower(): getattr(zuko.flows, n) for n in dir(zuko.flows) if n[:1].isupper()}
        try:  # AutoFlowGuide's default: Zuko's NSF and MAF transforms composed
            from pyro_flowguide.flows import SplineMAF

            classes["splinemaf"] = SplineMAF
        except ImportError:
            pass
        if family.lower() not in classes:
            raise ValueError(
                f"unknown Zuko flow family {family!r}; choose from "
                f"{', '.join(sorted(n for n in dir(zuko.flows) if n[:1].isupper()))}"
            )
        trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace()
        self.sites = []
        for _, site in trace.iter_stochastic_nodes():
            if site_is_subsample(site):  # a plate's own record, not a latent
                continue
            fn = site["fn"]
            transform = biject_to(fn.support)
            shape = transform.inv.forward_shape(site["value"].shape)
            # event dims of the unconstrained value (e.g. a simplex gains none, loses one)
            u_event_dim = fn.event_dim + len(shape) - site["value"].dim()
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            self.sites.append((site["name"], transform, shape, fn.event_dim, u_event_dim, frames))
        self.dim = sum(math.prod(s[2]) for s in self.sites)
        width = _hidden_width(self.dim) if hidden is None else hidden
        hidden_features = tuple(width) if isinstance(width, (list, tuple)) else (width, width)
        flow = classes[family.lower()](
            self.dim, transforms=transforms, hidden_features=hidden_features, **zuko_kwargs
        )
        # Zuko's transform maps data -> base in one pass; its inverse is the draw
        # direction we want to be one pass, so swap them.
        self.flow = zuko.flows.Flow(flow.transform.inv, flow.base)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        pyro.module(self.name, self.flow)
        latent = pyro.sample(
            f"_{self.name}_latent", ZukoToPyro(self.flow()), infer={"is_auxiliary": True}
        )
        batch_shape = latent.shape[:-1]
        values, pos = {}, 0
        for name, transform, shape, event_dim, u_event_dim, frames in self.sites:
            size = math.prod(shape)
            # the site's plate dims sit where the latent's batch has singletons
            full = torch.broadcast_shapes(shape, batch_shape + (1,) * u_event_dim)
            u = latent[..., pos : pos + size].reshape(full)
            pos += size
            x = transform(u)
            log_density = transform.inv.log_abs_det_jacobian(x, u)
            log_density = sum_rightmost(log_density, log_density.dim() - x.dim() + event_dim)
            with ExitStack() as stack:
                for f in frames:  # re-enter the model's vectorised plates
                    stack.enter_context(pyro.plate(f.name, f.size, dim=f.dim))
                values[name] = pyro.sample(
                    name, dist.Delta(x, log_density=log_density, event_dim=event_dim)
                )
        return values

    def parameters(self):
        return self.flow.parameters()


# ------------------------------------------------------------------------- registry


def _parse_guide(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, extra = spec.partition(":")
    kwargs = json.loads(extra) if extra else {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"guide {spec!r}: the part after ':' must be a JSON object")
    return name.strip(), kwargs


def make_guide(spec: str, target: Target) -> Any:
    r"""Builds the guide named ``spec`` for ``target`` (see the module docstring).

    Raises:
        GuideUnavailable: for ``autoflow*`` while ``pyro_flowguide.AutoFlowGuide``
            does not exist.
        ValueError: for an unknown name.
    """
    name, kwargs = _parse_guide(spec)
    model, dim = target.model, target.dim
    if name == "autonormal":
        return AutoNormal(model, **kwargs)
    if name == "automvn":
        return AutoMultivariateNormal(model, **kwargs)
    if name == "autoiaf":
        kwargs = {"hidden_dim": [_hidden_width(dim)], "num_transforms": 3, **kwargs}
        return AutoIAFNormal(model, **kwargs)
    if name.startswith("zuko_"):
        return ZukoFlowGuide(model, name[len("zuko_") :], **kwargs)
    if name in AUTOFLOW_VARIANTS or name.startswith("autoflow"):
        if name not in AUTOFLOW_VARIANTS:
            raise ValueError(
                f"unknown AutoFlowGuide variant {name!r}; add it to AUTOFLOW_VARIANTS or "
                f"pass 'autoflow:{{json kwargs}}'. Known: {', '.join(AUTOFLOW_VARIANTS)}"
            )
        try:
            from pyro_flowguide import AutoFlowGuide
        except ImportError as e:
            raise GuideUnavailable("pyro_flowguide.AutoFlowGuide does not exist yet") from e
        return AutoFlowGuide(model, **{**AUTOFLOW_VARIANTS[name], **kwargs})
    raise ValueError(
        f"unknown guide {name!r}; choose from autonormal, automvn, autoiaf, zuko_<family>, "
        f"{', '.join(AUTOFLOW_VARIANTS)} (or autoflow:{{json}})"
    )


# -------------------------------------------------------------------------- training


def protocol_a_optimizer(steps: int) -> ClippedAdam:
    """``ClippedAdam(lr=1e-2, clip_norm=10)`` whose lr decays geometrically to 1e-3 over ``steps``."""
    return ClippedAdam({"lr": _LR, "clip_norm": _CLIP, "lrd": (_LR_END / _LR) ** (1.0 / steps)})


def _clear_caches(guide: Any) -> Callable[[], None]:
    """The per-step cache clearing of the package's flows, or a no-op.

    As ``fit``'s ``ClearFlowCaches`` does, the flow transforms are collected
    once (on the first call, after the first step has built the guide), so
    the step time does not include a walk over the module tree.
    """
    if not isinstance(guide, torch.nn.Module):
        return lambda: None
    try:
        from pyro_flowguide.transforms import flow_cache_clearers
    except ImportError:
        return lambda: None
    clears: list[Callable[[], None]] = []

    def clear() -> None:
        if not clears:
            clears.extend(flow_cache_clearers(guide))
            clears.append(lambda: None)  # collected, even if the guide holds no flow
        for c in clears:
            c()

    return clear


def protocol_a_svi(target: Target, guide: Any, steps: int, num_particles: int = _PARTICLES) -> SVI:
    """Pyro's ``SVI`` with protocol A's optimiser and vectorised ``Trace_ELBO``."""
    elbo = Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=True,
        max_plate_nesting=target.max_plate_nesting,
    )
    return SVI(target.model, guide, protocol_a_optimizer(steps), elbo)


def _train_svi(
    target: Target, guide: Any, steps: int, num_particles: int = _PARTICLES
) -> tuple[list[float], list[float]]:
    svi = protocol_a_svi(target, guide, steps, num_particles)
    clear = _clear_caches(guide)
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(svi.step())
        clear()
        times.append(time.perf_counter() - t0)
    return losses, times


def _train_fit(target: Target, guide: Any, steps: int) -> tuple[list[float], list[float]]:
    try:
        from pyro_flowguide import fit
    except ImportError as e:
        raise GuideUnavailable("pyro_flowguide.fit does not exist yet") from e
    t0 = time.perf_counter()
    # every training default of fit(); only its progress bar is turned off
    result = fit(target.model, guide, steps=steps, progress=False)
    wall = time.perf_counter() - t0
    losses = [float(x) for x in np.asarray(getattr(result, "losses", []), dtype=float)]
    done = max(len(losses), 1)
    # fit() reports no per-step times: use the mean, which includes its overheads
    return losses, [wall / done] * done


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def _guide_draws(target: Target, guide: Any, num: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` vectorised draws (flat, constrained) and their log importance weights."""
    log_weights, _, guide_trace = vectorized_importance_weights(
        target.model,
        guide,
        num_samples=num,
        max_plate_nesting=target.max_plate_nesting,
    )
    values = {name: guide_trace.nodes[name]["value"] for name, _ in target.sites}
    return target.flatten(values, num), log_weights.detach().cpu().numpy()


def _param_count() -> int:
    return sum(p.numel() for p in pyro.get_param_store().values())


def run_one(
    target: str,
    guide_name: str,
    seed: int = 0,
    steps: int = 3000,
    trainer: str = "svi",
    draws: int = 2000,
    particles: int = _PARTICLES,
) -> dict[str, Any]:
    r"""Fits one guide to one target under protocol A and scores it.

    Arguments:
        target: A target name (``benchmarks.targets.target_names()``).
        guide_name: A guide spec (see the module docstring), e.g. ``"zuko_maf"``
            or ``'autoflow:{"flow": "NSF"}'``.
        seed: Seed of the guide's initialisation and training; the scoring draws
            use ``10_000 + seed``.
        steps: SVI steps.
        trainer: ``"svi"`` (protocol A) or ``"fit"`` (``pyro_flowguide.fit`` defaults).
        draws: Number of guide draws scored.
        particles: Vectorised particles of the ``"svi"`` trainer (protocol A:
            4; other counts measure what more particles would buy).

    Returns:
        A dict: ``target``, ``guide``, ``seed``, ``steps``, ``trainer``, the
        :func:`~benchmarks.targets.metrics` entries (``w1``, ``w1_per_coord``,
        ``std_ratio``, ``std_ratio_min``, ``khat``, ``is_ess_frac``),
        ``ms_per_step`` (median), ``params``, ``final_loss`` (mean of the last
        100 losses) and ``wall_s``.

    Example:
        >>> row = run_one("banana", "autonormal", steps=200)
        >>> sorted(row)[:3]
        ['final_loss', 'guide', 'is_ess_frac']
    """
    torch.set_num_threads(1)
    spec = get_target(target)
    start = time.perf_counter()
    if guide_name == "exact":
        scores, losses, times, params = _score_exact(spec, seed, draws), [], [], 0
    else:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = make_guide(guide_name, spec)
        if trainer == "svi":
            losses, times = _train_svi(spec, guide, steps, particles)
        elif trainer == "fit":
            losses, times = _train_fit(spec, guide, steps)
        else:
            raise ValueError(f"trainer must be 'svi' or 'fit', got {trainer!r}")
        pyro.set_rng_seed(10_000 + seed)
        flat, log_weights = _guide_draws(spec, guide, draws)
        scores = metrics(flat, spec.reference_draws(), log_weights)
        params = _param_count()
    return {
        "target": target,
        "guide": guide_name,
        "seed": seed,
        "steps": steps,
        "trainer": trainer,
        "particles": particles if trainer == "svi" else None,
        **scores,
        "ms_per_step": 1e3 * statistics.median(times) if times else float("nan"),
        "params": params,
        "final_loss": float(np.mean(losses[-100:])) if losses else float("nan"),
        "wall_s": time.perf_counter() - start,
    }


def _score_exact(spec: Target, seed: int, draws: int) -> dict[str, Any]:
    """The noise floor: the metrics of ``draws`` exact posterior draws, scored like a guide's."""
    if spec.exact is None:
        raise GuideUnavailable(f"target {spec.name!r} has no exact sampler (its reference is NUTS)")
    return metrics(spec.exact_draws(draws, seed=10_000 + seed), spec.reference_draws())


def run_grid(
    targets: list[str],
    guides: list[str],
    seeds: list[int],
    steps: int = 3000,
    trainer: str = "svi",
    draws: int = 2000,
    log: Callable[[str], None] = print,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    particles: int = _PARTICLES,
) -> list[dict[str, Any]]:
    """:func:`run_one` over every target x guide x seed; unavailable guides are noted and skipped.

    ``on_row(rows)`` is called after each finished run (e.g. to save partial results).
    """
    rows, skipped = [], set()
    for target in targets:
        for guide in guides:
            # a missing class skips the guide everywhere; a missing exact sampler one target
            key = (guide, target) if guide == "exact" else guide
            for seed in seeds:
                if key in skipped:
                    continue
                try:
                    row = run_one(target, guide, seed, steps, trainer, draws, particles)
                except GuideUnavailable as e:
                    log(f"note: skipping {guide}: {e}")
                    skipped.add(key)
                    continue
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                log(
                    f"  {target:24s} {guide:16s} seed {seed}: w1 {row['w1']:.3f}  "
                    f"std_min {row['std_ratio_min']:.2f}  khat {row['khat']:.2f}  "
                    f"{row['ms_per_step']:.2f} ms/step  ({row['wall_s']:.0f} s)"
                )
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over seeds per (target, guide); ``ms_per_step`` is the median over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["guide"]), []).append(r)
    out = []
    for (target, guide), rs in groups.items():
        out.append(
            {
                "target": target,
                "guide": guide,
                "seeds": len(rs),
                **{
                    k: float(np.mean([r[k] for r in rs]))
                    for k in ("w1", "std_ratio_min", "khat", "is_ess_frac")
                },
                "ms_per_step": float(np.median([r["ms_per_step"] for r in rs])),
                "params": rs[0]["params"],
            }
        )
    return out


def format_table(rows: list[dict[str, Any]], per_seed: bool = False) -> str:
    """A Markdown table of :func:`summarise` rows (or per-seed rows with ``per_seed``)."""
    key = "seed" if per_seed else "seeds"
    head = f"| target | guide | {key} | w1 | std ratio min | k-hat | IS-ESS frac | ms/step | params |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['guide']} | {r[key]} | {r['w1']:.3f} | "
            f"{r['std_ratio_min']:.2f} | {r['khat']:.2f} | {r['is_ess_frac']:.3f} | "
            f"{r['ms_per_step']:.2f} | {r['params']} |"
        )
    return "\n".join(lines)


def format_grid(rows: list[dict[str, Any]]) -> str:
    """A guide x target Markdown grid of ``w1 / k-hat`` (the layout of BASELINES.md)."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    guides = list(dict.fromkeys(r["guide"] for r in rows))
    cell = {(r["guide"], r["target"]): f"{r['w1']:.3f} / {r['khat']:.2f}" for r in rows}
    lines = [
        "| guide | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for g in guides:
        lines.append(f"| {g} | " + " | ".join(cell.get((g, t), "") for t in targets) + " |")
    return "\n".join(lines)


def _split_specs(text: str) -> list[str]:
    """Splits on commas outside JSON braces."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "{["
        depth -= ch in "}]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Protocol A benchmark of posterior guides.")
    parser.add_argument("--targets", default=",".join(target_names()))
    parser.add_argument("--guides", default=",".join(("exact", *ANCHORS, "autoflow")))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--trainer", choices=("svi", "fit"), default="svi")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument(
        "--particles", type=int, default=_PARTICLES,
        help=f"vectorised particles of the svi trainer (protocol A: {_PARTICLES})",
    )
    parser.add_argument("--verbose", action="store_true", help="also print per-seed rows")
    parser.add_argument(
        "--grid", action="store_true", help="print a guide x target grid of w1 / k-hat instead"
    )
    parser.add_argument("--json", type=Path, help="write every per-seed row to this JSON file (updated after each run)")
    args = parser.parse_args(argv)

    def save(rows: list[dict[str, Any]]) -> None:
        if args.json is None:
            return
        args.json.parent.mkdir(parents=True, exist_ok=True)
        serial = [
            {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in rows
        ]
        args.json.write_text(json.dumps(serial, indent=1))

    targets = _split_specs(args.targets)
    for t in targets:
        get_target(t)  # fail early on a typo
    rows = run_grid(
        targets,
        _split_specs(args.guides),
        [int(s) for s in args.seeds.split(",")],
        args.steps,
        args.trainer,
        args.draws,
        log=print if args.verbose else (lambda s: print(s) if s.startswith("note") else None),
        on_row=save,
        particles=args.particles,
    )
    recipe = (
        f"SVI, {args.particles} vectorised particles, lr {_LR} -> {_LR_END}"
        if args.trainer == "svi"
        else "pyro_flowguide.fit defaults; ms/step = mean incl. setup"
    )
    print(
        f"\n{args.steps} steps ({recipe}), {args.draws} draws; means over seeds {args.seeds}\n"
    )
    print(format_grid(summarise(rows)) if args.grid else format_table(summarise(rows)))
    if args.verbose:
        print("\nper seed\n")
        print(format_table(rows, per_seed=True))


if __name__ == "__main__":
    main()
