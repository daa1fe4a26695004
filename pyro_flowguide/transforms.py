r"""Zuko flows as Pyro transform modules.

:class:`FlowTransform` wraps an unconditional Zuko ``LazyTransform`` as a Pyro
``TransformModule``; :class:`ConditionalFlowTransform` wraps a conditional one
as a ``ConditionalTransformModule``. :func:`flow_transform` builds either from a
registry name, a Zuko flow class or instance, or a ``LazyTransform``.

Direction. Calling the transform runs Zuko's *normalising* map when
``direction="sample"`` and its inverse when ``direction="density"``. For an
autoregressive family Zuko's normalising map is one network pass, so:

* ``direction="sample"``: ``T(x)`` is one pass and returns the log-determinant
  from the same pass. A guide draws base noise, pushes it through ``T`` and
  scores the draw without any inversion (IAF style).
* ``direction="density"``: ``TransformedDistribution(base, [T]).log_prob(y)``
  runs ``T.inv(y)``, which is one pass (MAF style), so fitting data is fast.

Coupling, element-wise and continuous families cost the same both ways.

Cache. The value and ``log|det J|`` of the last call (either way) are kept, so
``log_abs_det_jacobian`` and ``inv`` of a pair just produced cost nothing. The
entry is tied to the parameters' version counters (never served after an
optimiser step); :func:`clear_flow_caches` drops it and the graph it holds.

Example:
    >>> import torch, pyro.distributions as dist
    >>> T = flow_transform("MAF", features=2, direction="density")
    >>> flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [T])
    >>> flow.log_prob(torch.randn(5, 2)).shape
    torch.Size([5])
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from ._zuko import zuko
from .flows.registry import FlowSpec, resolve_flow

__all__ = [
    "ConditionalFlowTransform",
    "FlowTransform",
    "clear_flow_caches",
    "flow_cache_clearers",
    "flow_transform",
    "param_tuple",
    "zero_output_layers",
]

_DIRECTIONS = ("sample", "density")


def _check_direction(direction: str) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'sample' or 'density', got {direction!r}")


def param_tuple(module: nn.Module) -> tuple[Tensor, ...]:
    """``tuple(module.parameters())``, kept until the module is moved or a parameter replaced."""
    # Walking the module tree costs more than the flow itself at small sizes,
    # so the tuple is kept until the module is moved or cast (_apply) or one of
    # its parameters is replaced in place, as pyro.module(...,
    # update_module_params=True) does; a stale tuple would serve stale caches.
    params = module.__dict__.get("_param_tuple")
    slots = module.__dict__.get("_param_slots")
    if params is not None and slots is not None:
        if all(d.get(k) is p for (d, k), p in zip(slots, params)):
            return params
    found, where, seen = [], [], set()
    for m in module.modules():  # the order and de-duplication of module.parameters()
        for k, p in m._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                found.append(p)
                where.append((m._parameters, k))
    module.__dict__["_param_slots"] = tuple(where)
    params = module.__dict__["_param_tuple"] = tuple(found)
    return params


def _versions(params: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], int]:
    # Which tensors (the tuple is rebuilt when one is replaced) and how often
    # they were written in place: a cache entry is valid only if both match.
    return params, sum(p._version for p in params)


def _same_versions(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] == b[1]


class _OnePassMixin:
    r"""Value and log-determinant from one pass, with a version-checked one-entry cache.

    Subclasses provide ``_zuko_transform()`` (Zuko's normalising transform for
    the current context), ``_params()`` and ``direction``.
    """

    direction: str
    _cache: tuple | None = None

    def _zuko_transform(self) -> Transform:  # pragma: no cover - abstract
        raise NotImplementedError

    def _params(self) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _pair(self) -> tuple[Transform, Transform]:
        """(the map ``__call__`` runs, the map ``inv`` runs) for this direction."""
        t = self._zuko_transform()
        return (t, t.inv) if self.direction == "sample" else (t.inv, t)

    def _fresh(self, *tensors: Tensor) -> tuple | None:
        c = self._cache
        if c is None or not _same_versions(c[3], _versions(self._params())):
            return None
        if all(a is b for a, b in zip(tensors, c) if a is not None):
            return c
        return None

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The value and ``log|det J|`` at ``x`` from a single pass."""
        forward, _ = self._pair()
        y, ladj = forward.call_and_ladj(x)
        self.remember(x, y, ladj)
        return y, ladj

    def remember(self, x: Tensor, y: Tensor, ladj: Tensor) -> None:
        """Caches ``(x, y, log|det J| at x)`` so ``inv(y)`` and the log-det of the pair need no pass.

        Also for a pair computed elsewhere (the closed-form score runs the draw itself).
        """
        self._cache = (x, y, ladj, _versions(self._params()))

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        hit = self._fresh(None, y)
        if hit is not None:
            return hit[0]
        _, backward = self._pair()
        x, ladj_inv = backward.call_and_ladj(y)
        self.remember(x, y, -ladj_inv)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        hit = self._fresh(x, y)
        if hit is not None:
            return hit[2]
        # Not a pair this transform produced: score x with a fresh pass.
        return self.call_and_ladj(x)[1]

    def clear_cache(self) -> None:
        """Drops the cached value, log-determinant and the graph they hold."""
        self._cache = None


class FlowTransform(_OnePassMixin, TransformModule):
    r"""An unconditional Zuko flow as a Pyro ``TransformModule``.

    Arguments:
        lazy: A Zuko ``LazyTransform`` (e.g. ``zuko.flows.MAF(3).transform``).
        features: The event size :math:`D` the transform acts on.
        direction: ``"sample"`` (calling is Zuko's one-pass normalising map) or
            ``"density"`` (``inv`` is). See the module docstring.
        spec: The registry entry it was built from, if any.

    Example:
        >>> T = flow_transform("NSF", features=3)
        >>> y = T(torch.randn(4, 3))
        >>> T.log_abs_det_jacobian(T.inv(y), y).shape  # cached: no extra pass
        torch.Size([4])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self,
        lazy: nn.Module,
        features: int,
        direction: str = "sample",
        spec: FlowSpec | None = None,
    ) -> None:
        _check_direction(direction)
        super().__init__(cache_size=0)
        self.lazy = lazy
        self.features = int(features)
        self.direction = direction
        self.spec = spec
        self._cache = None

    def __repr__(self) -> str:
        name = self.spec.name if self.spec is not None else type(self.lazy).__name__
        return f"FlowTransform({name}, features={self.features}, direction={self.direction!r})"

    @property
    def support(self) -> str:
        return self.spec.support if self.spec is not None else "real"

    def _zuko_transform(self) -> Transform:
        return self.lazy(None)

    def _params(self) -> tuple[Tensor, ...]:
        return param_tuple(self)

    def _apply(self, *args: Any, **kwargs: Any):
        self.__dict__.pop("_param_tuple", None)
        return super()._apply(*args, **kwargs)

    def forward_shape(self, shape):
        return shape

    def inverse_shape(self, shape):
        return shape


class _ConditionedFlowTransform(_OnePassMixin, Transform):
    """What :meth:`ConditionalFlowTransform.condition` returns; holds no parameters."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, parent: ConditionalFlowTransform, context: Tensor) -> None:
        super().__init__(cache_size=0)
        self.parent = parent
        self.context = context
        self.direction = parent.direction
        self._cache = None

    def _zuko_transform(self) -> Transform:
        return self.parent.lazy(self.context)

    def _params(self) -> tuple[Tensor, ...]:
        return param_tuple(self.parent)

    def forward_shape(self, shape):
        return shape

    def inverse_shape(self, shape):
        return shape


class ConditionalFlowTransform(ConditionalTransformModule):
    r"""A conditional Zuko flow as a Pyro ``ConditionalTransformModule``.

    ``condition(c)`` returns a transform for context ``c`` (trailing width
    ``context``; leading dimensions broadcast against the values).

    Arguments:
        lazy: A Zuko ``LazyTransform`` built with ``context > 0``.
        features: The event size :math:`D`.
        context: The context width.
        direction: As for :class:`FlowTransform`.
        spec: The registry entry it was built from, if any.

    Example:
        >>> C = flow_transform("NSF", features=1, context=2, direction="density")
        >>> base = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        >>> cond = dist.ConditionalTransformedDistribution(base, [C])
        >>> cond.condition(torch.randn(5, 2)).log_prob(torch.randn(5, 1)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        lazy: nn.Module,
        features: int,
        context: int,
        direction: str = "sample",
        spec: FlowSpec | None = None,
    ) -> None:
        _check_direction(direction)
        super().__init__()
        self.lazy = lazy
        self.features = int(features)
        self.context = int(context)
        self.direction = direction
        self.spec = spec

    def __repr__(self) -> str:
        name = self.spec.name if self.spec is not None else type(self.lazy).__name__
        return (
            f"ConditionalFlowTransform({name}, features={self.features}, "
            f"context={self.context}, direction={self.direction!r})"
        )

    @property
    def support(self) -> str:
        return self.spec.support if self.spec is not None else "real"

    def condition(self, context: Tensor) -> Transform:
        if not torch.is_tensor(context) or context.dim() == 0 or context.shape[-1] != self.context:
            given = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
            raise ValueError(
                f"context of the wrong width: this flow expects a trailing dimension of "
                f"{self.context}, got shape {given}; reshape the context to (..., {self.context})"
            )
        return _ConditionedFlowTransform(self, context)

    def clear_cache(self) -> None:
        """Conditioned transforms are built per call, so there is nothing to keep."""

    def _apply(self, *args: Any, **kwargs: Any):
        self.__dict__.pop("_param_tuple", None)
        return super()._apply(*args, **kwargs)


def zero_output_layers(lazy: nn.Module) -> nn.Module:
    """Zeroes the last linear layer of every hyper-network in a Zuko flow (in place).

    Affine, spline and ODE families then start exactly at the identity, while
    gradients still reach every layer after the first step. Free element-wise
    parameters (no context) are zeroed too.
    """
    for module in lazy.modules():
        for name in ("hyper", "ode"):  # masked/coupling/element-wise networks, CNF fields
            net = getattr(module, name, None)
            if isinstance(net, nn.Module):
                _zero_last_linear(net)
        if isinstance(module, zuko.flows.ElementWiseTransform) and hasattr(module, "phi"):
            for p in module.phi:
                nn.init.zeros_(p)
    return lazy


def _zero_last_linear(net: nn.Module) -> None:
    linears = [m for m in net.modules() if isinstance(m, _LINEAR_TYPES)]
    if linears:
        nn.init.zeros_(linears[-1].weight)
        if linears[-1].bias is not None:
            nn.init.zeros_(linears[-1].bias)


_LINEAR_TYPES = (nn.Linear, zuko.nn.Linear)


def flow_transform(
    flow: Any,
    features: int,
    context: int = 0,
    direction: str = "sample",
    identity_init: bool = False,
    **hyper: Any,
) -> FlowTransform | ConditionalFlowTransform:
    r"""Builds a Pyro transform module from a flow family.

    Arguments:
        flow: A registry name (``"MAF"``, ``"NSF"``, ... case-insensitive), a
            Zuko flow class, a Zuko ``Flow`` instance or a Zuko ``LazyTransform``.
        features: The event size :math:`D`.
        context: The context width; ``> 0`` returns a conditional transform.
        direction: ``"sample"`` for guides (one-pass sampling and scoring of
            one's own draws) or ``"density"`` for fitting data (one-pass
            ``log_prob``). See the module docstring.
        identity_init: Start the flow at the identity map (zeroed output layers).
        hyper: Hyper-parameters for the Zuko constructor, overriding the
            registry defaults (only with a name or a class).

    Returns:
        A :class:`FlowTransform` if ``context == 0``, else a
        :class:`ConditionalFlowTransform`.

    Example:
        >>> flow_transform("maf", features=3)
        FlowTransform(MAF, features=3, direction='sample')
        >>> flow_transform(zuko.flows.NSF, features=1, context=2, bins=4)
        ConditionalFlowTransform(NSF, features=1, context=2, direction='sample')
    """
    _check_direction(direction)
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"features must be a positive integer, got {features!r}")
    if not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be a non-negative integer, got {context!r}")
    resolved = resolve_flow(flow)
    spec = resolved.spec
    if resolved.kind == "class":
        resolved.check_hyper(hyper)  # a name is checked by spec.make; before any Zuko call either way
    if resolved.kind == "name":
        lazy = spec.make(features, context, **hyper).transform
    elif resolved.kind == "class":
        defaults = dict(spec.defaults) if spec is not None else {}
        lazy = flow(features, context, **{**defaults, **hyper}).transform
    elif resolved.kind == "instance":
        if hyper:
            raise TypeError(
                f"hyper-parameters {sorted(hyper)} cannot be applied to an already built "
                f"{type(flow).__name__}; pass a registry name or the class instead"
            )
        lazy = flow.transform if isinstance(flow, zuko.lazy.Flow) else flow
        _check_built_size(lazy, type(flow).__name__, features, context)
    else:
        raise TypeError(
            "flow must be a registry name, a Zuko Flow class or instance, or a Zuko "
            f"LazyTransform; got {type(flow).__name__}"
        )
    if direction == "density" and spec is not None and spec.density_refused:
        raise ValueError(
            f"{spec.name} cannot be a density of data (direction='density'): "
            f"{spec.density_refused}. Use it as a guide (direction='sample'), or "
            "pick NSF or MAF for density estimation."
        )
    if identity_init:
        zero_output_layers(lazy)
    if context > 0:
        return ConditionalFlowTransform(lazy, features, context, direction, spec)
    return FlowTransform(lazy, features, direction, spec)


def _check_built_size(lazy: nn.Module, kind: str, features: int, context: int) -> None:
    """Raises unless an already built flow maps ``features`` coordinates (given ``context`` numbers)."""
    param = next(lazy.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    try:
        with torch.no_grad():
            y = lazy(torch.zeros(context, **like) if context else None)(torch.zeros(features, **like))
        ok = tuple(y.shape) == (features,)
    except (RuntimeError, ValueError, IndexError, TypeError):
        ok = False
    if not ok:
        raise ValueError(
            f"the given {kind} was not built for {features} feature(s) and a context of {context}, the "
            f"sizes it is used at here; build it with features={features}, context={context}, or pass "
            "the family's registry name or class and let the guide size it"
        )


def flow_cache_clearers(module: nn.Module) -> list:
    """The ``clear_cache`` methods of every flow transform inside ``module``.

    Collect them once and call them every step: walking the module tree costs
    more than clearing at the sizes of typical posteriors.
    """
    return [m.clear_cache for m in module.modules() if isinstance(m, _OnePassMixin)]


def clear_flow_caches(module: nn.Module) -> None:
    """Calls ``clear_cache()`` on every flow transform inside ``module``."""
    for clear in flow_cache_clearers(module):
        clear()
