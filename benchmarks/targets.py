r"""The five benchmark targets and the metrics every guide is scored with.

Each target is a Pyro model without arguments whose posterior is the
distribution to approximate, plus a way to get reference draws of that
posterior as one flat array in the *constrained* space, in a documented order:
the model's latent sample sites in trace order, each flattened row-major.

================================  ====  =========================================  ==========
target                            dim   flat order (constrained)                   reference
================================  ====  =========================================  ==========
``banana``                        2     ``z1``, ``z2``                             exact
``funnel10``                      10    ``v``, ``x[0..8]``                         exact
``mog2d``                         2     ``z[0]``, ``z[1]``                         exact
``eight_schools_centered``        10    ``mu``, ``tau``, ``theta[0..7]``           NUTS
``logreg``                        25    ``w[0..24]``                               NUTS
================================  ====  =========================================  ==========

NUTS references are built once by ``benchmarks/references.py`` and cached
under ``benchmarks/.cache/``.

Example:
    >>> from benchmarks.targets import get_target, metrics
    >>> t = get_target("banana")
    >>> ref = t.reference_draws()
    >>> m = metrics(t.exact_draws(2000, seed=1), ref)
    >>> m["w1"] < 0.06
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from pyro_flowguide.diagnostics import pareto_smooth
from pyro_flowguide.examples import (
    EIGHT_SCHOOLS_SIGMA,
    EIGHT_SCHOOLS_Y,
    MOG2D_LOCS,
    banana,
    banana_draws,
    eight_schools_centered,
    eight_schools_noncentered,
    funnel10,
    logreg,
    logreg_data,
    mog2d,
)

__all__ = [
    "EIGHT_SCHOOLS_SIGMA",
    "EIGHT_SCHOOLS_Y",
    "TARGETS",
    "Target",
    "banana",
    "eight_schools_centered",
    "eight_schools_noncentered",
    "flatten_samples",
    "funnel10",
    "get_target",
    "logreg",
    "logreg_data",
    "metrics",
    "mog2d",
    "target_names",
]

#: Number of exact draws that stand for the exact targets' posterior.
_EXACT_REFERENCE_DRAWS = 100_000
#: Seed of those draws; guide-side seeds never use it.
_EXACT_REFERENCE_SEED = 20_240_917


# ------------------------------------------------------------------- exact samplers


def _funnel10_exact(num: int, rng: np.random.Generator) -> np.ndarray:
    v = 3.0 * rng.standard_normal(num)
    x = np.exp(v / 2)[:, None] * rng.standard_normal((num, 9))
    return np.concatenate([v[:, None], x], axis=-1)


def _mog2d_exact(num: int, rng: np.random.Generator) -> np.ndarray:
    component = rng.integers(0, 2, size=num)
    return MOG2D_LOCS.numpy()[component] + rng.standard_normal((num, 2))


# ------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Target:
    r"""One benchmark target.

    Arguments:
        name: Registry name.
        model: The Pyro model (no arguments).
        sites: ``(site name, constrained shape)`` of each latent site, in the
            flat order of every draw array.
        max_plate_nesting: The model's plate depth (for vectorised particles).
        exact: Sampler ``(num, numpy Generator) -> (num, dim)`` array of exact
            posterior draws, or ``None`` where the reference is NUTS.
    """

    name: str
    model: Callable[[], None]
    sites: tuple[tuple[str, tuple[int, ...]], ...]
    max_plate_nesting: int
    exact: Callable[[int, np.random.Generator], np.ndarray] | None = None

    @property
    def dim(self) -> int:
        """Total number of latent coordinates."""
        return sum(math.prod(shape) for _, shape in self.sites)

    @property
    def coordinate_names(self) -> list[str]:
        """Names of the flat coordinates, e.g. ``["mu", "tau", "theta[0]", ...]``."""
        names = []
        for site, shape in self.sites:
            if shape == ():
                names.append(site)
            else:
                names += [f"{site}{list(i)}" for i in np.ndindex(*shape)]
        return [n.replace(", ", ",") for n in names]

    def exact_draws(self, num: int, seed: int) -> np.ndarray:
        """``num`` exact posterior draws, shape ``(num, dim)``; exact targets only."""
        if self.exact is None:
            raise ValueError(
                f"target {self.name!r} has no exact sampler; its reference is NUTS "
                "(use reference_draws())"
            )
        return self.exact(num, np.random.default_rng(seed))

    def reference_draws(self) -> np.ndarray:
        """Reference posterior draws, shape ``(num, dim)``, in the flat order.

        Exact targets: 100,000 exact draws with a fixed seed. NUTS targets: all
        chains of the cached long NUTS run pooled (built on first use by
        ``benchmarks/references.py``, which takes minutes).
        """
        if self.exact is not None:
            return self.exact_draws(_EXACT_REFERENCE_DRAWS, _EXACT_REFERENCE_SEED)
        from benchmarks.references import load_reference  # cache lives one level up

        draws = load_reference(self.name)["draws"]
        return draws.reshape(-1, draws.shape[-1])

    def flatten(self, samples: Mapping[str, Any], num: int) -> np.ndarray:
        """See :func:`flatten_samples`."""
        return flatten_samples(self, samples, num)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("banana", banana, (("z1", ()), ("z2", ())), 0, banana_draws),
        Target("funnel10", funnel10, (("v", ()), ("x", (9,))), 0, _funnel10_exact),
        Target("mog2d", mog2d, (("z", (2,)),), 0, _mog2d_exact),
        Target(
            "eight_schools_centered",
            eight_schools_centered,
            (("mu", ()), ("tau", ()), ("theta", (8,))),
            1,
        ),
        Target("logreg", logreg, (("w", (25,)),), 1),
    ]
}


def target_names() -> list[str]:
    """The registered target names, in table order."""
    return list(TARGETS)


def get_target(name: str) -> Target:
    """The :class:`Target` called ``name``; lists the names when it is unknown."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(
            f"unknown target {name!r}; choose from {', '.join(TARGETS)}"
        ) from None


def flatten_samples(target: Target, samples: Mapping[str, Any], num: int) -> np.ndarray:
    r"""Flattens a dict of batched site values into ``(num, dim)`` in the target's order.

    Each value must have ``num`` elements in its leading dim and, after it, the
    site's own elements; singleton dims (from an outer particle plate placed left
    of the model's plates) are fine. This accepts ``Predictive`` output,
    ``sample_posterior`` dicts and vectorised guide traces alike.

    Arguments:
        target: The target whose site order to use.
        samples: Site name to array/tensor of shape ``(num, *site_shape)`` up to
            singleton dims.
        num: The number of draws.
    """
    columns = []
    for site, shape in target.sites:
        if site not in samples:
            raise KeyError(f"samples of target {target.name!r} lack site {site!r}")
        value = samples[site]
        value = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        size = math.prod(shape)
        if value.size != num * size or value.shape[0] != num:
            raise ValueError(
                f"site {site!r} of target {target.name!r}: expected {num} draws of shape "
                f"{shape}, got an array of shape {value.shape}"
            )
        columns.append(value.reshape(num, size))
    return np.concatenate(columns, axis=-1).astype(np.float64)


# -------------------------------------------------------------------------- metrics


def metrics(
    guide_draws: np.ndarray,
    ref_draws: np.ndarray,
    log_weights: np.ndarray | None = None,
) -> dict[str, Any]:
    r"""Scores approximate posterior draws against reference draws.

    Arguments:
        guide_draws: ``(n, dim)`` draws of the approximation (constrained, flat order).
        ref_draws: ``(m, dim)`` reference draws in the same order.
        log_weights: Optional ``(n,)`` importance log weights
            :math:`\log p(x, z) - \log q(z)` of the same draws.

    Returns:
        A dict with

        * ``w1``: mean over coordinates of the 1-D Wasserstein-1 distance
          (``scipy.stats.wasserstein_distance``) divided by the reference std;
        * ``w1_per_coord``: those per-coordinate values;
        * ``std_ratio``: per-coordinate std of the guide over the reference;
          ``std_ratio_min``: its minimum;
        * ``khat``: PSIS Pareto :math:`\hat k` (``pyro_flowguide.diagnostics.pareto_smooth``), and
          ``is_ess_frac``: importance ESS :math:`(\sum w)^2 / \sum w^2` of the raw
          weights divided by ``n``. Both ``nan`` without ``log_weights``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ref = rng.standard_normal((4000, 2))
        >>> round(metrics(ref + 0.5, ref)["w1"], 2)
        0.5
    """
    guide_draws = np.asarray(guide_draws, dtype=np.float64)
    ref_draws = np.asarray(ref_draws, dtype=np.float64)
    if guide_draws.ndim != 2 or ref_draws.ndim != 2 or guide_draws.shape[1] != ref_draws.shape[1]:
        raise ValueError(
            "guide_draws and ref_draws must be (n, dim) and (m, dim) with the same dim; "
            f"got {guide_draws.shape} and {ref_draws.shape}"
        )
    ref_std = ref_draws.std(axis=0)
    w1 = np.array(
        [
            wasserstein_distance(guide_draws[:, j], ref_draws[:, j]) / ref_std[j]
            for j in range(ref_draws.shape[1])
        ]
    )
    std_ratio = guide_draws.std(axis=0) / ref_std
    out: dict[str, Any] = {
        "w1": float(w1.mean()),
        "w1_per_coord": w1,
        "std_ratio": std_ratio,
        "std_ratio_min": float(std_ratio.min()),
        "khat": float("nan"),
        "is_ess_frac": float("nan"),
    }
    if log_weights is not None:
        lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
        finite = np.isfinite(lw)
        if not finite.all():
            # a -inf weight is a draw the model rules out: weight zero; nan/+inf is a bug upstream
            if np.isnan(lw).any() or np.isposinf(lw).any():
                raise ValueError("log_weights contain nan or +inf")
        _, khat = pareto_smooth(lw[finite].copy())
        w = np.exp(lw - lw.max())
        out["khat"] = float(khat)
        out["is_ess_frac"] = float(w.sum() ** 2 / (w**2).sum() / lw.size)
    return out
