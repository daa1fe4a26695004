"""The one place for what differs between ArviZ 0.x and ArviZ 1.x.

ArviZ 1.x (Python 3.12 and later) is a meta-package over ``arviz-base``,
``arviz-stats`` and ``arviz-plots``: containers are ``xarray.DataTree`` instead
of ``az.InferenceData``, ``az.from_dict`` takes one ``{group: {var: array}}``
mapping, and ``az.psislw`` moved to ``arviz_stats.base.array_stats.psislw``
(which smooths the right tail of *minus* its input). The functions here give
the package one call for each, whichever ArviZ is installed.

Example:
    >>> import numpy as np
    >>> smoothed, khat = psislw(np.random.default_rng(0).normal(size=1000))
    >>> bool(np.isclose(np.logaddexp.reduce(smoothed), 0.0)), khat < 0.5
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np

__all__ = ["arviz_major", "from_dict", "group_names", "loo_pointwise", "psislw", "to_chains"]


def arviz_major() -> int:
    """The major version of the installed ArviZ (0 or 1)."""
    return int(metadata.version("arviz").split(".", 1)[0])


def psislw(log_weights: Any) -> tuple[np.ndarray, float | np.ndarray]:
    """Pareto-smoothed, normalised log weights and k-hat from the installed ArviZ.

    Arguments:
        log_weights: Log importance ratios, draws on the last axis (one fit
            per leading index).

    Returns:
        ``(smoothed, khat)``: ``smoothed`` has the input's shape; ``khat`` is a
        float for one set of weights, else an array of the leading shape. Too
        few draws in the tail to fit (ArviZ 1.x refuses fewer than 25 draws)
        give k-hat ``inf`` and the raw normalised weights, and so does a tail
        whose fit fails.
    """
    lw = np.array(log_weights, dtype=np.float64)
    if arviz_major() == 0:
        import arviz as az

        smoothed, khat = az.psislw(lw)
    else:
        from arviz_stats.base import array_stats

        try:
            smoothed, khat = array_stats.psislw(-lw, r_eff=1.0, axis=-1)
        except ValueError:  # fewer than five draws in the tail
            smoothed = lw - np.logaddexp.reduce(lw, axis=-1, keepdims=True)
            khat = np.full(lw.shape[:-1], math.inf)
        # ArviZ 1.x returns NaN where the tail's fit fails (a tail too heavy to
        # fit, such as Cauchy log weights), where 0.x reports a k-hat above 1.
        khat = np.where(np.isnan(khat), math.inf, khat)
    smoothed, khat = np.asarray(smoothed), np.asarray(khat)
    return smoothed, float(khat) if khat.ndim == 0 else khat


def to_chains(x: Any, max_chains: int = 4) -> np.ndarray:
    """Independent draws ``(S, ...)`` as ``(C, S // C, ...)`` chains.

    ``C`` is the largest of ``max_chains, ..., 1`` that divides ``S`` and leaves
    at least 4 draws a chain, so that ArviZ's R-hat and ESS see several chains
    (any split of independent draws is a valid set of chains).
    """
    x = np.asarray(x)
    s = x.shape[0]
    chains = next((c for c in range(max_chains, 0, -1) if s % c == 0 and s // c >= 4), 1)
    return x.reshape(chains, s // chains, *x.shape[1:])


def from_dict(
    groups: Mapping[str, Mapping[str, Any]],
    *,
    coords: Mapping[str, Any],
    dims: Mapping[str, Sequence[str]],
    group_dims: Mapping[str, Mapping[str, Sequence[str]]] = {},
    attrs: Mapping[str, Any] = {},
):
    """Arrays by group and variable as the installed ArviZ's container.

    Arguments:
        groups: ``{"posterior": {"a": array(chain, draw, ...)}, "observed_data":
            {...}, ...}``; groups whose name contains ``data`` have no chain and
            draw dimensions. Empty groups are left out.
        coords: ``{dim: values}`` for every group.
        dims: ``{var: [dim, ...]}`` (without ``chain`` and ``draw``).
        group_dims: ``{group: {var: [dim, ...]}}`` in place of ``dims`` for the
            groups it names.
        attrs: The container's attributes.

    Returns:
        ``arviz.InferenceData`` on ArviZ 0.x, ``xarray.DataTree`` on 1.x.
    """
    import arviz as az

    def dims_of(group: str, data: Mapping[str, Any]) -> dict[str, list[str]]:
        return {k: list(v) for k, v in group_dims.get(group, dims).items() if k in data}

    def coords_of(table: Mapping[str, list[str]]) -> dict[str, Any]:
        used = {d for ds in table.values() for d in ds}
        return {k: v for k, v in coords.items() if k in used}

    groups = {name: data for name, data in groups.items() if data}
    if arviz_major() == 0:
        idata = az.InferenceData()
        for name, data in groups.items():
            table = dims_of(name, data)
            idata.extend(az.from_dict(**{name: dict(data)}, coords=coords_of(table), dims=table))
        idata.attrs.update(attrs)
        return idata

    import xarray as xr
    from arviz_base import dict_to_dataset

    datasets = {}
    for name, data in groups.items():
        table = dims_of(name, data)
        datasets[name] = dict_to_dataset(
            dict(data),
            coords=coords_of(table),
            dims=table,
            sample_dims=[] if "data" in name else None,
            skip_event_dims="log_likelihood" in name,
        )
    tree = xr.DataTree.from_dict(datasets)
    tree.attrs = dict(attrs)
    return tree


def group_names(container: Any) -> set[str]:
    """The group names of an ``InferenceData`` (ArviZ 0.x) or a ``DataTree`` (1.x)."""
    groups = container.groups
    if callable(groups):
        return set(groups())
    return {str(name) for name in container.children}


def loo_pointwise(loo: Any) -> tuple[float, np.ndarray]:
    """``(elpd, pointwise elpd)`` from ``az.loo(..., pointwise=True)`` on either ArviZ."""
    if hasattr(loo, "elpd_loo"):
        return float(loo.elpd_loo), np.asarray(loo.loo_i)
    return float(loo.elpd), np.asarray(loo.elpd_i)
