r"""Non-centred coordinates for ``AutoFlowGuide``: Normal sites whose prior follows other latents.

A latent site :math:`z \sim N(m(\mathrm{pa}), s(\mathrm{pa}))` whose location or
scale depends on other latent sites (its parents) is given to the guide's flow
as :math:`v = (z - m) / s`. The guide draws :math:`v`, then runs the model with
every latent fixed in program order, so that :math:`m` and :math:`s` are the
model's own, evaluated at the parents just drawn, and returns
:math:`z = m + s\,v` with the log-density :math:`\log q(v) - \sum \log s`.

Non-centred coordinates help where the prior shapes the posterior and hurt
where the data pin each site (the posterior of :math:`z` is then near-Gaussian
and :math:`v` inherits a funnel from :math:`s`), so the automatic choice keeps
a site centred when the data's curvature outweighs its prior's precision.

This is the non-centred parameterisation (as Pyro's ``LocScaleReparam(0)``
applies to a model) done inside the guide: the model is untouched and the
guide still covers the original sites. Hierarchies and funnels, whose
posterior narrows with a scale parameter, become near-Gaussian in these
coordinates. The map has no parameters of its own, so the guide's
log-density still carries gradient along the sampling path only (sticking the
landing).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.infer.inspect import get_dependencies
from pyro.poutine.util import site_is_subsample
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import biject_to

__all__ = ["auto_noncentered_sites", "normal_of", "run_noncentered"]


def normal_of(fn: dist.Distribution) -> torch.distributions.Normal | None:
    """The Normal under ``.to_event`` / ``.mask`` wrappers, or ``None`` if ``fn`` is not one."""
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn if isinstance(fn, torch.distributions.Normal) else None


def auto_noncentered_sites(
    model: Callable, prototype_trace, args: tuple, kwargs: dict
) -> tuple[str, ...]:
    """The latent Normal sites whose location or scale depends on another latent
    site, and whose prior there is at least as informative as the data.

    Dependencies come from Pyro's ``get_dependencies``; priors and data are
    compared by :func:`_prior_dominates`. Both run on a copy of the RNG state,
    so set-up draws nothing from the caller's stream. Returns ``()`` with a
    warning when the model cannot be analysed.
    """
    latent = {name for name, _ in prototype_trace.iter_stochastic_nodes()}
    candidates = [
        name
        for name, site in prototype_trace.iter_stochastic_nodes()
        if normal_of(site["fn"]) is not None
    ]
    if not candidates:
        return ()
    try:
        with torch.random.fork_rng(devices=[]), poutine.block():
            deps = get_dependencies(model, tuple(args), dict(kwargs))["prior_dependencies"]
    except Exception as e:  # provenance tracking does not follow every tensor operation
        warnings.warn(
            f"AutoFlowGuide could not trace which latents depend on which ({type(e).__name__}: "
            f"{e}); every site stays in centred coordinates. Pass noncentered=[...] to "
            "choose sites by hand, or noncentered=False to silence this.",
            stacklevel=4,
        )
        return ()
    dependent = [name for name in candidates if (set(deps.get(name, ())) - {name}) & latent]
    if not dependent:
        return ()
    # The point where priors and data are compared: the prior medians, drawn
    # under a fixed seed, so that the choice depends on the model alone and a
    # guide rebuilt to load saved parameters makes the same one.
    with torch.random.fork_rng(devices=[]), poutine.block():
        torch.manual_seed(0)
        point = poutine.trace(InitMessenger(init_to_median)(model)).get_trace(*args, **kwargs)
    values = {name: point.nodes[name]["value"].detach() for name in latent}
    return tuple(
        name for name in dependent if _prior_dominates(model, values, name, args, kwargs)
    )


def _prior_dominates(
    model: Callable, values: Mapping[str, Tensor], name: str, args: tuple, kwargs: dict
) -> bool:
    r"""Whether the site's prior is at least as informative as everything below it, at ``values``.

    Compares the mean prior precision :math:`1/s^2` of the site's elements with
    the mean curvature :math:`-\partial^2 \log p / \partial z^2` of the rest of
    the joint (data and child sites). Where the prior dominates, the posterior
    follows the prior's funnel and non-centred coordinates are the easy ones;
    where the data dominate, the centred ones are (the classic trade-off
    between the two parameterisations).
    """
    values = dict(values)
    z = values[name].clone().requires_grad_(True)
    values[name] = z
    with torch.random.fork_rng(devices=[]), poutine.block():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    rest = 0.0
    for other, site in trace.nodes.items():
        if site["type"] != "sample" or other == name or site_is_subsample(site):
            continue
        rest = rest + site["fn"].log_prob(site["value"]).sum()
    prior_precision = normal_of(trace.nodes[name]["fn"]).scale.detach().expand(z.shape).pow(-2).mean()
    if not torch.is_tensor(rest) or not rest.requires_grad:
        return True  # nothing below the site: its posterior is its prior
    (grad,) = torch.autograd.grad(rest, z, create_graph=True)

    def hvp(r: Tensor) -> Tensor:
        if not grad.requires_grad:
            return torch.zeros_like(z)
        (out,) = torch.autograd.grad(grad, z, grad_outputs=r, retain_graph=True, allow_unused=True)
        return torch.zeros_like(z) if out is None else out

    if z.numel() <= _EXACT_DIAGONAL:
        eye = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
        diag = torch.stack([hvp(e.reshape(z.shape)).reshape(-1)[i] for i, e in enumerate(eye)])
    else:  # Hutchinson's estimate of the diagonal, with Rademacher probes
        gen = torch.Generator().manual_seed(0)
        probes = [torch.randint(0, 2, z.shape, generator=gen).to(z) * 2 - 1 for _ in range(8)]
        diag = sum((r * hvp(r)).reshape(-1) for r in probes) / len(probes)
    return bool(-diag.detach().mean() <= prior_precision)


#: Largest site for which the curvature's diagonal is computed exactly (one backward pass per element).
_EXACT_DIAGONAL = 64


class _NonCentered(Messenger):
    """Fixes every latent site of a model run from the guide's coordinates, in program order."""

    def __init__(self, pieces: Mapping[str, Tensor], noncentered: frozenset, centred: bool = False) -> None:
        super().__init__()
        self.pieces = pieces
        self.noncentered = noncentered
        self.centred = centred
        self.values: dict[str, Tensor] = {}
        self.log_scales: dict[str, Tensor] = {}

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.pieces:
            return
        piece = self.pieces[name]
        fn = msg["fn"]
        if name in self.noncentered:
            normal = normal_of(fn)
            if normal is None:
                raise ValueError(
                    f"site {name!r} was a Normal when the guide was set up and is now "
                    f"{type(fn).__name__}; build a new guide for this model."
                )
            if self.centred:  # the piece is the site's value z; v = (z - m) / s is returned
                value, returned = piece, (piece - normal.loc) / normal.scale
            else:
                value = returned = normal.loc + normal.scale * piece
            if returned.shape != piece.shape:
                raise ValueError(
                    f"site {name!r}: the location/scale of its Normal (shapes "
                    f"{tuple(normal.loc.shape)}, {tuple(normal.scale.shape)}) broadcast "
                    f"its value to {tuple(returned.shape)}, not {tuple(piece.shape)}; "
                    "pass noncentered=False (or leave this site out of the list)."
                )
            self.log_scales[name] = sum_rightmost(
                normal.scale.log().expand(value.shape), fn.event_dim
            )
        else:
            value = returned = biject_to(fn.support)(piece)
        self.values[name] = returned
        msg["value"] = value
        msg["is_observed"] = True


def run_noncentered(
    model: Callable,
    pieces: Mapping[str, Tensor],
    noncentered: Iterable[str],
    args: tuple,
    kwargs: dict,
    centred: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Runs ``model`` with its latents taken from ``pieces`` (unconstrained, non-centred where named).

    Returns the constrained value of every site in ``pieces`` and, for the
    non-centred ones, the log of the Normal's scale summed over event dims
    (the log-Jacobian of ``v -> z``). Nothing reaches handlers outside.

    With ``centred=True`` the named sites' pieces are their values ``z``
    instead, and what is returned for them is :math:`v = (z - m) / s` (the
    inverse map; its parents are then given in their own coordinates).
    """
    handler = _NonCentered(pieces, frozenset(noncentered), centred)
    with poutine.block(), handler:
        model(*args, **kwargs)
    missing = [name for name in pieces if name not in handler.values]
    if missing:
        raise ValueError(
            f"latent sites {missing} did not appear when the model was run again; "
            "AutoFlowGuide with noncentered sites needs a model whose latent sites "
            "are the same on every call."
        )
    return handler.values, handler.log_scales
