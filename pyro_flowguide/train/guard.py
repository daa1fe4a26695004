"""The guarded step of :func:`~pyro_flowguide.fit`: Pyro's ``SVI`` that skips non-finite updates."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads

from ..tracing import trace_model_and_guide

if TYPE_CHECKING:  # pragma: no cover
    from .loop import FitResult

__all__ = ["GuardedSVI", "NonFiniteLossError", "first_line", "nonfinite_sites"]

#: Pyro's validation message for a distribution parameter that is NaN/inf.
INVALID_PARAMETER = re.compile(r"Expected parameter .* found invalid values", re.DOTALL)

#: Pyro's validation message for a value outside its support, with the site's name.
OUTSIDE_SUPPORT = re.compile(r"at site '(?P<site>[^']+)':\s*Expected value argument .* to be within the support", re.DOTALL)


class NonFiniteLossError(ValueError):
    """Raised by :func:`fit` after too many consecutive non-finite steps.

    ``.result`` holds the :class:`FitResult` up to the failure and ``.sites``
    the names of the sites whose log-density was non-finite.
    """

    def __init__(self, message: str, sites: list[str], result: FitResult | None = None):
        super().__init__(message)
        self.sites = sites
        self.result = result


def first_line(err: BaseException, limit: int = 300) -> str:
    """``"ErrorType: first line of the message"``, cut to ``limit`` characters."""
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _grads_finite(params) -> bool:
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    if not grads:
        return True
    # The cheapest check measured: a sum holding NaN/inf is NaN/inf (a sum that
    # overflows float range counts as non-finite too, and such a step is skipped).
    return math.isfinite(torch.cat(grads).sum().item())


def nonfinite_sites(model, guide, args, kwargs) -> list[str]:
    """Names of sites whose value or log-density is non-finite in one fresh trace."""
    bad: list[str] = []
    # Without validation a NaN parameter reaches log_prob, where the site has a name.
    with torch.no_grad(), pyro.validation_enabled(False):
        try:
            guide_trace, model_trace = trace_model_and_guide(model, guide, args, kwargs)
        except Exception as err:  # noqa: BLE001 - report, do not mask the original failure
            return [f"(tracing model and guide raised {first_line(err)})"]
        for label, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "param":
                    if not torch.isfinite(site["value"]).all():
                        bad.append(f"{label} param '{name}' (value)")
                    continue
                if site["type"] != "sample" or site["infer"].get("_do_not_trace"):
                    continue
                kind = "observed" if site["is_observed"] else "latent"
                value = site["value"]
                if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                    bad.append(f"{label} site '{name}' ({kind}, value)")
                    continue
                try:
                    lp = site["fn"].log_prob(value)
                except Exception as err:  # noqa: BLE001
                    bad.append(f"{label} site '{name}' ({kind}, log_prob raised {first_line(err, 120)})")
                    continue
                if not torch.isfinite(lp).all():
                    bad.append(f"{label} site '{name}' ({kind}, log-density)")
    return bad


class GuardedSVI(SVI):
    """Pyro's ``SVI`` whose step leaves parameters and optimiser state alone when anything is non-finite.

    A step is ``SVI.step`` (``loss_and_grads``, then the optimiser, then
    ``zero_grads``), except that the optimiser update is skipped when the loss
    or a gradient is NaN/inf, or when Pyro's validation rejects a distribution
    parameter ("Expected parameter ... found invalid values"). After each step
    ``finite`` says whether the update was applied and, when it was not,
    ``bad_reason`` says why. A latent site's draw outside its support (a
    positive draw that underflowed to 0, a unit-interval one rounded to 1)
    is a numerical failure of the step too, and is skipped alike; the same
    error for an observed site is the data's, and is raised. Arguments are
    those of ``SVI``.

    Example:
        >>> import pyro, torch, pyro.distributions as dist
        >>> from pyro.infer import Trace_ELBO
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> pyro.clear_param_store()
        >>> svi = GuardedSVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> loss = svi.step()
        >>> svi.finite
        True
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.finite = True
        self.bad_reason: str | None = None

    def step(self, *args, **kwargs) -> float:
        """One step on ``model(*args, **kwargs)``; returns the loss (NaN when validation rejected a parameter)."""
        try:
            with poutine.trace(param_only=True) as capture:
                loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        except ValueError as err:
            if not (INVALID_PARAMETER.search(str(err)) or self._latent_outside_support(err)):
                raise
            zero_grads(p for _, p in pyro.get_param_store().named_parameters())
            outside = OUTSIDE_SUPPORT.search(str(err))
            why = f"a draw of latent site {outside['site']!r} outside its support" if outside else first_line(err)
            self.finite, self.bad_reason = False, why
            return math.nan
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        if isinstance(loss, tuple):
            loss = sum(loss)
        loss = float(loss)
        if math.isfinite(loss) and _grads_finite(params):
            self.optim(params)
            self.finite = True
        else:
            self.finite = False
            self.bad_reason = f"loss {loss}" if not math.isfinite(loss) else "non-finite gradient"
        zero_grads(params)
        return loss

    def _latent_outside_support(self, err: ValueError) -> bool:
        """Whether ``err`` is Pyro's support check failing for a latent site of the guide."""
        found = OUTSIDE_SUPPORT.search(str(err))
        trace = getattr(self.guide, "prototype_trace", None)
        if found is None or trace is None or found["site"] not in trace.nodes:
            return False
        site = trace.nodes[found["site"]]
        return site["type"] == "sample" and not site["is_observed"]
