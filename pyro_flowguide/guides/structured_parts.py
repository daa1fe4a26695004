r"""The parts of :class:`~pyro_flowguide.guides.structured.AutoStructuredFlowGuide`.

* :class:`GlobalStage`: the globals' posterior :math:`u = \mu + \sigma \odot L f(\varepsilon)`.
* :class:`SiteStage`: one plated or chain site: a per-member affine stage, a
  shift and scale given the globals from a network shared by the site's
  members (:class:`SharedAffine`), a coupling to the globals, and along a chain
  an ARMA(1,1) filter evaluated by :func:`ar1_scan`.

Every part starts at the identity, so at initialisation the guide is a
mean-field Gaussian around the initial values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn import functional as F

from .flow_guide import build_flow
from .posterior import forward_with_ladj

__all__ = [
    "LOG_SCALE_BOUND",
    "MAX_DENSE_CHAIN",
    "MAX_TRIL_EVENT",
    "GlobalStage",
    "SharedAffine",
    "SiteStage",
    "ar1_scan",
    "chain_groups",
    "site_stages",
]

#: The shared network changes a member's scale by at most a factor ``exp(LOG_SCALE_BOUND)`` either way.
LOG_SCALE_BOUND = 3.0

#: Members of at most this many unconstrained coordinates get a unit lower-triangular factor of their own.
MAX_TRIL_EVENT = 16

#: A chain of at most this many elements also gets a dense unit lower-triangular factor over them
#: (at most about 100,000 parameters: the fixed part of the size budget).
MAX_DENSE_CHAIN = 447


def ar1_scan(a: Tensor, z: Tensor) -> Tensor:
    """``x_t = a_t x_{t-1} + z_t`` along the last dimension (``x_0 = z_0``), by a parallel prefix scan.

    ``ceil(log2 T)`` vectorised passes, each of cost ``O(T)``; differentiable.

    Arguments:
        a: The coefficients, broadcastable to ``z`` (``a[..., 0]`` is not used).
        z: The inputs, shape ``(..., T)``.

    Example:
        >>> ar1_scan(torch.tensor([0.0, 0.5, 0.5]), torch.ones(3))
        tensor([1.0000, 1.5000, 1.7500])
    """
    length = z.shape[-1]
    coef = F.pad(a.expand(z.shape)[..., 1:], (1, 0))  # nothing before the first element
    x, step = z, 1
    while step < length:
        x = x + coef * F.pad(x[..., :-step], (step, 0))
        coef = coef * F.pad(coef[..., :-step], (step, 0))
        step *= 2
    return x


def _strict_tril(raw: Tensor, index: Tensor, size: int) -> Tensor:
    """The strictly lower triangle of ``size x size`` matrices (batched over ``raw``'s leading dims)."""
    strict = raw.new_zeros(raw.shape[:-1] + (size, size))
    strict[..., index[0], index[1]] = raw
    return strict


class SharedAffine(PyroModule):
    """``(t, s) = MLP(g_r, e_i)``: the shift and log-scale of member ``i`` under draw ``r``, one network per site.

    The input is the globals' draw ``g_r`` and the member's embedding ``e_i``;
    the first layer is applied to each separately (``W [g, e] = W_g g + W_e e``),
    so it costs ``R + N`` rows, not ``R N``. One hidden layer of width
    ``hidden`` (SiLU), a zeroed output layer (``t = s = 0`` at initialisation),
    ``s`` bounded by :data:`LOG_SCALE_BOUND`.

    Arguments:
        glob: Size of the globals' draw.
        member: Size of each member's embedding.
        event: Coordinates per member.
        hidden: Width of the hidden layer.
    """

    def __init__(self, glob: int, member: int, event: int, hidden: int) -> None:
        super().__init__()
        first = nn.Linear(glob + member, hidden)
        self.event = event
        self.w_glob = nn.Parameter(first.weight.detach()[:, :glob].clone())
        self.w_member = nn.Parameter(first.weight.detach()[:, glob:].clone())
        self.b_in = nn.Parameter(first.bias.detach().clone())
        self.w_out = nn.Parameter(torch.zeros(2 * event, hidden))
        self.b_out = nn.Parameter(torch.zeros(2 * event))

    def forward(self, member: Tensor, glob: Tensor) -> tuple[Tensor, Tensor]:
        """``member (N, C)``, ``glob (R, G)`` -> shift ``t`` and log-scale ``s``, each ``(R, N, E)``."""
        h = F.linear(member, self.w_member, self.b_in) + F.linear(glob, self.w_glob).unsqueeze(-2)
        out = F.linear(F.silu(h), self.w_out, self.b_out)
        t, s = out[..., : self.event], out[..., self.event :]
        return t, LOG_SCALE_BOUND * torch.tanh(s / LOG_SCALE_BOUND)


class GlobalStage(PyroModule):
    r"""The globals' posterior: :math:`u = \mu + \sigma \odot L f(\varepsilon)`, :math:`L` unit lower-triangular.

    Arguments:
        init: The initial unconstrained values of the globals, flattened, shape ``(D,)``.
        init_scale: The initial :math:`\sigma`.
        flow: ``None`` (no :math:`f`: a full-rank Gaussian) or any ``flow`` that
            :class:`~pyro_flowguide.AutoFlowGuide` accepts, built at the identity
            in its one-pass sampling direction with that guide's default sizes.
    """

    def __init__(self, init: Tensor, init_scale: float, flow: Any = None) -> None:
        super().__init__()
        dim = init.numel()
        self.dim = dim
        self.loc = nn.Parameter(init.detach().reshape(dim).clone())
        self.log_scale = nn.Parameter(torch.full_like(self.loc.detach(), math.log(init_scale)))
        if dim > 1:
            self.tril = nn.Parameter(init.new_zeros(dim * (dim - 1) // 2))
            self.register_buffer("tril_index", torch.tril_indices(dim, dim, -1), persistent=False)
        self.has_flow = flow is not None
        if self.has_flow:
            self.flow = build_flow(flow, dim, {}).to(dtype=init.dtype, device=init.device)

    def forward(self, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``eps (R, D)`` -> ``u (R, D)``, the standardised draw ``L f(eps)`` and ``log|du/deps|`` ``(R,)``."""
        z, ladj = eps, eps.new_zeros(eps.shape[:-1])
        if self.has_flow:
            flow = self.flow  # read through the PyroModule: registers the flow with the param store
            z, flow_ladj = forward_with_ladj(list(flow) if isinstance(flow, nn.ModuleList) else [flow], eps)
            ladj = ladj + flow_ladj
        if self.dim > 1:
            z = z + z @ _strict_tril(self.tril, self.tril_index, self.dim).mT
        log_scale = self.log_scale
        return self.loc + log_scale.exp() * z, z, ladj + log_scale.sum()


class SiteStage(PyroModule):
    r"""The posterior of one plated site (``N`` members of ``E`` coordinates) or one chain, given the globals.

    Member :math:`i` draws :math:`z_i = L_i (\varepsilon_i \odot e^{s_i})` and
    :math:`u_i = \mu_i + \sigma_i \odot z_i + t_i + B_i g`, where :math:`(t_i, s_i)`
    come from the site's :class:`SharedAffine` at the globals' standardised draw
    :math:`g` and the member's learned embedding :math:`e_i` (initially its
    standardised initial value), :math:`L_i` is unit lower-triangular (for
    ``1 < E <=`` :data:`MAX_TRIL_EVENT`) and :math:`B_i` a linear coupling to the
    globals. A chain (``kind="chain"``, ``E = 1``) filters :math:`z` along its
    members first: :math:`x_t = a_t x_{t-1} + z_t` (:math:`a_t = \tanh \alpha_t`),
    then :math:`z_t \leftarrow x_t + b_t x_{t-1}`, and a chain of at most
    :data:`MAX_DENSE_CHAIN` elements is then multiplied by a dense unit
    lower-triangular factor (any correlation between its elements, as a
    vector of regression coefficients has). Every map but the two
    scalings has a unit-triangular Jacobian, so
    :math:`\log|\det| = \sum \log\sigma_i + \sum s_i`. Without globals there
    is no network and no coupling (:math:`t = s = 0`).

    The network reads an embedding of its own rather than :math:`\mu_i` and
    :math:`\sigma_i`: fed to it, they would also be trained as its inputs, and
    the large gradients of the shift pull the scales away from the posterior's.

    Arguments:
        kind: ``"local"`` or ``"chain"``.
        init: Initial unconstrained values, shape ``(N, E)``.
        init_scale: Initial :math:`\sigma`.
        glob: Size of the globals' draw :math:`g` (0: no globals).
        hidden: Width of the shared network.
    """

    def __init__(self, kind: str, init: Tensor, init_scale: float, glob: int, hidden: int) -> None:
        super().__init__()
        if kind not in ("local", "chain"):
            raise ValueError(f"kind must be 'local' or 'chain', got {kind!r}")
        members, event = init.shape
        self.kind, self.members, self.event, self.glob = kind, members, event, glob
        init = init.detach()
        self.loc = nn.Parameter(init.clone())
        self.log_scale = nn.Parameter(torch.full_like(init, math.log(init_scale)))
        self.has_tril = 1 < event <= MAX_TRIL_EVENT
        if self.has_tril:
            self.tril = nn.Parameter(init.new_zeros(members, event * (event - 1) // 2))
            self.register_buffer("tril_index", torch.tril_indices(event, event, -1), persistent=False)
        if kind == "chain":
            self.ar = nn.Parameter(init.new_zeros(members * event))
            self.ma = nn.Parameter(init.new_zeros(members * event))
        self.dense = kind == "chain" and 1 < members * event <= MAX_DENSE_CHAIN
        if self.dense:
            size = members * event
            self.chain_tril = nn.Parameter(init.new_zeros(size * (size - 1) // 2))
            self.register_buffer("chain_index", torch.tril_indices(size, size, -1), persistent=False)
        if glob:
            self.coupling = nn.Parameter(init.new_zeros(members * event, glob))
            spread = (init - init.mean(0)) / (init.std(0) + 1e-6) if members > 1 else torch.zeros_like(init)
            self.embed = nn.Parameter(torch.cat([spread, torch.zeros_like(init)], -1))
            self.shared = SharedAffine(glob, 2 * event, event, hidden).to(dtype=init.dtype, device=init.device)

    def forward(self, eps: Tensor, glob: Tensor | None) -> tuple[Tensor, Tensor]:
        """``eps (R, N, E)``, ``glob (R, G)`` (``None`` without globals) -> ``u (R, N, E)``, ``log|du/deps|`` ``(R, N)``."""
        log_scale = self.log_scale
        z, ladj = eps, log_scale.sum(-1)
        if self.glob:
            shift, s = self.shared(self.embed, glob)
            z, ladj = eps * s.exp(), ladj + s.sum(-1)
        if self.has_tril:
            z = z + (_strict_tril(self.tril, self.tril_index, self.event) @ z.unsqueeze(-1)).squeeze(-1)
        if self.kind == "chain":
            flat = z.reshape(z.shape[0], self.members * self.event)
            x = ar1_scan(torch.tanh(self.ar), flat)
            x = x + self.ma * F.pad(x[..., :-1], (1, 0))
            if self.dense:
                x = x + x @ _strict_tril(self.chain_tril, self.chain_index, x.shape[-1]).mT
            z = x.reshape(z.shape)
        u = self.loc + log_scale.exp() * z
        if self.glob:
            u = u + shift + (glob @ self.coupling.T).reshape(u.shape)
        return u, ladj.expand(u.shape[:-1])


def site_stages(sites: dict[str, Any], init_scale: float, glob: int, hidden: int) -> tuple[PyroModule, dict, dict]:
    """The :class:`SiteStage` of each plated site and of each group of chains (see :func:`chain_groups`).

    Returns the stages (a module with one attribute per stage, named after its
    site or sites), each site's stage name, and the sites of each stage that
    several chains share. Stages are built in the model's order of sites.
    """
    stages, keys, joint = PyroModule(), {}, {}
    groups = {info.name: group for group in chain_groups(sites) for info in group}
    for info in sites.values():
        if info.kind == "global" or info.name in keys:
            continue
        group = groups.get(info.name, (info,))
        members = math.prod(info.batch) if info.kind == "local" else sum(i.numel for i in group)
        init = torch.cat([i.init.reshape(-1) for i in group])
        key = "".join(c if c.isalnum() or c == "_" else "_" for c in "_".join(i.name for i in group)) or "site"
        while hasattr(stages, key):  # an identifier, not taken, not one of the module's methods
            key += "_"
        setattr(stages, key, SiteStage(info.kind, init.reshape(members, -1), init_scale, glob, hidden))
        keys.update({i.name: key for i in group})
        if len(group) > 1:
            joint[key] = tuple(i.name for i in group)
    return stages, keys, joint


def chain_groups(sites: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The chains, smallest first, in groups of at most :data:`MAX_DENSE_CHAIN` elements (each in model order).

    A group of several chains is one stage, whose dense factor couples the
    elements of its chains (the discriminations and difficulties of an
    item-response model's items, say); a longer chain is a group of its own.
    """
    order = {name: i for i, name in enumerate(sites)}
    groups, current, size = [], [], 0
    for info in sorted((i for i in sites.values() if i.kind == "chain"), key=lambda i: (i.numel, order[i.name])):
        if current and size + info.numel > MAX_DENSE_CHAIN:
            groups.append(current)
            current, size = [], 0
        current.append(info)
        size += info.numel
    groups += [current] if current else []
    return [tuple(sorted(group, key=lambda i: order[i.name])) for group in groups]
