r"""``RenyiDReG_ELBO``: the Rényi bound with a doubly-reparameterised gradient.

The Rényi bound of order :math:`\alpha \in [0, 1)` is the importance-weighted
bound at :math:`\alpha = 0` and tends to the ELBO as :math:`\alpha \to 1`.
Pyro's ``RenyiELBO`` differentiates it with the plain reparameterisation
gradient, whose variance does not vanish however good the guide is; this loss
uses the doubly-reparameterised form (see :class:`RenyiDReG_ELBO`), every term
of which is zero when the guide equals the posterior. The guide must supply
log-densities that carry gradient along the sampling path only:
:class:`~pyro_flowguide.AutoFlowGuide` does with ``estimator="stl"`` and says
so with ``path_derivative_log_density``; other guides are refused.

Example:
    >>> import pyro, torch, pyro.distributions as dist
    >>> from pyro_flowguide import AutoFlowGuide, fit
    >>> def model():
    ...     z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    ...     pyro.sample("x", dist.Normal(z.sum(), 0.5), obs=torch.tensor(1.0))
    >>> pyro.clear_param_store()
    >>> loss = RenyiDReG_ELBO(alpha=0.5, num_particles=8, vectorize_particles=True)
    >>> result = fit(model, AutoFlowGuide(model), steps=20, loss=loss, progress=False)
    >>> result.steps
    20
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.infer import Trace_ELBO
from torch import Tensor

__all__ = ["RenyiDReG_ELBO", "DEFAULT_ALPHA", "DEAD_LOG_RATIO", "ELBO_FALLBACK_ESS"]

#: The order :func:`pyro_flowguide.fit` uses with ``AutoFlowGuide`` (figures in ``benchmarks/RESULTS.md``).
DEFAULT_ALPHA = 0.5

#: Particles whose scaled log weight is this far below the largest get no gradient.
DEAD_LOG_RATIO = 60.0

#: Below this effective share of the particles (``1 / sum(w_hat^2)`` over the number of
#: particles) a step takes the ELBO's path gradient instead (see :class:`RenyiDReG_ELBO`).
ELBO_FALLBACK_ESS = 0.125


class RenyiDReG_ELBO(Trace_ELBO):
    r"""Rényi bound of order ``alpha`` with the doubly-reparameterised gradient.

    For :math:`K` draws :math:`z_i \sim q` with log weights
    :math:`\log w_i = \log p(x, z_i) - \log q(z_i)`, the Rényi (variational Rényi)
    bound of order :math:`\alpha \in [0, 1)` is

    .. math:: \mathcal{L}_\alpha = \frac{1}{1-\alpha}
              \log \frac{1}{K} \sum_i w_i^{1-\alpha},

    which is the importance-weighted bound at :math:`\alpha = 0` and tends to the
    ELBO as :math:`\alpha \to 1`. Pyro's ``RenyiELBO`` differentiates it with the
    plain reparameterisation gradient, whose variance does not vanish however good
    the guide is. This loss differentiates it as

    .. math:: \nabla_\phi \mathcal{L}_\alpha = \sum_i
              \bigl(\alpha\, \hat w_i + (1-\alpha)\, \hat w_i^2\bigr)\,
              \frac{\partial \log w_i}{\partial z_i}\,\frac{\partial z_i}{\partial \phi},
              \qquad \hat w_i = \frac{w_i^{1-\alpha}}{\sum_j w_j^{1-\alpha}},

    the doubly-reparameterised form: only the sampling path carries gradient,
    so every term is zero when the guide equals the posterior. Parameters of the
    model itself get the plain gradient :math:`\sum_i \hat w_i \nabla_\theta
    \log p_\theta(x, z_i)`.

    Arguments:
        alpha: The order, in ``[0, 1)``: 0 is the importance-weighted bound;
            the closer to 1, the closer to the ELBO.
        num_particles: Draws per step (the ``K`` of the bound).
        vectorize_particles: Draw them under an outer plate (one pass).
        max_plate_nesting: As for ``Trace_ELBO``.

    A particle of negligible weight (a scaled log weight more than
    ``DEAD_LOG_RATIO`` below the largest, or NaN) gets no gradient: its
    coefficient is 0, and the gradient reaching its draws is cut, since a draw
    far in a tail can have a log weight of -1e33 and a gradient that
    overflows, and 0 times inf is NaN. A NaN log weight counts as
    :math:`-\infty` in the bound. If every particle is negligible the step
    accumulates no gradient. When the weights degenerate (their effective
    sample size below ``ELBO_FALLBACK_ESS`` of the particles, as on a
    posterior far tighter or more correlated than the guide) the step takes
    the ELBO's path gradient instead, every particle weighted alike but those
    more than ``DEAD_LOG_RATIO`` below the median; ``fallback_steps`` counts
    those steps.

    ``loss`` and ``loss_and_grads`` return :math:`-\mathcal{L}_\alpha`. The guide
    must be reparameterised and give path-only log-densities (see above);
    ``differentiable_loss`` is not offered, since one scalar cannot carry
    different weights for the guide's and the model's parameters.
    """

    def __init__(
        self,
        alpha: float = DEFAULT_ALPHA,
        num_particles: int = 2,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and 0 <= alpha < 1):
            raise ValueError(
                f"alpha must be in [0, 1) (0: importance-weighted bound; alpha -> 1: the ELBO, "
                f"for which use Trace_ELBO), got {alpha!r}"
            )
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles!r}")
        super().__init__(
            num_particles=int(num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
        )
        self.alpha = float(alpha)
        self.fallback_steps = 0

    # ---------------------------------------------------------------- pieces
    def _log_weights(self, model, guide, args, kwargs) -> tuple[Tensor, set, set, list]:
        """Per-particle log weights ``(K,)``, the guide's and the model's own parameters, and the guide's traces.

        The traces come as ``(trace, particle index)``, the index ``None`` for one vectorised trace.
        """
        log_weights = []
        draws = []
        guide_params: set = set()
        model_params: set = set()
        vectorized = self.vectorize_particles and self.num_particles > 1
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            _check_guide(guide, guide_trace)
            # Under the particle plate (at dim -max_plate_nesting: Pyro raised it
            # by one for that plate) a site's log-density is summed over every
            # other dim; without it, over all of them.
            dim = -int(self.max_plate_nesting) if vectorized else None
            lw = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    lw = lw + _per_particle(site["log_prob"], dim)
            for site in guide_trace.nodes.values():
                if site["type"] == "sample":
                    lw = lw - _per_particle(site["log_prob"], dim)
            log_weights.append(torch.as_tensor(lw).expand(self.num_particles if vectorized else ()))
            draws.append((guide_trace, None if vectorized else len(draws)))
            guide_params.update(_unconstrained_params(guide_trace))
            model_params.update(_unconstrained_params(model_trace))
        lw = log_weights[0] if vectorized else torch.stack(log_weights)
        return lw, guide_params, model_params - guide_params, draws

    def _bound(self, log_weights: Tensor) -> Tensor:
        scaled = (1.0 - self.alpha) * _nan_to_neg_inf(log_weights)
        return (torch.logsumexp(scaled, 0) - math.log(scaled.shape[0])) / (1.0 - self.alpha)

    # ------------------------------------------------------------ interface
    @torch.no_grad()
    def loss(self, model, guide, *args: Any, **kwargs: Any) -> float:
        """An estimate of :math:`-\\mathcal{L}_\\alpha` with ``num_particles`` draws."""
        lw = self._log_weights(model, guide, args, kwargs)[0]
        return -self._bound(lw).item()

    def loss_and_grads(self, model, guide, *args: Any, **kwargs: Any) -> float:
        """Estimates :math:`-\\mathcal{L}_\\alpha` and accumulates its gradient in ``.grad``."""
        lw, guide_params, model_params, draws = self._log_weights(model, guide, args, kwargs)
        if lw.requires_grad:
            with torch.no_grad():
                scaled = (1.0 - self.alpha) * _nan_to_neg_inf(lw.detach())
                w_hat = torch.softmax(scaled, 0)
                if float(1.0 / (w_hat**2).sum()) < ELBO_FALLBACK_ESS * lw.shape[0]:
                    # Degenerate weights: the ELBO's path gradient, every particle alike but
                    # those far in a tail (as far below the median as negligible ones below the top).
                    self.fallback_steps += 1
                    finite = scaled[torch.isfinite(scaled)]
                    middle = finite.median() if finite.numel() else scaled.max()
                    dead = ~(scaled - middle > -DEAD_LOG_RATIO)
                    w_hat = (~dead).to(w_hat) / (~dead).sum().clamp(min=1)
                    coef = w_hat
                else:
                    coef = self.alpha * w_hat + (1.0 - self.alpha) * w_hat**2
                    dead = ~(scaled - scaled.max() > -DEAD_LOG_RATIO)
            if bool(dead.any()):
                if bool(dead.all()):
                    return -self._bound(lw.detach()).item()
                w_hat = torch.where(dead, torch.zeros_like(w_hat), w_hat)
                coef = torch.where(dead, torch.zeros_like(coef), coef)
                lw = torch.where(dead, lw.detach().nan_to_num(0.0, 0.0, 0.0), lw)
                _cut_dead(draws, dead)
            guide_params = [p for p in guide_params if p.requires_grad]
            model_params = [p for p in model_params if p.requires_grad]
            if guide_params:
                (-(coef * lw).sum()).backward(inputs=guide_params, retain_graph=bool(model_params))
            if model_params:
                (-(w_hat * lw).sum()).backward(inputs=model_params)
        return -self._bound(lw.detach()).item()

    def differentiable_loss(self, model, guide, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "RenyiDReG_ELBO has no differentiable_loss: it weights the guide's and the "
            "model's gradients differently. Use loss_and_grads (SVI, pyro_flowguide.fit), "
            "or pyro.infer.RenyiELBO / Trace_ELBO where a differentiable loss is needed."
        )


def _cut_dead(draws: list, dead: Tensor) -> None:
    """Zeroes, in the backward pass, the gradient reaching the guide's draws of the ``dead`` particles."""
    k = dead.shape[0]
    for guide_trace, index in draws:
        if index is not None and not bool(dead[index]):
            continue
        for site in guide_trace.nodes.values():
            value = site.get("value")
            if site["type"] != "sample" or not torch.is_tensor(value) or not value.requires_grad:
                continue
            if index is not None:
                value.register_hook(torch.zeros_like)
            elif value.dim() >= 1 and value.shape[0] == k:
                keep = (~dead).reshape((k,) + (1,) * (value.dim() - 1))
                value.register_hook(lambda g, keep=keep: torch.where(keep, g, torch.zeros_like(g)))


def _nan_to_neg_inf(lw: Tensor) -> Tensor:
    return torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw)


def _per_particle(log_prob: Tensor, dim: int | None) -> Tensor:
    """``log_prob`` summed over every dim but the particle dim ``dim`` (all of them if None)."""
    if dim is None or log_prob.dim() < -dim:
        return log_prob.sum()  # no particle dim: the same for every particle
    log_prob = log_prob.movedim(dim, 0)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1)


def _unconstrained_params(trace) -> list[Tensor]:
    return [site["value"].unconstrained() for site in trace.nodes.values() if site["type"] == "param"]


def _check_guide(guide, guide_trace) -> None:
    if not getattr(guide, "path_derivative_log_density", False):
        raise ValueError(
            f"RenyiDReG_ELBO needs a guide whose log-density carries gradient along the "
            f"sampling path only, and {type(guide).__name__} does not say it gives one "
            "(attribute path_derivative_log_density). Use AutoFlowGuide(model, "
            "estimator='stl'), or pyro.infer.RenyiELBO for other guides."
        )
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
            raise ValueError(
                f"RenyiDReG_ELBO needs reparameterised guide sites; site {name!r} "
                f"({type(site['fn']).__name__}) has no rsample. Use Trace_ELBO or "
                "TraceGraph_ELBO for guides with discrete or non-reparameterised sites."
            )
