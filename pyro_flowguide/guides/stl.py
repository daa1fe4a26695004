r"""The score of a masked autoregressive flow's draw, in closed form (for sticking the landing).

For each draw :math:`y = f(\varepsilon)` through layers :math:`x_l = f_l(x_{l-1})`
the score :math:`\nabla_y \log q(y)` follows the draw through the layers,

.. math:: s_0 = -\varepsilon, \qquad
          s_l = J_l^{-\top}\bigl(s_{l-1} - \nabla_{x_{l-1}} \log|\det J_l|\bigr).

A Zuko masked autoregressive layer is :math:`y_i = \tau(x_i; \varphi_i)` with
:math:`\varphi = W_L \sigma(\cdots \sigma(W_1 x + b_1) \cdots) + b_L` (masked
weights, ReLU :math:`\sigma`), so

.. math:: J = \mathrm{diag}(\tau_x) + \tau_\varphi\, \Phi, \qquad
          \nabla_x \log|\det J| = \lambda_x + \Phi^\top \lambda_\varphi,

with :math:`\lambda = \log \tau_x`, element-wise derivatives of the affine or
rational-quadratic map and the network's Jacobian :math:`\Phi`: no graph is
needed. With Zuko's natural and reversed orders :math:`J` is triangular, so
each step is a triangular solve, and a spline layer runs as one autograd node
(:class:`_Spline`) whose backward pass uses the same derivatives.

:func:`made_layers` says whether a flow is made only of such layers (else the
guide takes the general route); :func:`draw_and_score` runs the draw and its score.

Example:
    >>> lazy = zuko.flows.MAF(3, hidden_features=(8,)).transform
    >>> y, ladj, score = draw_and_score(made_layers(lazy), torch.randn(4, 3))
    >>> score.shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._zuko import zuko

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
    if uni is _RQS and set(keywords) <= {"slope", "bound"} and len(shapes) == 3:
        (k1,), (k2,), (k3,) = shapes if all(len(s) == 1 for s in shapes) else ((0,), (0,), (0,))
        if k1 == k2 and k3 == k1 - 1 and k1 >= 2:
            return "rqs", {**_defaults(_RQS), **keywords}
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
    map applies them (Zuko's ``MaskedAutoregressiveTransform``), or ``None`` when any layer is of another kind (coupling,
    element-wise, residual or normalised networks, other activations or
    univariate maps): the caller then takes the general route. The constants
    include ``"triangle"``: ``"lower"`` or ``"upper"`` when the layer's
    Jacobian is triangular in the features' own order (Zuko's natural and
    reversed orders, with any number of passes), else ``None``.
    """
    layers = list(lazy.transforms) if isinstance(lazy, zuko.lazy.LazyComposedTransform) else [lazy]
    found = []
    for layer in layers:
        if type(layer) is not _MaskedAR or not _plain_made(layer.hyper):
            return None
        if layer.hyper.in_features != layer.hyper[-1].out_features // layer.total:
            return None  # a context input: not an unconditional layer
        kind = _univariate_kind(layer)
        if kind is None:
            return None
        name, const = kind
        found.append((layer, name, {**const, "triangle": _triangle(layer)}))
    return tuple(found)


def _triangle(layer: nn.Module) -> str | None:
    """``"lower"`` / ``"upper"`` if output ``i`` reads inputs ``j < i`` / ``j > i`` only, from the masks."""
    reach = None
    for m in list(layer.hyper)[::2]:
        mask = (m.mask != 0).to(torch.float64)
        reach = mask if reach is None else (mask @ reach).clamp_(max=1)
    d = reach.shape[-1]
    adjacency = reach.view(d, layer.total, d).amax(1) > 0  # [i, j]: y_i depends on x_j
    if not adjacency.triu().any():
        return "lower"
    if not adjacency.tril().any():
        return "upper"
    return None


# ---------------------------------------------------------------- the draw
def _layer_forward(layer: nn.Module, kind: str, const: dict, x: Tensor) -> tuple[Tensor, Tensor, tuple]:
    """Zuko's ``meta(x).call_and_ladj(x)`` step by step, keeping what the score needs.

    A spline layer's map runs as one :class:`_Spline` node, whose gradients
    are the derivatives that the score needs anyway (under tracing, which
    exports only torch operations, as Zuko's own operations).
    """
    h, saved = x, []
    mods = list(layer.hyper)
    for i in range(0, len(mods), 2):
        m = mods[i]
        weight = m.mask * m.weight
        h = F.linear(h, weight, m.bias)
        saved.append((h, weight))
        if i + 1 < len(mods):
            h = mods[i + 1](h)
    phi = h.unflatten(-1, (-1, layer.total))
    if kind == "rqs" and not torch.jit.is_tracing():
        found: list = []
        y, ladj = _Spline.apply(x, phi, layer, const, found)
        t = found[0]  # the spline's derivatives
    else:
        t = layer.univariate(*zuko.utils.unpack(phi, layer.shapes))
        y, ladj = t.call_and_ladj(x)
        if kind == "rqs":
            # Traced (a traced graph exports only torch operations): Zuko's own
            # spline under autograd, and its derivatives as plain tensors for the score.
            with torch.no_grad():
                d, p = phi.shape[-2:]
                t = _rqs_derivatives(t, _flat(x.detach(), d), phi.detach().reshape(-1, d, p), const)
    return y, ladj.sum(-1), (x, phi, t, saved)


class _Spline(torch.autograd.Function):
    r"""Zuko's spline :math:`y = \tau(x; \varphi)` and its log-slope :math:`\lambda`, with closed-form gradients.

    The values are those of Zuko's own operations. Each :math:`y_i` and
    :math:`\lambda_i` depends on :math:`x_i` and :math:`\varphi_i` only, so
    their gradients are element-wise products with :math:`\tau_x, \tau_\varphi,
    \lambda_x, \lambda_\varphi` (:func:`_rqs_derivatives`), which the score
    needs anyway: one node in the graph instead of the spline's hundred or so
    small operations, forward and backward. The derivatives are appended to
    ``found``. The node is differentiable once, as the losses need; for
    higher-order gradients through the guide's draws use
    ``estimator="reparam"``, which runs Zuko's operations under autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, layer: nn.Module, const: dict, found: list):
        t = layer.univariate(*zuko.utils.unpack(phi, layer.shapes))
        y, ladj = t.call_and_ladj(x)
        d, p = phi.shape[-2:]
        derivs = _rqs_derivatives(t, _flat(x, d), phi.reshape(-1, d, p), const)
        found.append(derivs)
        ctx.save_for_backward(*derivs)
        ctx.shapes = x.shape, phi.shape
        ctx.set_materialize_grads(False)
        return y, ladj

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_ladj: Tensor | None):
        tx, tp, lx, lp = ctx.saved_tensors
        grad_x = grad_phi = None
        for g, dx, dphi in ((grad_y, tx, tp), (grad_ladj, lx, lp)):
            if g is None:
                continue
            g = _flat(g, tx.shape[-1])
            gx, gp = g * dx, g.unsqueeze(-1) * dphi
            grad_x = gx if grad_x is None else grad_x + gx
            grad_phi = gp if grad_phi is None else grad_phi + gp
        if grad_x is None:
            return None, None, None, None, None
        x_shape, phi_shape = ctx.shapes
        grad_x = grad_x.view(x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_phi.view(phi_shape), None, None, None


def draw_and_score(
    layers: Sequence[tuple[nn.Module, str, dict]], eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(y, log|det J_f|, score)``: the draw ``y = f(eps)`` with its graph, and :math:`\nabla_y \log q(y)`.

    ``eps`` is a standard-normal draw (batch dims, then ``D``); the score is
    detached and uses the flow's base density only through :math:`-\varepsilon`.
    """
    x, acc, saved = eps, 0, []
    for layer, kind, const in layers:
        y, ladj, keep = _layer_forward(layer, kind, const, x)
        acc = acc + ladj
        saved.append((kind, const, keep))
        x = y
    with torch.no_grad():
        pieces = _all_pieces(saved, eps.shape[-1])
        score = -eps.detach().reshape(-1, eps.shape[-1])
        for (_, const, _), (jac, grad_ladj) in zip(saved, pieces):
            score = _solve_transposed(jac, score - grad_ladj, const["triangle"])
    return x, acc, score.reshape(eps.shape)


def _solve_transposed(jac: Tensor, rhs: Tensor, triangle: str | None) -> Tensor:
    r""":math:`J^{-\top} r` per draw; a triangular :math:`J` (see :func:`made_layers`) takes a triangular solve.

    A singular :math:`J` (a collapsed scale) gives a non-finite score, hence a
    non-finite gradient that fit's guard skips, not an exception.
    """
    if triangle is None:
        return torch.linalg.solve_ex(jac.mT, rhs.unsqueeze(-1))[0].squeeze(-1)
    # r^T J^{-1}: a solve from the right with J itself, no transposed copy
    upper = triangle == "upper"
    return torch.linalg.solve_triangular(jac, rhs.unsqueeze(-2), upper=upper, left=False).squeeze(-2)


# ------------------------------------------------------------ the pieces
def _all_pieces(saved: list, d: int) -> list[tuple[Tensor, Tensor]]:
    """``(J, grad_x log|det J|)`` per layer, batch dims flattened; call it under ``no_grad``.

    Each layer's rows with respect to its network's last hidden layer come
    first (affine layers with networks of one shape together, spline layers
    one by one); then every layer whose hidden layers have the same shapes is
    taken back to its input in one set of batched products.
    """
    heads: list = []  # (layer indices, rows, lrow, diag, per layer an extra grad or None)
    groups: dict = {}
    for i, (kind, const, keep) in enumerate(saved):
        if kind == "affine":
            key = (const["slope"], tuple(w.shape for _, w in keep[3]))
            groups.setdefault(key, []).append(i)
        else:
            heads.append(([i], *_rqs_heads(keep, d)))
    for (slope, _), members in groups.items():
        heads.append((members, *_affine_heads(slope, [saved[i][2] for i in members], d), [None] * len(members)))
    closing: dict = {}
    for head in heads:
        keep = saved[head[0][0]][2]
        key = (tuple(w.shape for _, w in keep[3][:-1]), keep[3][-1][1].shape[-1])
        closing.setdefault(key, []).append(head)
    out: list = [None] * len(saved)
    for members in closing.values():
        index = [i for head in members for i in head[0]]
        rows, lrow, diag = (torch.cat([head[k] for head in members]) for k in (1, 2, 3))
        jac, grad_ladj = _close(rows, lrow, [saved[i][2] for i in index], diag)
        extras = [e for head in members for e in head[4]]
        for g, (i, extra) in enumerate(zip(index, extras)):
            out[i] = (jac[g], grad_ladj[g] if extra is None else grad_ladj[g] + extra)
    return out


def _flat(v: Tensor, width: int) -> Tensor:
    return v.reshape(-1, width)


def _close(rows: Tensor, lrow: Tensor, keeps: list, diag: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(J, grad_x log|det J|)`` of a group of layers from their rows w.r.t. the last hidden layer.

    ``rows`` (``(G, N, D, H)``) are those of :math:`\partial y_i / \partial h`
    and ``lrow`` (``(G, N, 1, H)``) that of :math:`\sum_i \partial \lambda_i / \partial h`;
    ``diag`` (``(G, N, D)``) is :math:`\partial y_i / \partial x_i` through the
    univariate map's own argument.
    """
    m = _back_through_hidden(torch.cat((rows, lrow), -2), _hidden_stack(keeps))
    d = rows.shape[-2]
    jac = m[..., :d, :]
    jac.diagonal(0, -2, -1).add_(diag)
    return jac, m[..., d, :]


def _back_through_hidden(m: Tensor, nets: list[list]) -> Tensor:
    r"""``m`` (rows w.r.t. the last hidden layer, ``(G, N, R, H)``) taken back to the layer's input.

    ``nets`` holds, per hidden layer from the last to the first, the stacked
    pre-activations ``(G, N, H)`` and masked weights ``(G, H, H_in)``.
    """
    g, n, r, _ = m.shape
    for pre, weight in nets:
        # (G, N R, H) @ (G, H, H_in): one batched product for all G layers
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


def _affine_heads(slope: float, keeps: list, d: int) -> tuple[Tensor, Tensor, Tensor]:
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
    return rows, lrow, scale


def _rqs_heads(keep: tuple, d: int) -> tuple[Tensor, Tensor, Tensor, list]:
    _, phi, (tx, tp, lx, lp), nets = keep  # derivatives from _Spline
    p = phi.shape[-1]
    w_out = nets[-1][1]  # (D P, H)
    rows = (tp.transpose(0, 1) @ w_out.view(d, p, -1)).transpose(0, 1)  # (N, D, H), batched over i
    lrow = (lp.reshape(-1, d * p) @ w_out).view(1, -1, 1, w_out.shape[-1])
    return rows.unsqueeze(0), lrow, tx.unsqueeze(0), [lx]


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
    k = (table[..., 0, :] < x.unsqueeze(-1)).sum(-1) - 1  # Zuko's bin search
    inside = (k >= 0) & (k < bins)
    k = (k % bins).unsqueeze(-1)
    # x, y and slope (rows) at knots k and k + 1 (columns)
    ends = table.gather(-1, torch.cat((k, k + 1), -1).unsqueeze(-2).expand(n, d, 3, 2))
    (x0, y0, d0), (x1, y1, d1) = (v.unbind(-1) for v in ends.unbind(-1))
    w, h = x1 - x0, y1 - y0
    s = h / w
    xi = inside * (x - x0) / w  # 0 outside the bins, so that r = 0 there
    om, xi2 = 1 - xi, xi * xi
    om2, q, lin = om * om, xi * om, om - xi
    s2, c = 2 * s, d0 + d1 - 2 * s
    iden = (s + c * q).reciprocal()
    ia = (s2 * q + d0 * om2 + d1 * xi2).reciprocal()
    r = (s * xi2 + d0 * q) * iden
    a, rq, qden2, one_2q = iden * h, r * q, 2 * q * iden, 1 - 2 * q
    # The spline (first four) and its log-slope (last four), w.r.t. xi, s, d0, d1;
    # zero outside the bins, where the map is the identity.
    f_xi, f_s, f_d0, f_d1 = (torch.stack((
        (s2 * xi + (d0 - r * c) * lin) * a,
        (xi2 - r * one_2q) * a,
        (q - rq) * a,
        -rq * a,
        2 * ((s * lin - d0 * om + d1 * xi) * ia - c * lin * iden),
        2 / s + 2 * (q * ia - one_2q * iden),
        om2 * ia - qden2,
        xi2 * ia - qden2,
    )).view(2, 4, n, d) * inside).unbind(1)
    # To the knots: xi = (x - x0) / w, s = h / w, w = x1 - x0, h = y1 - y0; and
    # y = y0 + h r, so y reads y0 and y1 directly as well.
    f_x = f_xi / w
    f_x1 = -(f_xi * xi + f_s * s) / w
    f_y1 = f_s / w
    f_y1[0] += r
    f_y0 = -f_y1
    f_y0[0] += inside
    # To the raw widths and heights (the last dim: x then y): the bounded
    # softmax and the cumulative sum give, per knot, 2B p_j ([j < knot] - C_knot).
    j = torch.arange(bins, device=x.device)
    below, at = j < k, j == k  # [j < k], [j = k]
    f0 = torch.stack((-f_x1 - f_x, f_y0), -1)  # w.r.t. x0, y0
    f1 = torch.stack((f_x1, f_y1), -1)  # w.r.t. x1, y1
    cum = (ends[..., :2, :] / bound + 1) / 2  # C at knots k, k + 1, from x_k = B (2 C_k - 1)
    shift = (f0 * cum[..., 0] + f1 * cum[..., 1]).unsqueeze(-1)
    g_wh = (f0 + f1).unsqueeze(-1) * below.unsqueeze(-2) + f1.unsqueeze(-1) * at.unsqueeze(-2) - shift
    ls = -math.log(slope)
    raw_wh = phi[..., : 2 * bins].view(n, d, 2, bins)
    g_wh = g_wh * ((table[..., :2, 1:] - table[..., :2, :-1]) * _soft_clamp_slope(raw_wh, ls / 2))
    # Interior slope j + 1 = exp(bounded raw_d[j]); bin k uses slopes k and k + 1.
    g_d = (f_d0 * d0).unsqueeze(-1) * at[..., 1:] + (f_d1 * d1).unsqueeze(-1) * at[..., :-1]
    g_d = g_d * _soft_clamp_slope(phi[..., 2 * bins :], ls)
    grads = torch.cat((g_wh.view(2, n, d, 2 * bins), g_d), -1)  # (2, N, D, P)
    tx = torch.where(inside, f_x[0], 1.0)
    return tx, grads[0], f_x[1], grads[1]
