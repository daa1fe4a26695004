"""Checks of a model's sites shared by :class:`~pyro_flowguide.AutoFlowGuide` and the amortized guide."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Transform, biject_to

from ..flows.registry import FlowSpec

__all__ = [
    "GuideSetupError",
    "bijection",
    "check_context",
    "check_finite_at_init",
    "check_flow_sites",
    "check_latent_shapes",
    "check_options",
    "flat_layout",
    "shapes_of",
    "with_feasible_fallback",
]


class GuideSetupError(ValueError):
    """A model that this guide cannot serve, with the site and the fix in the message."""


def bijection(site: dict) -> Transform:
    """``biject_to(site support)``, or an error that names the site and the fix."""
    try:
        return biject_to(site["fn"].support)
    except NotImplementedError:
        raise GuideSetupError(
            f"site {site['name']!r} has support {site['fn'].support}, which has no "
            "bijection to unconstrained space; reparametrise it (e.g. a covariance "
            "matrix as scales times an LKJCholesky factor) or guide it separately."
        ) from None


def with_feasible_fallback(init_loc_fn: Callable) -> Callable:
    """Falls back to a feasible point for sites that cannot be sampled (ImproperUniform)."""

    def init(site: dict) -> Tensor:
        try:
            return init_loc_fn(site)
        except NotImplementedError:
            to_support = bijection(site)
            return to_support(torch.zeros(to_support.inverse_shape(site["fn"].shape())))

    return init


def shapes_of(args: tuple, kwargs: dict) -> tuple:
    def shape(v: Any) -> Any:
        if torch.is_tensor(v):
            return tuple(v.shape)
        # Sizes are often passed as plain numbers.
        return v if isinstance(v, (int, float, str, bool)) else None

    return tuple(shape(a) for a in args), tuple(sorted((k, shape(v)) for k, v in kwargs.items()))


def check_flow_sites(prototype_trace, model_name: str, refused_support: FlowSpec | None) -> None:
    """The latent sites :class:`~pyro_flowguide.AutoFlowGuide` serves: continuous, not subsampled, real.

    Arguments:
        prototype_trace: The guide's trace of the model.
        model_name: The model's name, for the messages.
        refused_support: A registry family of non-real support given as the flow, or ``None``.
    """
    for name, site in prototype_trace.iter_stochastic_nodes():
        fn = site["fn"]
        if not fn.support.is_discrete:
            bijection(site)
        if fn.support.is_discrete:
            raise GuideSetupError(
                f"site {name!r} of model {model_name!r} is discrete "
                f"({type(fn).__name__}); AutoFlowGuide covers continuous latents only. "
                "Enumerate it out (@config_enumerate with TraceEnum_ELBO) or use "
                "AutoGuideList with AutoFlowGuide on poutine.block(model, hide=[...]) "
                "and a discrete guide such as AutoDiscreteParallel for this site."
            )
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.full_size != frame.size:
                raise GuideSetupError(
                    f"site {name!r} is inside plate {frame.name!r}, which is "
                    f"subsampled ({frame.size} of {frame.full_size}); a global flow "
                    "cannot follow a changing subset of local latents. Use "
                    f"AutoAmortizedFlowGuide(model, amortized={{{name!r}: ...}}) for "
                    "local latents, or do not subsample."
                )
        if refused_support is not None:
            raise GuideSetupError(
                f"flow {refused_support.name!r} models circular features in "
                f"[-pi, pi), but site {name!r} (support {fn.support}) is mapped to "
                "unbounded unconstrained space by this guide; use 'NSF' instead."
            )


def check_finite_at_init(model: Callable, model_name: str, args: tuple, kwargs: dict) -> None:
    """Raises if any site's log density is non-finite at the initial values (every gradient would be NaN).

    ``model`` is the model as the guide runs it (under its initialisation
    strategy); observed sites count too.
    """
    with torch.no_grad():
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        with torch.no_grad():
            lp = site["fn"].log_prob(site["value"])
        if not torch.isfinite(lp).all():
            kind = "observed" if site["is_observed"] else "latent"
            raise GuideSetupError(
                f"{kind} site {name!r} of model {model_name!r} has a non-finite "
                "log density at the initial values; check its parameters or pass "
                "init_loc_fn=init_to_value(values={...}) / init_to_feasible."
            )


def check_latent_shapes(model: Callable, model_name: str, prototype_trace, args: tuple, kwargs: dict) -> None:
    """Raises unless the model, called with new arguments, has the same latent sites of the same shapes."""
    trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    for name, site in prototype_trace.iter_stochastic_nodes():
        new = trace.nodes.get(name)
        if new is None:
            raise GuideSetupError(
                f"latent site {name!r} of model {model_name!r} disappeared "
                "when the model was called with new arguments; the guide was set up "
                "for a fixed set of latents: build a new guide for this model call."
            )
        if new["value"].shape != site["value"].shape:
            raise GuideSetupError(
                f"latent site {name!r} changed shape between calls: "
                f"{tuple(site['value'].shape)} when the guide was set up, "
                f"{tuple(new['value'].shape)} now. A global guide has one fixed "
                "latent vector; build a new guide, or use AutoAmortizedFlowGuide "
                "for per-datum latents."
            )


def check_context(name: str, context: Any, plate: str, full: int) -> None:
    """Raises unless a context function returned one row per datum of the plate's full size."""
    if not torch.is_tensor(context) or context.dim() == 0:
        raise GuideSetupError(
            f"the context function of site {name!r} must return a tensor with one row per "
            f"datum of plate {plate!r} (leading dimension {full}), got "
            f"{type(context).__name__ if not torch.is_tensor(context) else 'a scalar'}"
        )
    if context.shape[0] != full:
        raise GuideSetupError(
            f"the context function of site {name!r} returned shape {tuple(context.shape)}, "
            f"but plate {plate!r} has {full} data points: its leading dimension must be the "
            "plate's full size (the guide selects the subsample's rows itself); e.g. return "
            "x, not x[idx]."
        )


def check_options(noncentered: Any, init_scale: Any, estimator: Any, covariance: Any) -> bool | str | tuple:
    """Checks :class:`~pyro_flowguide.AutoFlowGuide`'s options; returns ``noncentered`` normalised.

    ``True`` becomes ``"auto"`` and a list of names a tuple.
    """
    if isinstance(noncentered, str) and noncentered != "auto":
        raise ValueError(
            f"noncentered must be 'auto', True, False or a list of site names, got {noncentered!r}"
        )
    if noncentered is True:
        noncentered = "auto"
    if not (isinstance(init_scale, (int, float)) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
    if estimator not in ("auto", "reparam", "stl"):
        raise ValueError(
            f"estimator must be 'auto', 'reparam' (plain reparameterisation gradient) "
            f"or 'stl' (sticking the landing), got {estimator!r}"
        )
    if covariance not in (None, "full", "diagonal"):
        raise ValueError(f"covariance must be 'full' or 'diagonal', got {covariance!r}")
    return noncentered if isinstance(noncentered, (bool, str)) else tuple(noncentered)


def flat_layout(prototype_trace, model_name: str) -> tuple[dict, dict]:
    """Each latent site's unconstrained shape and plate stack; raises if there is no latent site."""
    shapes, stacks = {}, {}
    for name, site in prototype_trace.iter_stochastic_nodes():
        shapes[name] = biject_to(site["fn"].support).inv(site["value"]).shape
        stacks[name] = site["cond_indep_stack"]
    if sum(math.prod(shape) for shape in shapes.values()) == 0:
        raise GuideSetupError(
            f"model {model_name!r} has no latent sample sites: every "
            "pyro.sample is observed, so there is no posterior to fit. "
            "Use an empty guide instead."
        )
    return shapes, stacks
