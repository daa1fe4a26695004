r"""How far to trust a fitted guide: PSIS k-hat, importance ESS, log-evidence.

:func:`psis_diagnostic` draws from the guide (all draws at once, under an
outer plate), computes the log importance weights
:math:`\log w = \log p(x, z) - \log q(z)` and hands them to ArviZ's Pareto
smoothed importance sampling. The shape estimate :math:`\hat k` of the
weights' tail says whether the guide covers the posterior (Yao et al., 2018):

* :math:`\hat k < 0.5`: good; importance-weighted estimates are reliable.
* :math:`0.5 \le \hat k \le 0.7`: usable; the guide misses some tail mass.
* :math:`\hat k > 0.7`: do not trust the guide (nor estimates built on it).

Works with any Pyro guide whose draws depend on no other model randomness
(autoguides, :class:`~pyro_flowguide.AutoFlowGuide`, hand-written guides).
Guides that cannot run under an outer plate are drawn one at a time (with a
warning). In a model with a subsampled plate the weights use the scaled
subsample log-density, a noisy estimate: pass the full data for a diagnostic.

k-hat only sees the mass the guide visits. A guide that drops a whole region
of the posterior can show a small k-hat; the log-evidence estimate then falls
short of the truth (where one is known) by about the log of the missing share.

References:
    | Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018)
    | https://arxiv.org/abs/1802.02538
    | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
    | https://arxiv.org/abs/1507.02646
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from ..tracing import max_plate_nesting, trace_model_and_guide

__all__ = [
    "FLAT_LOG_WEIGHT_SD",
    "Draws",
    "PSISResult",
    "draw_from_guide",
    "pareto_smooth",
    "psis_diagnostic",
    "psis_from_draws",
]

_DRAWS_PLATE = "_psis_draws"
# Log weights varying less than this (float32 rounding of log densities) count as constant.
_CONSTANT_WEIGHTS = 1e-4


def pareto_smooth(log_weights: np.ndarray) -> tuple[np.ndarray, float | np.ndarray]:
    """PSIS-smoothed, normalised log weights and k-hat (the one place ArviZ's PSIS is called).

    Arguments:
        log_weights: Log importance weights with the draws on the last axis.

    Returns:
        The smoothed log weights (same shape, normalised over the last axis) and
        k-hat: a float for one set of weights, an array (one per leading index)
        otherwise.

    Example:
        >>> import numpy as np
        >>> smoothed, khat = pareto_smooth(np.random.default_rng(0).normal(size=(3, 500)))
        >>> smoothed.shape, khat.shape
        ((3, 500), (3,))
    """
    from ..arviz_compat import psislw

    return psislw(log_weights)


#: Below this standard deviation of the log weights, every draw's weight is
#: within a few per cent of the others and k-hat's tail fit carries no warning.
FLAT_LOG_WEIGHT_SD = 0.05


def _verdict(khat: float, log_weight_sd: float = math.inf) -> str:
    if log_weight_sd < FLAT_LOG_WEIGHT_SD and not khat < 0.5:
        # k-hat is scale-free: the top weights of a near-exact guide, all within
        # a few per cent of each other, can take any tail shape.
        return (
            f"good: the weights are nearly equal (log-weight sd {log_weight_sd:.3f}), so the "
            f"guide matches the posterior where it draws; k-hat ({khat:.2f}) says little "
            "about weights this flat"
        )
    if math.isnan(khat) or khat > 0.7:
        return "do not trust: the guide misses important parts of the posterior (k-hat > 0.7)"
    if khat >= 0.5:
        return "usable: the guide misses some of the posterior's tails (0.5 <= k-hat <= 0.7)"
    return "good: the guide is close to the posterior (k-hat < 0.5)"


@dataclass(eq=False)
class PSISResult:
    """What :func:`psis_diagnostic` returns.

    Attributes:
        khat: Pareto shape estimate of the importance weights' tail.
        ess: Importance effective sample size of the PSIS-smoothed weights.
        num_samples: Number of guide draws.
        log_evidence: :math:`\\log \\frac1S \\sum_s w_s`, an estimate of
            :math:`\\log p(x)` (a lower bound in expectation).
        log_evidence_se: Its standard error (delta method on the raw weights;
            meaningful when k-hat < 0.7).
        log_weights: Raw log importance weights, shape ``(num_samples,)``.
        smoothed_log_weights: PSIS-smoothed, normalised log weights.
        log_joint: :math:`\\log p(x, z_s)` per draw.
        log_q: :math:`\\log q(z_s)` per draw.
        samples: The guide's draws of every latent model site, by name, each
            with a leading ``num_samples`` dimension.
    """

    khat: float
    ess: float
    num_samples: int
    log_evidence: float
    log_evidence_se: float
    log_weights: Tensor = field(repr=False)
    smoothed_log_weights: Tensor = field(repr=False)
    log_joint: Tensor = field(repr=False)
    log_q: Tensor = field(repr=False)
    samples: dict[str, Tensor] = field(repr=False, default_factory=dict)

    @property
    def ess_fraction(self) -> float:
        """``ess / num_samples``."""
        return self.ess / self.num_samples

    @property
    def verdict(self) -> str:
        """One line: good (k < 0.5), usable (0.5-0.7) or do not trust (> 0.7).

        Also good, whatever k-hat, when the log weights' standard deviation is
        below :data:`FLAT_LOG_WEIGHT_SD`: the Pareto fit is scale-free, and a
        near-exact guide's top weights, all within a few per cent of each other,
        can take any tail shape.
        """
        lw = self.log_weights
        sd = float(lw.std()) if lw.numel() > 1 and bool(torch.isfinite(lw).all()) else math.inf
        return _verdict(self.khat, sd)

    def __repr__(self) -> str:
        return (
            f"PSISResult(khat={self.khat:.3f}, ess={self.ess:.1f} of {self.num_samples} "
            f"({100 * self.ess_fraction:.1f}%), log_evidence={self.log_evidence:.4f} "
            f"+/- {self.log_evidence_se:.4f})\n  verdict: {self.verdict}"
        )

    def resample(self, num_samples: int | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Importance resampling: draws with replacement in proportion to the smoothed weights.

        Arguments:
            num_samples: How many draws (default: as many as there are).
            generator: A ``torch.Generator`` for reproducible indices.

        Returns:
            A dict like :attr:`samples`, with a leading ``num_samples`` dimension.
        """
        n = self.num_samples if num_samples is None else int(num_samples)
        probs = self.smoothed_log_weights.exp()
        index = torch.multinomial(probs, n, replacement=True, generator=generator)
        return {name: value[index] for name, value in self.samples.items()}


def _sum_per_draw(log_prob: Tensor, dim: int, num_samples: int) -> Tensor:
    """Sums a site's log-density over every dimension but the draws dimension."""
    if log_prob.dim() < -dim:
        return log_prob.sum().expand(num_samples)
    per_draw = log_prob.movedim(dim, 0).reshape(log_prob.shape[dim], -1).sum(-1)
    return per_draw.expand(num_samples)


def _trace_log_density(trace, dim: int, num_samples: int) -> Tensor:
    total = torch.zeros(num_samples)
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + _sum_per_draw(site["log_prob"], dim, num_samples).to(total)
    return total


def _reshape_draws(name: str, value: Tensor, shape: torch.Size, num_samples: int) -> Tensor:
    if value.numel() != num_samples * math.prod(shape):
        value = value.expand(value.shape[: value.dim() - len(shape)] + shape)
        if value.numel() != num_samples * math.prod(shape):
            raise ValueError(
                f"site '{name}': cannot arrange the vectorised draws of shape {tuple(value.shape)} "
                f"as ({num_samples}, *{tuple(shape)}); does the guide sample it outside the plates "
                "the model declares for it?"
            )
    return value.reshape((num_samples,) + tuple(shape))


@dataclass(eq=False)
class Draws:
    """Guide draws scored under model and guide, arranged with a leading draws dimension.

    Attributes:
        num_samples: Number of draws.
        log_joint, log_q: :math:`\\log p(x, z_s)` and :math:`\\log q(z_s)`, shape ``(num_samples,)``.
        samples: Every latent model site's draws, by name.
        log_likelihood: Every observed site's point-wise log-density, by name.
        proto_model_trace: One model trace (no draws dimension), for site shapes and plates.
    """

    num_samples: int
    log_joint: Tensor
    log_q: Tensor
    samples: dict[str, Tensor]
    log_likelihood: dict[str, Tensor]
    proto_model_trace: Any


def _observed_sites(trace):
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and not site["infer"].get("_do_not_trace")
        and not site["infer"].get("_deterministic")
    ]


def _latent_sites(trace):
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and (not site["is_observed"] or site["infer"].get("_deterministic"))
        and not site["infer"].get("_do_not_trace")
        and not site["infer"].get("is_auxiliary")
    ]


def _draw_vectorized(model, guide, args, kwargs, num_samples, proto_guide, proto_model) -> Draws:
    dim = -(max_plate_nesting(proto_guide, proto_model) + 1)
    guide_trace, model_trace = trace_model_and_guide(model, guide, args, kwargs, (_DRAWS_PLATE, num_samples, dim))
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    samples = {}
    for name, site in _latent_sites(model_trace):
        if name in proto_model.nodes:
            shape = proto_model.nodes[name]["value"].shape
            samples[name] = _reshape_draws(name, site["value"], shape, num_samples)
    log_likelihood = {}
    for name, site in _observed_sites(model_trace):
        proto = proto_model.nodes[name]
        shape = proto["fn"].log_prob(proto["value"]).shape
        log_likelihood[name] = _reshape_draws(
            name, site["fn"].log_prob(site["value"]), shape, num_samples
        )
    return Draws(
        num_samples,
        _trace_log_density(model_trace, dim, num_samples),
        _trace_log_density(guide_trace, dim, num_samples),
        samples,
        log_likelihood,
        proto_model,
    )


def _draw_sequential(model, guide, args, kwargs, num_samples, proto_model) -> Draws:
    log_joint, log_q = [], []
    samples: dict[str, list] = {}
    log_likelihood: dict[str, list] = {}
    for _ in range(num_samples):
        guide_trace, model_trace = trace_model_and_guide(model, guide, args, kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        log_joint.append(model_trace.log_prob_sum())
        log_q.append(guide_trace.log_prob_sum())
        for name, site in _latent_sites(model_trace):
            samples.setdefault(name, []).append(site["value"])
        for name, site in _observed_sites(model_trace):
            log_likelihood.setdefault(name, []).append(site["fn"].log_prob(site["value"]))
    return Draws(
        num_samples,
        torch.stack(log_joint),
        torch.stack(log_q),
        {k: torch.stack(v) for k, v in samples.items()},
        {k: torch.stack(v) for k, v in log_likelihood.items()},
        proto_model,
    )


def draw_from_guide(model: Callable, guide: Callable, args: tuple, kwargs: dict, num_samples: int) -> Draws:
    """Draws ``num_samples`` from the guide at once (one at a time if it cannot be vectorised).

    Arguments:
        model, guide: The Pyro model and the guide.
        args, kwargs: The model's arguments.
        num_samples: Number of draws.

    Returns:
        The :class:`Draws`, scored under model and guide (no gradients).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> draws = draw_from_guide(model, AutoNormal(model), (), {}, 100)
        >>> draws.samples["z"].shape, draws.log_q.shape
        (torch.Size([100]), torch.Size([100]))
    """
    with torch.no_grad():
        proto_guide, proto_model = trace_model_and_guide(model, guide, args, kwargs)
        proto_model.log_prob_sum()  # one draw, outside any plate: an error here is not the plate's
        try:
            return _draw_vectorized(model, guide, args, kwargs, num_samples, proto_guide, proto_model)
        except Exception as err:  # noqa: BLE001 - any failure under the plate
            warnings.warn(
                f"the guide or model cannot be run under an outer plate of {num_samples} draws "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                "drawing one at a time instead, which is much slower",
                UserWarning,
                stacklevel=3,
            )
            return _draw_sequential(model, guide, args, kwargs, num_samples, proto_model)


def psis_diagnostic(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    **kwargs: Any,
) -> PSISResult:
    r"""Pareto-smoothed importance sampling diagnostic of a fitted guide.

    Arguments:
        model, guide: The Pyro model and the fitted guide.
        args, kwargs: The model's arguments (the same as for fitting).
        num_samples: Guide draws (all drawn at once under an outer plate).

    Returns:
        A :class:`PSISResult`: k-hat, importance ESS, log-evidence estimate
        with standard error, the draws and their weights (``resample()`` for
        importance resampling). Its repr ends with a verdict line.

    Example:
        >>> import pyro, torch, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> guide = AutoNormal(model, init_scale=0.9)
        >>> pyro.clear_param_store(); pyro.set_rng_seed(0)
        >>> result = psis_diagnostic(model, guide, num_samples=1000)
        >>> result.verdict
        'good: the guide is close to the posterior (k-hat < 0.5)'
        >>> abs(result.log_evidence) < 3 * result.log_evidence_se + 1e-3  # log p(x) = 0 here
        True
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    return psis_from_draws(draw_from_guide(model, guide, args, kwargs, num_samples))


def psis_from_draws(draws: Draws) -> PSISResult:
    """The :class:`PSISResult` of draws from :func:`draw_from_guide` (k-hat, ESS, log-evidence).

    Arguments:
        draws: Scored guide draws.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> result = psis_from_draws(draw_from_guide(model, AutoNormal(model), (), {}, 100))
        >>> result.num_samples
        100
    """
    num_samples = draws.num_samples
    log_weights = draws.log_joint - draws.log_q
    lw = log_weights.double()
    if not torch.isfinite(lw).all():
        bad = int((~torch.isfinite(lw)).sum())
        raise ValueError(
            f"{bad} of {num_samples} log importance weights are non-finite: the guide puts mass "
            "where the model has none (or the model's log-density overflows); check the "
            "guide's support against the model's constraints"
        )
    if float(lw.std()) < _CONSTANT_WEIGHTS:
        # Constant weights (up to rounding): the guide is the posterior; a Pareto fit is undefined.
        smoothed, khat = torch.full_like(lw, -math.log(num_samples)), -math.inf
    else:
        smoothed, khat = pareto_smooth(lw.numpy())
        smoothed = torch.from_numpy(smoothed)
    ess = float(1.0 / smoothed.exp().pow(2).sum())  # smoothed weights are normalised
    lse = torch.logsumexp(lw, 0)
    log_evidence = float(lse - math.log(num_samples))
    raw_ess = float(torch.exp(2 * lse - torch.logsumexp(2 * lw, 0)))
    se = math.sqrt(max(1.0 / raw_ess - 1.0 / num_samples, 0.0))
    return PSISResult(
        khat=khat,
        ess=ess,
        num_samples=num_samples,
        log_evidence=log_evidence,
        log_evidence_se=se,
        log_weights=log_weights,
        smoothed_log_weights=smoothed,
        log_joint=draws.log_joint,
        log_q=draws.log_q,
        samples=draws.samples,
    )
