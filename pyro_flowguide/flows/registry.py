r"""The registry of flow families: one table from a name to how the family is built.

Every Zuko flow family is listed once, and so is :class:`SplineMAF` (Zuko's
NSF and MAF transforms composed, :mod:`~pyro_flowguide.flows.spline`; the
guides' default), with its class, the
default hyper-parameters this package uses, which direction of the Zuko
transform is a single network pass, and the support it models. Guides and
density code look families up here; nothing else tests for a family by name.

Zuko's convention: ``flow.transform(c)`` maps *data* to the *base* space
("normalising" direction). For autoregressive families that direction is one
network pass and the other takes one pass per feature; coupling, element-wise
and continuous families cost the same both ways.

Example:
    >>> from pyro_flowguide.flows import get_flow, flow_names
    >>> get_flow("nsf").name
    'NSF'
    >>> "MAF" in flow_names()
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .._zuko import zuko
from .spline import SplineMAF

__all__ = [
    "FlowSpec",
    "FLOWS",
    "ResolvedFlow",
    "SplineMAF",
    "UnknownFlowError",
    "base_distribution",
    "flow_names",
    "get_flow",
    "resolve_flow",
]


class UnknownFlowError(ValueError):
    """A flow name that the registry does not hold."""


@dataclass(frozen=True)
class FlowSpec:
    r"""How to build one flow family.

    Arguments:
        name: The canonical name (Zuko's class name).
        build: The Zuko ``Flow`` class; called as ``build(features, context, **hyper)``.
        defaults: Hyper-parameters used unless the caller overrides them.
        fast: Which direction of the Zuko transform is one network pass:
            ``"normalize"`` (data to base only, autoregressive families) or
            ``"both"`` (coupling, element-wise and continuous families).
        analytic_inverse: Whether the inverse is closed form. When ``False``
            the inverse is found numerically (bisection or an ODE solve).
        support: ``"real"`` or ``"circular"`` (features in :math:`[-\pi, \pi)`).
        summary: One line for tables and error messages.
        density_refused: Why the family cannot be a density of data
            (``direction="density"``), or ``""`` if it can.
        packable: Whether the family's modules read their parameters as
            attributes only, so that a guide may hold them as views of one
            flat tensor (see ``pyro_flowguide.guides.packing``). NAF, UNAF and CNF
            are not: their implicit-gradient inverse and their adjoint pass
            the module's ``parameters()`` to autograd.
    """

    name: str
    build: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fast: str = "normalize"
    analytic_inverse: bool = True
    support: str = "real"
    summary: str = ""
    density_refused: str = ""
    packable: bool = True

    def make(self, features: int, context: int = 0, **hyper: Any) -> Any:
        """Builds the Zuko flow with the registry defaults overridden by ``hyper``."""
        return self.build(features, context, **{**self.defaults, **hyper})


_HIDDEN = (64, 64)


FLOWS: Mapping[str, FlowSpec] = MappingProxyType(
    {
        spec.name.lower(): spec
        for spec in (
            FlowSpec("MAF", zuko.flows.MAF, {"transforms": 3, "hidden_features": _HIDDEN},
                     summary="masked autoregressive flow, affine"),
            FlowSpec("SplineMAF", SplineMAF, {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                     summary="one autoregressive spline layer, then affine MAF layers"),
            FlowSpec("NSF", zuko.flows.NSF, {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                     summary="autoregressive rational-quadratic splines on [-5, 5], linear tails"),
            FlowSpec("NCSF", zuko.flows.NCSF, {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                     support="circular", summary="circular splines for angles in [-pi, pi)"),
            FlowSpec("NAF", zuko.flows.NAF, {"transforms": 3, "signal": 16, "hidden_features": _HIDDEN},
                     analytic_inverse=False, packable=False,
                     summary="neural autoregressive flow (monotonic networks)"),
            FlowSpec("UNAF", zuko.flows.UNAF, {"transforms": 3, "signal": 16, "hidden_features": _HIDDEN},
                     analytic_inverse=False, packable=False,
                     summary="unconstrained monotonic neural autoregressive flow"),
            FlowSpec("SOSPF", zuko.flows.SOSPF,
                     {"transforms": 3, "degree": 4, "polynomials": 3, "hidden_features": _HIDDEN},
                     analytic_inverse=False, summary="sum-of-squares polynomial flow"),
            FlowSpec("BPF", zuko.flows.BPF, {"transforms": 3, "degree": 16, "hidden_features": _HIDDEN},
                     analytic_inverse=False, summary="Bernstein polynomial flow on [-5, 5]"),
            FlowSpec("NICE", zuko.flows.NICE, {"transforms": 3, "hidden_features": _HIDDEN}, fast="both",
                     summary="coupling flow (affine coupling, as Zuko builds it)"),
            FlowSpec("RealNVP", zuko.flows.RealNVP, {"transforms": 3, "hidden_features": _HIDDEN}, fast="both",
                     summary="affine coupling flow"),
            FlowSpec(
                "GF",
                zuko.flows.GF,
                {"transforms": 3, "components": 8},
                fast="both",
                analytic_inverse=False,
                summary="Gaussianization flow (element-wise mixtures and rotations)",
                density_refused=(
                    "Zuko's GF maps data into a bounded box (each element-wise layer "
                    "lands in about (-4.9, 4.9)) and rotates between layers, so base "
                    "points outside its image have no preimage and the density of "
                    "data integrates to less than 1 (about 0.55 in 2-D)"
                ),
            ),
            FlowSpec("CNF", zuko.flows.CNF, {"hidden_features": _HIDDEN}, fast="both", analytic_inverse=False,
                     packable=False, summary="continuous normalizing flow (ODE, exact trace)"),
        )
    }
)

_REFUSED = {
    "gmm": "GMM is a Gaussian mixture, not a bijection: it has no transform to wrap. "
    "Use a flow family, e.g. 'NSF', for multimodal targets.",
}


def flow_names() -> list[str]:
    """The canonical names of all registered flow families."""
    return [spec.name for spec in FLOWS.values()]


def get_flow(name: str) -> FlowSpec:
    """Looks a family up by name, case-insensitively.

    Raises:
        UnknownFlowError: if the name is not registered (the message lists the
            valid names) or names something that is not a bijection.
    """
    if not isinstance(name, str):
        raise TypeError(f"a flow name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key in _REFUSED:
        raise UnknownFlowError(_REFUSED[key])
    if key not in FLOWS:
        raise UnknownFlowError(
            f"unknown flow {name!r}; valid names are {', '.join(flow_names())} "
            "(case-insensitive), or pass a Zuko flow class or LazyTransform"
        )
    return FLOWS[key]


def base_distribution(
    support: str, features: int, dtype: torch.dtype = torch.float32, device: Any = None
):
    r"""The base distribution a family of the given support is paired with.

    A standard normal for real features, a uniform on :math:`[-\pi, \pi)` for
    circular ones; an event of ``features`` dimensions either way.
    """
    import pyro.distributions as dist

    if support == "circular":
        lim = torch.full((features,), math.pi, dtype=dtype, device=device)
        return dist.Uniform(-lim, lim).to_event(1)
    zeros = torch.zeros(features, dtype=dtype, device=device)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


@dataclass(frozen=True)
class ResolvedFlow:
    r"""A ``flow=`` argument, classified once for the transforms and both guides.

    Arguments:
        flow: The argument as given.
        kind: ``"none"`` (no flow), ``"name"`` (a registry name), ``"class"``
            (a Zuko flow class), ``"instance"`` (a Zuko ``Flow`` or
            ``LazyTransform``), ``"factory"`` (a callable ``dim -> Transform``,
            e.g. Pyro's ``T.planar``) or ``"other"``.
        spec: The registry entry of the name, class or instance's class, else ``None``.

    Example:
        >>> r = resolve_flow("maf")
        >>> r.kind, r.spec.name, r.takes_hyper
        ('name', 'MAF', True)
    """

    flow: Any
    kind: str
    spec: FlowSpec | None = None

    @property
    def takes_hyper(self) -> bool:
        """Whether hyper-parameters (``hidden_features``, ...) reach a constructor: a name or a class."""
        return self.kind in ("name", "class")

    @property
    def stl_by_default(self) -> bool:
        """Whether a guide's ``estimator="auto"`` picks sticking the landing for it.

        No flow, or a registry family (by name or class) with a closed-form inverse.
        """
        return self.kind == "none" or (self.takes_hyper and self.spec is not None and self.spec.analytic_inverse)

    @property
    def packable(self) -> bool:
        """Whether a guide may hold the flow's parameters in its flat parameter.

        No flow, or a registry family (by name or class) that says so; flows
        built elsewhere keep their own parameters, since their code may
        iterate ``parameters()``.
        """
        return self.kind == "none" or (self.takes_hyper and self.spec is not None and self.spec.packable)


def _spec_of_class(cls: type) -> FlowSpec | None:
    try:
        return get_flow(cls.__name__)
    except ValueError:
        return None


def resolve_flow(flow: Any) -> ResolvedFlow:
    """Classifies a ``flow=`` argument; an unknown registry name raises :class:`UnknownFlowError`.

    Example:
        >>> resolve_flow(zuko.flows.NSF).spec.name
        'NSF'
        >>> resolve_flow(None).kind
        'none'
    """
    if flow is None:
        return ResolvedFlow(None, "none")
    if isinstance(flow, str):
        return ResolvedFlow(flow, "name", get_flow(flow))
    if isinstance(flow, type) and issubclass(flow, zuko.lazy.Flow):
        return ResolvedFlow(flow, "class", _spec_of_class(flow))
    if isinstance(flow, (zuko.lazy.Flow, zuko.lazy.LazyTransform)):
        return ResolvedFlow(flow, "instance", _spec_of_class(type(flow)))
    if callable(flow) and not isinstance(flow, (type, torch.nn.Module)):
        return ResolvedFlow(flow, "factory")
    return ResolvedFlow(flow, "other")
