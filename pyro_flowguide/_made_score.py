r"""The score of a masked autoregressive flow's draw, in closed form.

Sticking the landing needs, for each draw :math:`y = f(\varepsilon)`, the score
:math:`\nabla_y \log q(y)`. For a composition of layers
:math:`x_l = f_l(x_{l-1})` it follows the draw through the layers,

.. math:: s_0 = -\varepsilon, \qquad
          s_l = J_l^{-\top}\bigl(s_{l-1} - \nabla_{x_{l-1}} \log|\det J_l|\bigr),

with :math:`J_l = \partial x_l / \partial x_{l-1}`. The general route
(``guides._draw_with_batched_score``) gets every :math:`J_l` from one backward pass
batched over the :math:`D + 1` output directions, which at the sizes of
typical posteriors costs more than the draw itself: each of the flow's small
operations is run again under ``vmap``.

For Zuko's masked autoregressive layers the pieces have a closed form. A
layer is :math:`y_i = \tau(x_i; \varphi_i)` with :math:`\varphi = W_L
\sigma(\cdots \sigma(W_1 x + b_1) \cdots) + b_L` (masked weights, ReLU
:math:`\sigma`; :class:`~pyro_flowguide.flows.BoundedInputMAT` reads
:math:`B \tanh(x / B)` in place of :math:`x`, one more element-wise factor), so

.. math:: J = \mathrm{diag}(\tau_x) + \tau_\varphi\, \Phi, \qquad
          \nabla_x \log|\det J| = \lambda_x + \Phi^\top \lambda_\varphi,

where :math:`\lambda = \log \tau_x`, the derivatives of :math:`\tau` and
:math:`\lambda` are element-wise (written out below for the affine and the
rational-quadratic maps), and the network's Jacobian :math:`\Phi = W_L
\mathrm{diag}(\sigma') \cdots W_1` is a few small matrix products. None of it
needs a graph: the draw keeps its graph for the loss, and the score is a
constant of the step.

:func:`made_layers` says whether a flow is made only of such layers (else the
guide keeps the general route); :func:`draw_and_score` runs the draw (the same
operations as Zuko's, so the same values) and returns the score.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._zuko import zuko
from .flows import BoundedInputMAT, ScaledSpline

__all__ = ["draw_and_score", "made_layers"]

_MaskedAR = zuko.flows.MaskedAutoregressiveTransform
_Affine = zuko.transforms.MonotonicAffineTransform
_RQS = zuko.transforms.MonotonicRQSTransform


def _defaults(cls: type) -> dict:
    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _univariate_kind(layer: nn.Module) -> tuple[str, dict] | None:
    """``("affine" | "rqs", constants)`` for the element-wise maps written out here."""
    uni = layer.univariate
    keywords: dict = {}
    if isinstance(uni, functools.partial) and not uni.args:
        uni, keywords = uni.func, dict(uni.keywords)
    shapes = [tuple(s) for s in layer.shapes]
    if uni is _Affine and shapes == [(), ()] and set(keywords) <= {"slope"}:
        return "affine", {**_defaults(_Affine), **keywords}
    scale = 1.0
    if type(uni) is ScaledSpline:  # SplineMAF's spline of scaled raw parameters
        uni, scale, keywords = _RQS, uni.scale, {"slope": uni.slope}
    if uni is _RQS and set(keywords) <= {"slope", "bound"} and len(shapes) == 3:
        (k1,), (k2,), (k3,) = shapes if all(len(s) == 1 for s in shapes) else ((0,), (0,), (0,))
        if k1 == k2 and k3 == k1 - 1 and k1 >= 2:
            return "rqs", {**_defaults(_RQS), **keywords, "scale": scale}
    return None


def _plain_made(net: nn.Module) -> bool:
    """A ``MaskedMLP`` of masked linear layers with ReLU between them."""
    if type(net) is not zuko.nn.MaskedMLP:
        return False
    mods = list(net)
    if not mods or len(mods) % 2 == 0:
        return False
    linear = all(type(m) is zuko.nn.MaskedLinear for m in mods[::2])
    relu = all(type(m) is nn.ReLU for m in mods[1::2])
    return linear and relu and all(m.bias is not None for m in mods[::2])


def made_layers(lazy: nn.Module) -> tuple[tuple[nn.Module, str, dict], ...] | None:
    """The layers of an unconditional Zuko flow transform, if all are written out here.

    Returns ``(layer, kind, constants)`` per layer in the order the normalising
    map applies them (Zuko's ``MaskedAutoregressiveTransform`` or
    :class:`~pyro_flowguide.flows.BoundedInputMAT`), or ``None`` when any layer is of another kind (coupling,
    element-wise, residual or normalised networks, other activations or
    univariate maps): the caller then takes the general route.
    """
    layers = list(lazy.transforms) if isinstance(lazy, zuko.lazy.LazyComposedTransform) else [lazy]
    found = []
    for layer in layers:
        if type(layer) not in (_MaskedAR, BoundedInputMAT) or not _plain_made(layer.hyper):
            return None
        if layer.hyper.in_features != layer.hyper[-1].out_features // layer.total:
            return None  # a context input: not an unconditional layer
        kind = _univariate_kind(layer)
        if kind is None:
            return None
        found.append((layer, *kind))
    return tuple(found)


# ---------------------------------------------------------------- the draw
def _layer_forward(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, tuple]:
    """Zuko's ``meta(x).call_and_ladj(x)`` step by step, keeping what the score needs."""
    bound = getattr(layer, "input_bound", None)  # BoundedInputMAT's network reads B tanh(x / B)
    if bound is None:
        h, squash = x, None
    else:
        th = torch.tanh(x / bound)
        h = bound * th
        squash = (1 - th * th).detach()
    saved = []
    mods = list(layer.hyper)
    for i in range(0, len(mods), 2):
        m = mods[i]
        weight = m.mask * m.weight
        h = F.linear(h, weight, m.bias)
        saved.append((h, weight))
        if i + 1 < len(mods):
            h = mods[i + 1](h)
    phi = h.unflatten(-1, (-1, layer.total))
    t = layer.univariate(*zuko.utils.unpack(phi, layer.shapes))
    y, ladj = t.call_and_ladj(x)
    return y, ladj.sum(-1), (x, phi, t, saved, squash)


def draw_and_score(
    layers: Sequence[tuple[nn.Module, str, dict]], eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(y, log|det J_f|, score)``: the draw ``y = f(eps)`` with its graph, and :math:`\nabla_y \log q(y)`.

    ``eps`` is a standard-normal draw (batch dims, then ``D``); the score is
    detached and uses the flow's base density only through :math:`-\varepsilon`.
    """
    x, acc, saved = eps, 0, []
    for layer, kind, const in layers:
        y, ladj, keep = _layer_forward(layer, x)
        acc = acc + ladj
        saved.append((kind, const, keep))
        x = y
    with torch.no_grad():
        pieces = _all_pieces(saved, eps.shape[-1])
        score = -eps.detach().reshape(-1, eps.shape[-1])
        for jac, grad_ladj in pieces:
            rhs = (score - grad_ladj).unsqueeze(-1)
            # A singular J (a collapsed scale) gives a non-finite score, hence
            # a non-finite gradient that fit's guard skips, not an exception.
            score = torch.linalg.solve_ex(jac.mT, rhs)[0].squeeze(-1)
    return x, acc, score.reshape(eps.shape)


# ------------------------------------------------------------ the pieces
def _all_pieces(saved: list, d: int) -> list[tuple[Tensor, Tensor]]:
    """``(J, grad_x log|det J|)`` per layer, batch dims flattened; call it under ``no_grad``.

    Affine layers with networks of one shape are done together (one set of
    small operations for all of them), spline layers one by one.
    """
    out: list = [None] * len(saved)
    groups: dict = {}
    for i, (kind, const, keep) in enumerate(saved):
        if kind == "affine":
            key = (const["slope"], tuple(w.shape for _, w in keep[3]), keep[4] is None)
            groups.setdefault(key, []).append(i)
        else:
            out[i] = _rqs_pieces(const, keep, d)
    for (slope, _, _), members in groups.items():
        for i, piece in zip(members, _affine_pieces(slope, [saved[i][2] for i in members], d)):
            out[i] = piece
    return out


def _flat(v: Tensor, width: int) -> Tensor:
    return v.reshape(-1, width)


def _close(rows: Tensor, lrow: Tensor, keeps: list, diag: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(J, grad_x log|det J|)`` of a group of layers from their rows w.r.t. the last hidden layer.

    ``rows`` (``(G, N, D, H)``) are those of :math:`\partial y_i / \partial h`
    and ``lrow`` (``(G, N, 1, H)``) that of :math:`\sum_i \partial \lambda_i / \partial h`;
    ``diag`` (``(G, N, D)``) is :math:`\partial y_i / \partial x_i` through the
    univariate map's own argument. A network that reads :math:`B \tanh(x / B)`
    (:class:`~pyro_flowguide.flows.BoundedInputMAT`) adds the factor
    :math:`1 - \tanh^2(x / B)` per input.
    """
    m = _back_through_hidden(torch.cat((rows, lrow), -2), _hidden_stack(keeps))
    d = rows.shape[-2]
    if keeps[0][4] is not None:
        m = m * torch.stack([_flat(k[4], d) for k in keeps]).unsqueeze(-2)
    return m[..., :d, :] + torch.diag_embed(diag), m[..., d, :]


def _back_through_hidden(m: Tensor, nets: list[list]) -> Tensor:
    r"""``m`` (rows w.r.t. the last hidden layer, ``(G, N, R, H)``) taken back to the layer's input.

    ``nets`` holds, per hidden layer from the last to the first, the stacked
    pre-activations ``(G, N, H)`` and masked weights ``(G, H, H_in)``.
    """
    g, n, r, _ = m.shape
    for pre, weight in nets:
        # (G, N R, H) @ (G, H, H_in): one batched product, no copies of the weights
        m = ((m * (pre > 0).unsqueeze(-2)).view(g, n * r, -1) @ weight).view(g, n, r, -1)
    return m


def _hidden_stack(keeps: list) -> list:
    """Per hidden layer (last first): pre-activations and weights of every layer in ``keeps``, stacked."""
    depth = len(keeps[0][3]) - 1
    out = []
    for h in range(depth - 1, -1, -1):
        layer = [k[3][h] for k in keeps]  # (pre-activation, masked weight) of hidden layer h
        pre = torch.stack([_flat(p, p.shape[-1]) for p, _ in layer])
        out.append((pre, torch.stack([w for _, w in layer])))
    return out


def _affine_pieces(slope: float, keeps: list, d: int) -> list[tuple[Tensor, Tensor]]:
    r"""Zuko's :math:`y = x e^{a} + b` (``a`` the bounded log-scale), for a group of layers.

    :math:`\partial y_i / \partial b_i = 1`, :math:`\partial y_i / \partial a^{raw}_i
    = x_i e^{a_i} a'_i` and :math:`\lambda_i = a_i`, with :math:`a' = (1 + |a^{raw}| / c)^{-2}`.
    """
    x = torch.stack([_flat(k[0], d) for k in keeps])  # (G, N, D)
    raw = torch.stack([_flat(k[1][..., 1], d) for k in keeps])
    scale = torch.stack([_flat(k[2].scale, d) for k in keeps])
    w_out = torch.stack([k[3][-1][1] for k in keeps]).unflatten(1, (d, 2))  # (G, D, 2, H)
    da = _soft_clamp_slope(raw, -math.log(slope))
    # Rows of d y_i / d h (h: the last hidden layer), and of sum_i d lambda_i / d h.
    rows = w_out[:, None, :, 0, :] + (x * scale * da).unsqueeze(-1) * w_out[:, None, :, 1, :]
    lrow = (da @ w_out[:, :, 1, :]).unsqueeze(-2)  # (G, N, 1, H)
    jac, grad_ladj = _close(rows, lrow, keeps, scale)
    return list(zip(jac.unbind(0), grad_ladj.unbind(0)))


def _rqs_pieces(const: dict, keep: tuple, d: int) -> tuple[Tensor, Tensor]:
    x, phi, t, nets, _ = keep
    p = phi.shape[-1]
    # The spline reads scale * phi: derivatives in its raw parameters, times scale.
    scale = const["scale"]
    tx, tp, lx, lp = _rqs_derivatives(t, _flat(x, d), scale * phi.reshape(-1, d, p), const)
    tp, lp = scale * tp, scale * lp
    w_out = nets[-1][1]  # (D P, H)
    rows = (tp.transpose(0, 1) @ w_out.view(d, p, -1)).transpose(0, 1)  # (N, D, H), batched over i
    lrow = (lp.reshape(-1, d * p) @ w_out).view(1, -1, 1, w_out.shape[-1])
    jac, grad_ladj = _close(rows.unsqueeze(0), lrow, [keep], tx.unsqueeze(0))
    return jac[0], grad_ladj[0] + lx


def _soft_clamp_slope(raw: Tensor, scale: float) -> Tensor:
    # Zuko bounds raw parameters with u / (1 + |u| / c); its derivative is 1 / (1 + |u| / c)^2.
    return (1 + raw.abs() / scale).pow(-2)


def _rqs_derivatives(t, x: Tensor, phi: Tensor, const: dict):
    r"""Derivatives of Zuko's monotonic rational-quadratic spline and of its log-slope.

    In bin :math:`k` (knots :math:`x_k, x_{k+1}`, :math:`y_k, y_{k+1}`, slopes
    :math:`d_k, d_{k+1}`) with :math:`w = x_{k+1} - x_k`, :math:`h = y_{k+1} - y_k`,
    :math:`s = h / w`, :math:`\xi = (x - x_k) / w`, :math:`q = \xi (1 - \xi)`:

    .. math:: y = y_k + h\, \frac{s \xi^2 + d_k q}{s + (d_k + d_{k+1} - 2s) q}, \qquad
              \lambda = \log \frac{s^2 \bigl(2 s q + d_k (1-\xi)^2 + d_{k+1} \xi^2\bigr)}
                             {\bigl(s + (d_k + d_{k+1} - 2s) q\bigr)^2}.

    The knots come from the raw parameters through a bounded softmax and a
    cumulative sum (:math:`x_k = B (2 C_k - 1)`, :math:`C_k = \sum_{m<k} p_m`,
    so :math:`\partial x_k / \partial w'_j = 2 B p_j ([j < k] - C_k)`), the
    interior slopes through a bounded exponential. Outside :math:`[-B, B]` the
    map is the identity. Returns :math:`\tau_x, \tau_\varphi, \lambda_x,
    \lambda_\varphi` with batch dims flattened (``x``: ``(N, D)``).
    """
    bound, slope = float(const["bound"]), const["slope"]
    n, d = x.shape
    table = torch.stack((t.horizontal, t.vertical, t.derivatives), -2).reshape(n, d, 3, -1)
    bins = table.shape[-1] - 1
    knots_x = table[..., 0, :]
    k = (knots_x < x.unsqueeze(-1)).sum(-1) - 1  # Zuko's bin search
    mask = (k >= 0) & (k < bins)
    k = k % bins
    idx = torch.stack((k, k + 1), -1).unsqueeze(-2).expand(n, d, 3, 2)
    (x0, x1), (y0, y1), (d0, d1) = (v.unbind(-1) for v in table.gather(-1, idx).unbind(-2))
    w, h = x1 - x0, y1 - y0
    s = h / w
    xi = mask * (x - x0) / w
    om = 1 - xi
    xi2, q, lin = xi * xi, xi * om, 1 - 2 * xi
    c = d0 + d1 - 2 * s
    iden = 1 / (s + c * q)
    ia = 1 / (2 * s * q + d0 * om * om + d1 * xi2)
    r = (s * xi2 + d0 * q) * iden
    qden, qa = q * iden, q * ia
    # The spline (row 0) and its log-slope (row 1), w.r.t. xi, s, d0, d1.
    f_xi = torch.stack(((2 * s * xi + d0 * lin - r * c * lin) * iden * h,
                        2 * (s * lin - d0 * om + d1 * xi) * ia - 2 * c * lin * iden))
    f_s = torch.stack(((xi2 - r * (1 - 2 * q)) * iden * h, 2 / s + 2 * qa - 2 * (1 - 2 * q) * iden))
    f_d0 = torch.stack(((1 - r) * qden * h, om * om * ia - 2 * qden))
    f_d1 = torch.stack((-r * qden * h, xi2 * ia - 2 * qden))
    # To the knots: xi = (x - x0) / w, s = h / w, w = x1 - x0, h = y1 - y0.
    f_x = f_xi / w
    f_x1 = -(f_xi * xi + f_s * s) / w
    f_x0 = -f_x1 - f_x
    unit = torch.stack((torch.ones_like(r), torch.zeros_like(r)))
    f_y1 = f_s / w + unit * r
    f_y0 = unit - f_y1
    # To the raw parameters: widths and heights through the bounded softmax and
    # the cumulative sum, interior slopes through the bounded exponential.
    j = torch.arange(bins, device=x.device)
    below = (j < k.unsqueeze(-1)).to(x.dtype)  # [j < k]
    at = (j == k.unsqueeze(-1)).to(x.dtype)  # [j = k]
    ls = -math.log(slope)

    def to_raw(knots: Tensor, c0: Tensor, c1: Tensor, f0: Tensor, f1: Tensor, raw: Tensor) -> Tensor:
        # sum over the bin's two knots of f * 2B p_j ([j < knot] - C_knot)
        g = (f0 + f1).unsqueeze(-1) * below + f1.unsqueeze(-1) * at - (f0 * c0 + f1 * c1).unsqueeze(-1)
        return g * (knots[..., 1:] - knots[..., :-1]) * _soft_clamp_slope(raw, ls / 2)

    cum = lambda v: (v / bound + 1) / 2  # noqa: E731  C_k from the knot x_k = B (2 C_k - 1)
    g_w = to_raw(knots_x, cum(x0), cum(x1), f_x0, f_x1, phi[..., :bins])
    g_h = to_raw(table[..., 1, :], cum(y0), cum(y1), f_y0, f_y1, phi[..., bins : 2 * bins])
    # Interior slope j + 1 = exp(bounded raw_d[j]); bin k uses slopes k and k + 1.
    at0, at1 = at[..., 1:], at[..., :-1]  # [j + 1 = k], [j = k]
    g_d = ((f_d0 * d0).unsqueeze(-1) * at0 + (f_d1 * d1).unsqueeze(-1) * at1)
    g_d = g_d * _soft_clamp_slope(phi[..., 2 * bins :], ls)
    grads = torch.cat((g_w, g_h, g_d), -1) * mask.unsqueeze(-1)  # (2, N, D, P)
    tx = torch.where(mask, f_x[0], torch.ones_like(x))
    return tx, grads[0], f_x[1] * mask, grads[1]
