"""What :func:`~pyro_flowguide.fit` checks in its arguments before it trains: steps, learning rate, loss."""

from __future__ import annotations

import math
import numbers
from typing import Any

from pyro.infer import TraceEnum_ELBO
from pyro.poutine.util import site_is_subsample
from pyro.optim import PyroOptim

from ..guides.contract import whole_number_at_least

__all__ = ["check_guide_sites", "check_loss_enumerates", "check_lr", "checked_steps", "enumerated_sites"]


def enumerated_sites(guide_trace, model_trace) -> list[str]:
    """Discrete model sites marked for parallel enumeration that the guide does not sample."""
    return [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and site["infer"].get("enumerate") == "parallel"
        and getattr(site["fn"], "has_enumerate_support", False)
        and name not in guide_trace.nodes
    ]


def checked_steps(steps: Any) -> int:
    """``steps`` as an int, refused when it is not a whole number >= 0."""
    if not whole_number_at_least(steps, 0):
        raise ValueError(f"fit: steps must be a whole number >= 0, got {steps!r}")
    return int(steps)


def check_lr(optim: PyroOptim) -> None:
    """Refuses a fixed learning rate that cannot train (zero, negative or not finite)."""
    lr = optim.pt_optim_args.get("lr") if isinstance(optim.pt_optim_args, dict) else None
    if lr is not None and not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(
            f"fit: the optimiser's lr must be a finite number > 0, got {lr!r}; Pyro's tutorials use "
            "Adam({'lr': 1e-3}) to Adam({'lr': 0.1}). To score a guide without training, use steps=0."
        )


def check_loss_enumerates(loss: Any, traces: tuple) -> None:
    """Refuses a loss that would draw the model's enumerated sites from their priors."""
    enumerated = enumerated_sites(*traces)
    if enumerated and not isinstance(loss, TraceEnum_ELBO):
        raise ValueError(
            f"fit: the model enumerates site(s) {', '.join(map(repr, sorted(enumerated)))}, which "
            f"{type(loss).__name__} would draw from their priors (a biased objective); pass "
            "loss=pyro.infer.TraceEnum_ELBO(max_plate_nesting=...) or leave loss unset for fit to choose it."
        )


def check_guide_sites(guide_trace, model_trace) -> None:
    """Refuses a guide that samples latent sites the model does not have (a guide built for another model)."""
    model_sites = {name for name, site in model_trace.nodes.items() if site["type"] == "sample"}
    extra = [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["infer"].get("is_auxiliary") and name not in model_sites
    ]
    if extra:
        latent = sorted(
            n for n, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        )
        raise ValueError(
            f"fit: the guide samples {', '.join(map(repr, extra))}, which the model does not have (its latent "
            f"sites: {', '.join(latent)}); the guide was built for another model. Build the guide from this "
            "model, e.g. AutoFlowGuide(model), or mark a guide-only site with infer={'is_auxiliary': True}."
        )
