r"""Many parameter tensors held as views of one flat parameter.

Pyro's optimisers run one ``torch.optim`` instance per parameter tensor, and
``pyro.module`` issues one ``pyro.param`` statement per tensor; at the sizes
of typical posteriors those per-tensor calls cost more than the flow's
arithmetic (``benchmarks/step_time.py --optimizer-only``). Adam and element-wise
gradient clipping act on each entry alone, so one flat tensor trains exactly
as its pieces would.

:class:`Packing` records where each trainable parameter of a module tree
lives in the flat vector, takes the parameters out of the modules, and
:meth:`Packing.bind` puts views of a flat tensor back as plain attributes
before each use. Only modules that read their parameters as attributes can be
packed; code that hands ``module.parameters()`` to autograd (Zuko's NAF, UNAF
and CNF do, for implicit and adjoint gradients) would not see them, so the
flow registry says which families may be packed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Packing", "fan_in_factor"]


class _Unpack(torch.autograd.Function):
    """The pieces of a flat tensor as new tensors; their gradients are joined in one ``cat``.

    A slice of a tensor that requires grad sends back a gradient the size of
    the whole tensor (zeros but for the slice), so a flat parameter read as
    many slices costs one full-size fill and addition per slice in each
    backward pass. Here the backward pass writes each piece's gradient once.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
        ctx.sizes = sizes
        ctx.set_materialize_grads(False)  # an unused piece sends None, filled below
        # Separate copies, not views of one copy: a piece may then be written
        # in place (as a test perturbing a flow's weights does) like any tensor.
        return tuple(piece.clone() for piece in flat.detach().split(sizes))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, None]:
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return None, None
        parts = [ref.new_zeros(n) if g is None else g.reshape(-1) for g, n in zip(grads, ctx.sizes)]
        return torch.cat(parts), None


def fan_in_factor(module: nn.Module, name: str, param: Tensor) -> float:
    r"""The step-size factor of a layer's weight and bias: :math:`1/\sqrt{\text{fan-in}}` (1 for others).

    A weight of a layer with fan-in :math:`H` is of order :math:`1/\sqrt{H}`,
    so a step of lr is :math:`\sqrt{H}` times larger relative to it than to
    an affine stage's location or log-scale; and a zero-initialised output
    layer over :math:`H` non-negative features moves its output by about
    :math:`\mathrm{lr} \cdot H / 2` per step while its gradients agree in sign.
    Held as :math:`\mathrm{raw} / \sqrt{H}`, each layer moves by about lr
    relative to its scale.

    Example:
        >>> fan_in_factor(nn.Linear(16, 3), "weight", None)
        0.25
    """
    weight = getattr(module, "weight", None)
    if name in ("weight", "bias") and isinstance(weight, Tensor) and weight.dim() == 2:
        return 1.0 / math.sqrt(max(int(weight.shape[1]), 1))
    return 1.0


class _Slot(NamedTuple):
    module: str  # qualified name in the module tree ("" for a named tensor)
    name: str
    start: int
    stop: int
    shape: torch.Size


class Packing:
    r"""The layout of named tensors and of a module tree's parameters in one flat vector.

    Arguments:
        named: ``(name, tensor)`` pairs of the owner's own tensors, laid out first.
        module: A module tree whose trainable parameters are laid out next and
            removed from it (``None`` for none). Parameters that do not require
            grad are left in place; a parameter shared by two modules gets one range.
        factor: ``factor(module, name, parameter)``, the scale at which the
            module reads each of its packed parameters (see the module
            docstring; ``None``: 1 for all).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> packing = Packing([("loc", torch.zeros(2))], net)
        >>> flat = nn.Parameter(packing.initial)
        >>> flat.shape, len(list(net.parameters()))
        (torch.Size([15]), 0)
        >>> views = packing.bind(flat, net)
        >>> net(torch.ones(4, 2)).shape, views["loc"].shape
        (torch.Size([4, 1]), torch.Size([2]))
    """

    def __init__(
        self,
        named: Sequence[tuple[str, Tensor]],
        module: nn.Module | None = None,
        factor: Callable[[nn.Module, str, Tensor], float] | None = None,
    ) -> None:
        chunks: list[Tensor] = []
        slots: list[_Slot] = []
        self._factors: dict[int, float] = {}  # start of a range -> its factor, where not 1
        offset = 0

        def place(owner: str, name: str, tensor: Tensor, f: float = 1.0) -> _Slot:
            nonlocal offset
            if f != 1.0:
                self._factors[offset] = f
            chunks.append(tensor.detach().reshape(-1) / f)
            slot = _Slot(owner, name, offset, offset + tensor.numel(), tensor.shape)
            offset = slot.stop
            return slot

        self.named = {name: place("", name, t) for name, t in named}
        if module is not None:
            seen: dict[int, _Slot] = {}
            for owner, m in module.named_modules(remove_duplicate=False):
                for name, p in list(m._parameters.items()):
                    if p is None or not p.requires_grad:
                        continue
                    first = seen.get(id(p))
                    if first is None:
                        slot = place(owner, name, p, 1.0 if factor is None else float(factor(m, name, p)))
                    else:
                        slot = first._replace(module=owner, name=name)
                    seen.setdefault(id(p), slot)
                    slots.append(slot)
            for slot in slots:
                module.get_submodule(slot.module)._parameters.pop(slot.name, None)
        self.module_slots = tuple(slots)
        self.initial = torch.cat(chunks) if chunks else torch.zeros(0)
        self._targets: dict[int, tuple[nn.Module, list[tuple[dict, str, int, int, torch.Size]]]] = {}

    def __len__(self) -> int:
        return self.initial.numel()

    def layout(self) -> tuple[tuple[str, str, torch.Size], ...]:
        """``(module, name, shape)`` of each packed tensor, in order (module ``""`` for a named tensor)."""
        return tuple((s.module, s.name, s.shape) for s in (*self.named.values(), *self.module_slots))

    def factor_of(self, module: str, name: str) -> float:
        """The factor at which ``module`` (its qualified name) reads its packed parameter ``name``."""
        slot = next(s for s in self.module_slots if (s.module, s.name) == (module, name))
        return self._factors.get(slot.start, 1.0)

    def _scaled(self, piece: Tensor, start: int) -> Tensor:
        f = self.__dict__.get("_factors", {}).get(start)
        return piece if f is None else f * piece

    def _resolved(self, module: nn.Module) -> list[tuple[dict, str, int, int, torch.Size]]:
        # Resolving names walks the tree, so it is done once per module tree.
        hit = self._targets.get(id(module))
        if hit is None or hit[0] is not module:
            targets = [
                (module.get_submodule(s.module).__dict__, s.name, s.start, s.stop - s.start, s.shape)
                for s in self.module_slots
            ]
            hit = self._targets[id(module)] = (module, targets)
        return hit[1]

    def bind(self, flat: Tensor, module: nn.Module | None = None) -> dict[str, Tensor]:
        """Puts views of ``flat`` into ``module``'s tree; returns views of the named tensors.

        ``module`` is the packed tree or a copy of it (``copy.deepcopy`` of an
        unbound tree, see :meth:`unbind`). A parameter read at a factor other
        than 1 gets ``factor * view``, which is not a view.
        """
        # One slice per tensor, not one split: views from a split may not be
        # used once the flat tensor is updated in place, slices may.
        if module is not None:
            for attrs, name, start, size, shape in self._resolved(module):
                attrs[name] = self._scaled(flat.narrow(0, start, size).view(shape), start)
        return {name: flat.narrow(0, s.start, s.stop - s.start).view(s.shape) for name, s in self.named.items()}

    def bind_for_grad(self, flat: Tensor, module: nn.Module | None = None) -> dict[str, Tensor]:
        """:meth:`bind` for a step of training: copies of the pieces, whose gradients reach ``flat`` in one pass.

        The pieces are not views, so writing to them does not change ``flat``;
        use :meth:`bind` for that. Without autograd (``flat`` needs no grad,
        or grad mode is off) this is :meth:`bind`.
        """
        if not (flat.requires_grad and torch.is_grad_enabled()):
            return self.bind(flat, module)
        sizes, piece_at = self._layout()
        # A traced graph exports only torch operations, so tracing reads plain slices.
        pieces = flat.split(sizes) if torch.jit.is_tracing() else _Unpack.apply(flat, sizes)
        views = {name: pieces[piece_at[s.start, s.stop]].view(s.shape) for name, s in self.named.items()}
        if module is not None:
            for attrs, name, start, size, shape in self._resolved(module):
                attrs[name] = self._scaled(pieces[piece_at[start, start + size]].view(shape), start)
        return views

    def _layout(self) -> tuple[tuple[int, ...], dict[tuple[int, int], int]]:
        # The flat vector as consecutive pieces, one per distinct range: a shared
        # parameter has one range for all its owners, an empty one a range of its own.
        hit = getattr(self, "_pieces", None)
        if hit is None:
            ranges = sorted({(s.start, s.stop) for s in (*self.named.values(), *self.module_slots)})
            assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            hit = tuple(b - a for a, b in ranges), {r: i for i, r in enumerate(ranges)}
            self._pieces = hit
        return hit

    def unbind(self, module: nn.Module) -> None:
        """Removes the bound views (they hold a graph), e.g. before ``copy.deepcopy``."""
        for attrs, name, *_ in self._resolved(module):
            attrs.pop(name, None)
