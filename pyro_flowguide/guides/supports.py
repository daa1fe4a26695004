"""Sites and their supports: latent supports that must stay fixed, observed values that must fit.

A guide maps each site to its support with the bijection it read at set-up;
a support whose bounds follow other latent sites (``Uniform(0, b)`` with a
latent ``b``) would then be served draws outside it. :func:`check_same_supports`
compares the supports of a fresh trace with the set-up trace's.
:func:`observed_value_problem` says what is wrong with an observed site's
data (outside the support, or of a shape that does not fit the distribution),
for the set-up's error messages.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import constraints

from .sites import GuideSetupError

__all__ = ["check_same_supports", "not_tensors", "observed_value_problem", "same_support"]


def same_support(a: Any, b: Any) -> bool:
    """Whether two constraints are of one kind with equal bounds (tensors and numbers compared; nested constraints too).

    Conservative: only a differing kind, tensor, number or nested constraint
    counts as different, so that a constraint holding other objects is never
    flagged by their identity.
    """
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_support(x, y) for x, y in zip(a, b))
    if isinstance(a, constraints.Constraint) or isinstance(b, constraints.Constraint):
        if type(a) is not type(b):
            return False
        return all(same_support(value, vars(b).get(key)) for key, value in vars(a).items())
    if torch.is_tensor(a) or torch.is_tensor(b):
        try:
            return bool(torch.equal(*torch.broadcast_tensors(torch.as_tensor(a), torch.as_tensor(b))))
        except (RuntimeError, TypeError):
            return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (a != a and b != b)  # NaN bounds count as equal
    return True


def check_same_supports(prototype_trace: Any, trace: Any, model_name: str) -> None:
    """Raises :class:`GuideSetupError` for a latent site whose support in ``trace`` differs from set-up's."""
    for name, site in prototype_trace.iter_stochastic_nodes():
        fresh = trace.nodes.get(name)
        if fresh is None or fresh["type"] != "sample":
            continue
        before, now = site["fn"].support, fresh["fn"].support
        if not same_support(before, now):
            raise GuideSetupError(
                f"model {model_name!r}: the support of latent site {name!r} changes with other latent "
                f"sites ({before} at set-up, {now} in another draw). The guide maps each site with the "
                "support it had at set-up, so its draws would fall outside the new one. Give the site a "
                f"fixed support and move the dependence into the model, e.g. {name}_unit = "
                f"pyro.sample('{name}_unit', dist.Uniform(0., 1.)) and {name} = "
                f"pyro.deterministic('{name}', low + (high - low) * {name}_unit)."
            )


def observed_value_problem(site: dict) -> str | None:
    """What is wrong with an observed site's value for its distribution (shape, then support), or ``None``."""
    fn, value = site["fn"], site["value"]
    if not torch.is_tensor(value):
        return (
            f"its data are a {type(value).__module__}.{type(value).__name__}, not a torch tensor; Pyro's "
            "distributions take tensors: pass torch.as_tensor(data, dtype=torch.get_default_dtype())"
        )
    if value.dtype == torch.bool:
        return "its data are booleans; Pyro's distributions take numbers: pass data.float()"
    want = fn.batch_shape + fn.event_shape
    try:
        torch.broadcast_shapes(value.shape, want)
    except RuntimeError:
        return (
            f"its data have shape {tuple(value.shape)}, which does not broadcast with the distribution's "
            f"shape {tuple(want)} (batch and event); pass data of that shape, or check the plate sizes"
        )
    try:
        inside = fn.support.check(value)
    except (RuntimeError, ValueError, TypeError):
        return None
    outside = ~inside.bool()
    if outside.any():
        return (
            f"{int(outside.sum())} of its {outside.numel()} data are outside the support {fn.support} of "
            f"{type(fn).__name__}; check the data, or choose a likelihood whose support holds them"
        )
    return None


def not_tensors(named: dict[str, Any]) -> str | None:
    """Names the model's arguments that are lists or arrays rather than tensors, with the fix, or ``None``."""
    loose = [f"{k!r} (a {type(v).__name__})" for k, v in named.items() if isinstance(v, (list, tuple)) or type(v).__module__ == "numpy"]
    if not loose:
        return None
    return (
        f"the model failed, and its argument(s) {', '.join(loose)} are not tensors; Pyro models usually "
        "take torch tensors: pass torch.as_tensor(...) of each"
    )
