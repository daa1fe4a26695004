r"""The flow guide's posterior: the affine stage, the distribution over the flat latent and its draws.

:class:`FlowPosterior` is what :meth:`AutoFlowGuide.get_posterior
<pyro_flowguide.AutoFlowGuide.get_posterior>` returns: base noise through the
flow's transforms, then the affine stage :class:`TrilAffine`; a draw and its
log-density come from one pass, and with sticking the landing the draw's score
comes from :func:`draw_with_score`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor, nn
from torch.distributions import ComposeTransform, Transform

from ..transforms import FlowTransform, param_tuple
from .stl import draw_and_score, made_layers

__all__ = [
    "RemembersLogDet",
    "FlowChain",
    "FlowPosterior",
    "TrilAffine",
    "affine_parameters",
    "affine_shift",
    "set_location_unit",
    "write_affine_shift",
    "affine_stage",
    "holds_affine_scale",
    "detached_copy",
    "draw_with_batched_score",
    "draw_with_score",
    "forward_with_ladj",
    "inverse_with_ladj",
    "made_layers_of",
    "relink",
    "row_scale",
    "unit_tril",
]


class TrilAffine(Transform):
    r"""The affine stage :math:`x \mapsto \mu + L x`, ``L = diag(scale) @ unit_tril``.

    The owning guide passes its current parameters in per call, so this object
    holds none and is cheap to build each step.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, loc: Tensor, scale: Tensor, unit_tril: Tensor | None) -> None:
        super().__init__()
        self.loc = loc
        self.scale = scale
        self.unit_tril = unit_tril

    def _call(self, x: Tensor) -> Tensor:
        if self.unit_tril is not None:
            x = (self.unit_tril @ x.unsqueeze(-1)).squeeze(-1)
        return self.loc + self.scale * x

    def _inverse(self, y: Tensor) -> Tensor:
        x = (y - self.loc) / self.scale
        if self.unit_tril is not None:
            x = torch.linalg.solve_triangular(
                self.unit_tril, x.unsqueeze(-1), upper=False, unitriangular=True
            ).squeeze(-1)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.scale.log().sum(-1).expand(x.shape[:-1])

    def inverse_transpose(self, v: Tensor) -> Tensor:
        r""":math:`(\mathrm{diag}(scale)\, L)^{-\top} v`: maps a score in ``x`` to one in ``y``."""
        v = v.detach()
        if self.unit_tril is not None:
            v = torch.linalg.solve_triangular(
                self.unit_tril.detach().mT, v.unsqueeze(-1), upper=True, unitriangular=True
            ).squeeze(-1)
        return v / self.scale.detach()


class RemembersLogDet:
    """Mixin for a transform with ``call_and_ladj``: keeps its last pass's log-determinant.

    ``log_abs_det_jacobian(x, y)`` of the values the last pass computed (the
    same tensors) returns that pass's log-determinant instead of recomputing it.
    """

    _last: tuple[Tensor, Tensor, Tensor] | None = None

    def remember(self, x: Tensor, y: Tensor, ladj: Tensor) -> None:
        self._last = (x, y, ladj)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] is y:
            return last[2]
        return self.call_and_ladj(x)[1]


class FlowChain(RemembersLogDet, ComposeTransform):
    """The guide's transforms as one ``Transform``; a call keeps its log-determinant for the same values.

    ``parts`` are the transforms, in order; each part's log-determinant comes
    from the pass that computed the value.
    """

    def __init__(self, parts: Sequence[Transform]) -> None:
        super().__init__(list(parts))

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return forward_with_ladj(self.parts, x)

    def __call__(self, x: Tensor) -> Tensor:
        y, ladj = self.call_and_ladj(x)
        self.remember(x, y, ladj)
        return y


def forward_with_ladj(parts: Sequence[Transform], x: Tensor) -> tuple[Tensor, Tensor]:
    total = 0.0
    for t in parts:
        if hasattr(t, "call_and_ladj"):
            y, ladj = t.call_and_ladj(x)
        else:
            y = t(x)
            ladj = t.log_abs_det_jacobian(x, y)
        total = total + _event_sum(ladj, t)
        x = y
    return x, total


def inverse_with_ladj(parts: Sequence[Transform], y: Tensor) -> tuple[Tensor, Tensor]:
    """Maps ``y`` back to the base space; returns ``(x, log|det J|)`` of the forward map at x."""
    total = 0.0
    for t in reversed(parts):
        x = t.inv(y)
        total = total + _event_sum(t.log_abs_det_jacobian(x, y), t)
        y = x
    return y, total


def draw_with_score(
    parts: Sequence[Transform], base: dist.Distribution, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""A draw ``u = A(f(eps))``, its log-density and the score :math:`\nabla_u \log q(u)`.

    ``parts`` are the flow's transforms ``f`` followed by the guide's affine
    stage ``A`` (``u = loc + diag(scale) L y``); ``base`` is the standard normal.
    The score is what sticking the landing needs, and it needs no inverse pass:
    with :math:`h(\varepsilon) = \log p(\varepsilon) - \log|\det J_f(\varepsilon)|`
    and :math:`J_f = \partial y / \partial \varepsilon`, the score in ``y`` is
    :math:`J_f^{-\top} \nabla_\varepsilon h` and in ``u`` it is
    :math:`A^{-\top}` times that. :math:`\nabla_\varepsilon \log p(\varepsilon) =
    -\varepsilon`, and ``A`` is applied in closed form (a triangular solve). For
    a flow of Zuko's masked autoregressive layers (MAF, NSF, SplineMAF) the
    layers' Jacobians and log-determinant gradients are written out as well
    (:mod:`pyro_flowguide.guides.stl`); for any other flow ``J_f`` and
    :math:`\nabla_\varepsilon \log|\det J_f|` come from one backward pass
    through the flow's part of the draw's graph, batched over the ``D + 1``
    output directions (:func:`draw_with_batched_score`). An autoregressive
    inverse instead takes one network pass per coordinate.
    """
    *flow, affine = parts
    layers = made_layers_of(flow)
    if layers is not None:  # Zuko's masked autoregressive layers: the score in closed form
        y, ladj, score = draw_and_score(layers, eps)
        flow[0].remember(eps, y, ladj)
        return _through_affine(affine, base, eps, y, ladj, score)
    return draw_with_batched_score(parts, base, eps)


def draw_with_batched_score(
    parts: Sequence[Transform], base: dist.Distribution, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`draw_with_score` for any flow: ``J_f`` from autograd, batched over directions."""
    *flow, affine = parts
    eps = eps.detach().requires_grad_(True)
    y, ladj = forward_with_ladj(flow, eps)
    d = eps.shape[-1]
    if flow:
        # Direction k < d picks y_k (row k of J_f); direction d picks ladj.
        eye = _eye(d + 1, eps)
        lead = (1,) * (eps.dim() - 1)
        grad_y = eye[:, :d].reshape((d + 1,) + lead + (d,)).expand((d + 1,) + y.shape)
        grad_l = eye[:, d].reshape((d + 1,) + lead).expand((d + 1,) + ladj.shape)
        if torch.jit.is_tracing():
            # vmap (is_grads_batched) and shaped grad_outputs cannot be traced: one
            # pass per direction, of a sum (the draws of a batch do not interact).
            outputs = [y[..., k].sum() for k in range(d)] + [ladj.sum()]
            rows = torch.stack([torch.autograd.grad(out, (eps,), retain_graph=True)[0] for out in outputs])
        else:
            (rows,) = torch.autograd.grad(
                (y, ladj), (eps,), (grad_y, grad_l), retain_graph=True, is_grads_batched=True
            )
        jac_t = rows[:d].movedim(0, -1)  # J_f^T: [..., i, k] = d y_k / d eps_i
        # A singular J (a collapsed scale) gives a non-finite score, hence a
        # non-finite gradient that fit's guard skips, rather than an exception.
        score = torch.linalg.solve_ex(jac_t, (-eps - rows[d]).unsqueeze(-1))[0].squeeze(-1)
    else:  # no flow: y is eps
        score = -eps.detach()
    return _through_affine(affine, base, eps, y, ladj, score)


def _through_affine(
    affine: Transform, base: dist.Distribution, eps: Tensor, y: Tensor, ladj: Tensor, score: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, log q(u), score in u)`` from the flow's ``y = f(eps)``, ``log|det J_f|`` and score in ``y``."""
    u = affine(y)
    log_q = base.log_prob(eps) - ladj - _event_sum(affine.log_abs_det_jacobian(y, u), affine)
    return u, log_q, affine.inverse_transpose(score)


def made_layers_of(flow: Sequence[Transform]) -> tuple | None:
    """The layers of a flow whose score :mod:`pyro_flowguide.guides.stl` writes out, or None."""
    if len(flow) != 1 or type(flow[0]) is not FlowTransform or flow[0].direction != "sample":
        return None
    t = flow[0]
    hit = t.__dict__.get("_made_layers")
    if hit is None or hit[0] is not t.lazy:  # checked once per flow (and per copy of it)
        hit = t.__dict__["_made_layers"] = (t.lazy, made_layers(t.lazy))
    return hit[1]


def _event_sum(ladj: Tensor, t: Transform) -> Tensor:
    # Element-wise transforms (event_dim 0) report one term per coordinate.
    return ladj.sum(-1) if t.domain.event_dim == 0 else ladj


class FlowPosterior(dist.TorchDistribution):
    r"""The guide's distribution over the flat unconstrained latent vector.

    A draw and its log-density come from one forward pass and the log-density
    is kept for the draw, so scoring one's own samples inverts nothing. With
    ``detached_parts`` (sticking the landing: a function that returns
    parameter-detached copies of the transforms, called only when needed) the
    log-density carries gradient only along the sampling path, whose variance
    vanishes as the guide approaches the posterior: for its own draws through
    the score :math:`\nabla_u \log q(u)` (see :func:`draw_with_score`), for
    any other value through an inverse pass of the detached copies.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        base: dist.Distribution,
        parts: Sequence[Transform],
        detached_parts: Callable[[], Sequence[Transform]] | None = None,
        batch_shape: torch.Size = torch.Size(),
    ) -> None:
        self.base = base
        self.parts = list(parts)
        self.detached_parts = detached_parts
        self._last: tuple[Tensor, Tensor, Tensor | None] | None = None
        super().__init__(batch_shape, base.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return FlowPosterior(self.base, self.parts, self.detached_parts, torch.Size(batch_shape))

    def rsample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[Tensor, Tensor]:
        eps = self.base.rsample(torch.Size(sample_shape) + self.batch_shape)
        if self.detached_parts is not None and torch.is_grad_enabled():
            u, log_q, score = draw_with_score(self.parts, self.base, eps)
        else:
            u, ladj = forward_with_ladj(self.parts, eps)
            log_q, score = self.base.log_prob(eps) - ladj, None
        self._last = (u, log_q, score)
        return u, log_q

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    @property
    def mean(self) -> Tensor:
        raise NotImplementedError(_no_closed_form("mean"))

    @property
    def variance(self) -> Tensor:
        raise NotImplementedError(_no_closed_form("variance"))

    def log_prob(self, value: Tensor) -> Tensor:
        last = self._last
        if last is not None and last[0] is value:
            u, log_q, score = last
            if score is None:
                return log_q
            # The value of log q(u); the gradient of log q with its parameters
            # held fixed, taken along the path u(theta) only.
            return log_q.detach() + ((u - u.detach()) * score).sum(-1)
        parts = self.parts if self.detached_parts is None else self.detached_parts()
        eps, ladj = inverse_with_ladj(parts, value)
        return self.base.log_prob(eps) - ladj


def _no_closed_form(moment: str) -> str:
    return (
        f"a flow's {moment} has no closed form; estimate it from draws (guide.get_posterior().rsample((n,)) "
        "or guide.sample_posterior(n)), or use guide.quantiles(...) for each site"
    )


def unit_tril(raw: Tensor, row_scaled: bool = False) -> Tensor:
    r"""The unit lower-triangular factor whose strict lower triangle is ``raw``'s (``transform_to(unit_lower_cholesky)``).

    With ``row_scaled``, row :math:`i` of that triangle is read at
    :math:`1/\sqrt{i}` (its fan-in, as the flow's layers are read at theirs;
    see :func:`~pyro_flowguide.guides.packing.fan_in_factor`): an optimiser
    step of lr on every entry of a row then changes the row's norm, and the
    spread it adds to that coordinate, by about lr, whatever the row's length.
    """
    low = raw.tril(-1)
    if row_scaled:
        low = low * row_scale(raw.shape[-1], raw)
    return low + _eye(raw.shape[-1], raw)


@functools.lru_cache(maxsize=32)
def _row_scale_of(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(n, dtype=dtype, device=device).clamp(min=1).rsqrt().unsqueeze(-1)


def row_scale(n: int, like: Tensor) -> Tensor:
    """``1/sqrt(max(i, 1))`` for row ``i``, as a column of ``like``'s dtype and device (made once)."""
    return _row_scale_of(n, like.dtype, like.device)


@functools.lru_cache(maxsize=32)
def _eye_of(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=dtype, device=device)


def _eye(n: int, like: Tensor) -> Tensor:
    """An identity matrix of ``like``'s dtype and device, made once (never written to)."""
    return _eye_of(n, like.dtype, like.device)


def detached_copy(flow: nn.Module, packing: Any, packed: Tensor) -> nn.Module:
    """A copy of ``flow`` whose parameters carry no gradient (linked to the live ones by :func:`relink`).

    ``packing`` (a :class:`~pyro_flowguide.guides.packing.Packing`) is unbound
    for the copy, since bound views hold a graph that deepcopy refuses, and
    bound to ``packed`` again after it.
    """
    packing.unbind(flow)
    shadow = copy.deepcopy(flow)
    packing.bind(packed, flow)
    shadow.__dict__.pop("_param_tuple", None)
    shadow.__dict__.pop("_flow_cache_clearers", None)
    for p in shadow.parameters():
        p.requires_grad_(False)
    return shadow


def relink(shadow: nn.Module, flow: nn.Module) -> None:
    """Points the copy's parameters at the storage of ``flow``'s where a parameter was replaced.

    Optimisers update parameters in place, so sharing storage keeps the copy
    current; only a load or ``.to()`` replaces one.
    """
    for mirror, live in zip(param_tuple(shadow), param_tuple(flow)):
        if mirror.data_ptr() != live.data_ptr() or mirror.shape != live.shape:
            mirror.data = live.data


def affine_parameters(init: Tensor, init_scale: float, covariance: str | None) -> list[tuple[str, Tensor]]:
    """The affine stage's initial parameters ``[(name, tensor)]``: ``loc``, ``log_scale``, ``loc_unit``, maybe ``scale_tril``.

    Scales are learned on the log scale (Adam's steps are then relative);
    the shift is ``loc * loc_unit``, where ``loc_unit`` is read without
    gradient and only :func:`set_location_unit` changes it (from one, so
    that the shift starts as ``init``); ``scale_tril``'s strictly lower
    triangle is that of ``L``. ``covariance`` ``None`` means full up to 200
    coordinates.
    """
    dim, dtype, device = init.shape[-1], init.dtype, init.device
    named = [
        ("loc", init),
        ("log_scale", torch.full((dim,), math.log(init_scale), dtype=dtype, device=device)),
        ("loc_unit", torch.ones(dim, dtype=dtype, device=device)),
    ]
    full = covariance == "full" or (covariance is None and dim <= 200)
    if full and dim > 1:
        named.append(("scale_tril", torch.eye(dim, dtype=dtype, device=device)))
    return named


def affine_shift(views: dict[str, Tensor]) -> Tensor:
    """The affine stage's shift: ``loc`` in units of ``loc_unit`` (a guide built before there was a unit: ``loc``)."""
    unit = views.get("loc_unit")
    return views["loc"] if unit is None else views["loc"] * unit.detach()


@torch.no_grad()
def write_affine_shift(views: dict[str, Tensor], shift: Tensor) -> None:
    """Sets the affine stage's shift to ``shift``: writes ``loc`` in units of the held ``loc_unit``."""
    unit = views.get("loc_unit")
    views["loc"].copy_(shift if unit is None else shift / unit)


@torch.no_grad()
def set_location_unit(views: dict[str, Tensor], unit: Tensor) -> None:
    """Writes the affine stage's shift in units of ``unit`` (per coordinate, positive); the shift is unchanged.

    An optimiser's step of a given size on ``loc`` then moves the shift by
    that many units: with the posterior's spread as the unit, a step of Adam
    at lr moves the shift by lr standard deviations, whatever the scale of the
    coordinate. No-op for a guide built before there was a unit.
    """
    held = views.get("loc_unit")
    if held is None:
        return
    shift = affine_shift(views).clone()
    held.copy_(unit)
    write_affine_shift(views, shift)


def affine_stage(views: dict[str, Tensor], row_scaled: bool = False, held: bool = False) -> TrilAffine:
    """The affine stage of the packed views ``views`` (its factor read as :func:`unit_tril` says).

    With ``held``, its scales and factor are read without gradient: only the
    shift trains (see :func:`holds_affine_scale`).
    """
    raw, log_scale = views.get("scale_tril"), views["log_scale"]
    if held:
        raw, log_scale = None if raw is None else raw.detach(), log_scale.detach()
    return TrilAffine(affine_shift(views), log_scale.exp(), None if raw is None else unit_tril(raw, row_scaled))


def holds_affine_scale(views: dict[str, Tensor]) -> bool:
    """Whether a kept Gaussian stage has set the location unit (then a guide with a flow holds its affine scale).

    The stage's scales and factor are then the posterior's Gaussian part, and
    the flow, whose affine layers can scale and shear too, shapes the rest.
    Trained together, the two trade scale along directions the ELBO does not
    see, and Adam at a large lr walks them until the fit collapses. The mark
    is the unit (not one), so every save path carries it.
    """
    unit = views.get("loc_unit")
    return unit is not None and bool((unit != 1).any())
