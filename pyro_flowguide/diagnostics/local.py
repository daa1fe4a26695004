"""Per-datum PSIS diagnostics of an amortized guide's local posteriors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from ..guides.amortized import AutoAmortizedFlowGuide
from ..tracing import max_plate_nesting, trace_model_and_guide
from .psis import pareto_smooth

__all__ = ["LocalPSISResult", "local_psis_diagnostic"]


@dataclass(eq=False)
class LocalPSISResult:
    r"""What :func:`local_psis_diagnostic` returns: one importance-sampling fit per datum.

    Attributes:
        khat: Pareto k-hat of each datum's log weights, shape ``(B,)``
            (``< 0.5`` good, ``> 0.7`` do not trust q for that datum).
        log_weights: :math:`\log p(x_i, z_{s,i} \mid g_s) - \log q(z_{s,i} \mid x_i, g_s)`,
            shape ``(num_samples, B)``.
        log_evidence: Per datum, :math:`\log \frac1S \sum_s w_{s,i}`: an
            importance-weighted bound on :math:`\log p(x_i)` when the model has
            no global latents (conditional on the drawn globals otherwise).
        indices: The plate's indices of the columns (``arange(N)`` without subsampling).
        plate: The local plate's name.
    """

    khat: Tensor
    log_weights: Tensor = field(repr=False)
    log_evidence: Tensor = field(repr=False)
    indices: Tensor = field(repr=False)
    plate: str = ""

    def __repr__(self) -> str:
        k = self.khat
        return (
            f"LocalPSISResult(plate={self.plate!r}, data={k.numel()}, max khat={float(k.max()):.3f}, "
            f"share khat > 0.7: {float((k > 0.7).float().mean()):.3f}, "
            f"share khat > 0.5: {float((k > 0.5).float().mean()):.3f})"
        )


def _per_datum(log_prob: Tensor, nesting: int, plate_dim: int) -> Tensor:
    """Sums a site's log-density over every dim but the draws dim (0) and the plate dim (last)."""
    lp = log_prob.reshape((1,) * (nesting + 1 - log_prob.dim()) + log_prob.shape)
    lp = lp.movedim(nesting + 1 + plate_dim, -1)
    return lp.reshape(lp.shape[0], -1, lp.shape[-1]).sum(1)


@torch.no_grad()
def local_psis_diagnostic(
    model: Callable,
    guide: AutoAmortizedFlowGuide,
    *args: Any,
    num_samples: int = 1000,
    plate: str | None = None,
    **kwargs: Any,
) -> LocalPSISResult:
    r"""Per-datum PSIS k-hat of an amortized guide's local posteriors.

    A joint k-hat over N local latents says little once N is large (the log
    weights are sums of N terms). The local posteriors factorise over data
    given the globals, so each datum gets its own importance weights
    :math:`\log w_{s,i} = \log p(x_i, z_{s,i} \mid g_s) - \log q(z_{s,i} \mid x_i, g_s)`
    (every model site in the plate contributes its row) and its own k-hat,
    through :func:`~pyro_flowguide.diagnostics.psis.pareto_smooth`. Without global latents this is exactly the
    PSIS diagnostic of :math:`q(z_i \mid x_i)` against :math:`p(z_i \mid x_i)`;
    with globals it checks the local conditionals at the guide's global draws.

    Arguments:
        model, guide: The model and the fitted :class:`AutoAmortizedFlowGuide`.
        args, kwargs: The model's arguments (call without subsampling to score every datum).
        num_samples: Draws per datum.
        plate: The local plate (needed only when the guide has several).

    Returns:
        A :class:`LocalPSISResult`.

    Example:
        >>> # result = local_psis_diagnostic(model, guide, x_test, num_samples=500)
        >>> # (result.khat > 0.7).float().mean()  # share of data the guide fits poorly
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    if not isinstance(guide, AutoAmortizedFlowGuide):
        raise TypeError(f"local_psis_diagnostic needs an AutoAmortizedFlowGuide, got {type(guide).__name__}")
    proto, proto_model = trace_model_and_guide(model, guide, args, kwargs)  # the first call also sets the guide up
    names = sorted(guide.local_plates)
    if plate is None:
        if len(names) > 1:
            raise ValueError(f"the guide has several local plates {names}; pass plate=<name>")
        plate = names[0]
    elif plate not in guide.local_plates:
        raise ValueError(f"plate {plate!r} holds no amortized site; local plates: {names}")
    plate_dim = guide.local_plates[plate].dim
    nesting = max_plate_nesting(proto, proto_model)
    draws = ("_local_psis_draws", num_samples, -(nesting + 1))
    guide_trace, model_trace = trace_model_and_guide(model, guide, args, kwargs, draws)
    indices = guide_trace.nodes[plate]["value"]
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()

    def in_plate(site: dict) -> bool:
        return site["type"] == "sample" and any(f.name == plate for f in site["cond_indep_stack"])

    log_w = 0.0
    for site in model_trace.nodes.values():
        if in_plate(site):
            log_w = log_w + _per_datum(site["log_prob"], nesting, plate_dim)
    for site in guide_trace.nodes.values():
        if in_plate(site):
            log_w = log_w - _per_datum(site["log_prob"], nesting, plate_dim)
    log_w = log_w.expand(num_samples, log_w.shape[-1]).double()
    _, khat = pareto_smooth(log_w.T.cpu().numpy())
    log_evidence = torch.logsumexp(log_w, 0) - math.log(num_samples)
    return LocalPSISResult(
        khat=torch.as_tensor(khat),
        log_weights=log_w,
        log_evidence=log_evidence,
        indices=indices,
        plate=plate,
    )
