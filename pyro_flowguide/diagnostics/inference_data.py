r"""ArviZ export of a fitted guide: ``az.summary``, ``az.plot_pair``, ``az.loo`` on VI draws.

:func:`to_inference_data` draws from the guide once (vectorised), scores the
draws under model and guide, and returns an ``az.InferenceData`` with

* ``posterior``: every latent site (and ``pyro.deterministic`` site), one
  chain, dimensions named after the model's plates, with integer coordinates;
* ``log_likelihood``: the point-wise log-density of each observed site, so
  ``az.loo`` and ``az.waic`` work;
* ``posterior_predictive``: replicated data for each observed site (Pyro's
  ``Predictive`` with the observations removed), for ``az.plot_ppc``;
* ``observed_data``;
* ``sample_stats``: ``lp`` (:math:`\log p(x, z)`), ``log_q``
  (:math:`\log q(z)`), ``log_weight`` (their difference) and
  ``psis_log_weight`` (PSIS-smoothed, normalised);
* ``attrs``: the guide's class, its flow (if any), PSIS k-hat and importance ESS.

The draws are the guide's own; weight them (``psis_log_weight``) or resample
(:meth:`~pyro_flowguide.diagnostics.PSISResult.resample`) when k-hat says the
guide is off.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoGuide
from torch import nn

from ..arviz_compat import from_dict, to_chains
from .psis import Draws, draw_from_guide, psis_from_draws
from ..transforms import ConditionalFlowTransform, FlowTransform

__all__ = ["to_inference_data"]


def _site_dims(name: str, site: dict, shape: tuple, n_batch: int) -> tuple[list[str], dict]:
    """Dimension names and coordinates for an array of ``shape`` at a site.

    The first ``n_batch`` dimensions are batch dimensions, right-aligned with
    the site's plates; those a plate declares take its name and integer
    coordinates, the others are named ``<site>_dim_<i>``.
    """
    plates = {f.dim: f for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}
    dims, coords = [], {}
    for i, size in enumerate(shape):
        frame = plates.get(i - n_batch) if i < n_batch else None
        if frame is not None and frame.size == size:
            dims.append(frame.name)
            coords[frame.name] = np.arange(size)
        else:
            dims.append(f"{name}_dim_{i}")
    return dims, coords


def _flow_name(guide: Any) -> str | None:
    if not isinstance(guide, nn.Module):
        return None
    names = []
    for m in guide.modules():
        if isinstance(m, (FlowTransform, ConditionalFlowTransform)):
            names.append(m.spec.name if m.spec is not None else type(m.lazy).__name__)
    return "+".join(dict.fromkeys(names)) or None


def _posterior_predictive(model, samples, observed, args, kwargs, num_samples) -> dict[str, torch.Tensor]:
    if not observed:
        return {}
    predictive_model = poutine.uncondition(model)
    with torch.no_grad():
        try:
            out = Predictive(
                predictive_model, posterior_samples=samples, return_sites=list(observed), parallel=True
            )(*args, **kwargs)
        except Exception:  # noqa: BLE001 - models that break under a plate: one draw at a time
            out = Predictive(
                predictive_model, posterior_samples=samples, return_sites=list(observed), parallel=False
            )(*args, **kwargs)
    return {
        name: out[name].reshape((num_samples,) + tuple(observed[name]["value"].shape)) for name in observed
    }


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    **kwargs: Any,
):
    r"""Draws from a fitted guide and packs draws, log-densities and data as ``az.InferenceData``.

    Arguments:
        model: The Pyro model.
        guide: The fitted guide (any Pyro guide). The previous order
            ``(guide, model, ...)`` still works for one release, with a
            ``DeprecationWarning``.
        args, kwargs: The model's arguments (the same as for fitting).
        num_samples: Guide draws, split into up to four chains of independent draws
            (so that ``az.summary`` reports R-hat and ESS without warnings).

    Returns:
        An ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x);
        see the module docstring for its groups.

    Example:
        >>> import arviz as az, pyro, torch, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> pyro.clear_param_store()
        >>> y = torch.randn(8)
        >>> guide = AutoNormal(model)
        >>> idata = to_inference_data(model, guide, y, num_samples=100)
        >>> idata.posterior["mu"].dims, idata.log_likelihood["y"].dims
        (('chain', 'draw'), ('chain', 'draw', 'data'))
    """
    if isinstance(model, AutoGuide) and not isinstance(guide, AutoGuide):
        warnings.warn(
            "to_inference_data(guide, model, ...) is deprecated and will be removed in the next "
            "release; pass the model first: to_inference_data(model, guide, ...), as for fit and "
            "psis_diagnostic",
            DeprecationWarning,
            stacklevel=2,
        )
        model, guide = guide, model
    try:
        draws: Draws = draw_from_guide(model, guide, args, kwargs, num_samples)
    except ValueError as error:
        first = " ".join(str(error).strip().splitlines()[:2])[:300] or type(error).__name__
        raise ValueError(
            f"to_inference_data: {first}. Pass the arguments of the model call the guide was fitted "
            "with (the same data, of the same shapes)."
        ) from error
    psis = psis_from_draws(draws)
    proto = draws.proto_model_trace

    def np_(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    posterior, observed_data, posterior_predictive, log_likelihood = {}, {}, {}, {}
    dims: dict[str, list[str]] = {}
    ll_dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {}
    for name, value in draws.samples.items():
        site = proto.nodes[name]
        shape = tuple(value.shape[1:])
        n_batch = len(shape) - len(site["fn"].event_shape)
        dims[name], site_coords = _site_dims(name, site, shape, n_batch)
        coords.update(site_coords)
        posterior[name] = to_chains(np_(value))
    observed = {name: proto.nodes[name] for name in draws.log_likelihood}
    if not observed:
        warnings.warn(
            "to_inference_data: the model, called with these arguments, observes no site, so the "
            "result has no observed_data or log_likelihood group and k-hat scores the prior. Pass "
            "the data as for fit (e.g. to_inference_data(model, guide, x, y)).",
            UserWarning,
            stacklevel=2,
        )
    for name, site in observed.items():
        shape = tuple(site["value"].shape)
        dims[name], site_coords = _site_dims(name, site, shape, len(shape) - len(site["fn"].event_shape))
        coords.update(site_coords)
        observed_data[name] = np_(site["value"])
        value = draws.log_likelihood[name]
        # One point-wise log-density per batch element: only batch dimensions.
        ll_dims[name], site_coords = _site_dims(name, site, tuple(value.shape[1:]), value.dim() - 1)
        coords.update(site_coords)
        log_likelihood[name] = to_chains(np_(value))
    for name, value in _posterior_predictive(model, draws.samples, observed, args, kwargs, num_samples).items():
        posterior_predictive[name] = to_chains(np_(value))

    sample_stats = {
        "lp": to_chains(np_(draws.log_joint)),
        "log_q": to_chains(np_(draws.log_q)),
        "log_weight": to_chains(np_(psis.log_weights)),
        "psis_log_weight": to_chains(np_(psis.smoothed_log_weights)),
    }
    attrs = {
        "inference_library": "pyro",
        "inference_method": "variational",
        "guide": type(guide).__name__,
        "psis_khat": psis.khat,
        "importance_ess": psis.ess,
        "log_evidence": psis.log_evidence,
        "log_evidence_se": psis.log_evidence_se,
    }
    flow = _flow_name(guide)
    if flow is not None:
        attrs["flow"] = flow

    return from_dict(
        {
            "posterior": posterior,
            "sample_stats": sample_stats,
            "log_likelihood": log_likelihood,
            "posterior_predictive": posterior_predictive,
            "observed_data": observed_data,
        },
        coords=coords,
        dims=dims,
        group_dims={"log_likelihood": ll_dims},
        attrs=attrs,
    )
