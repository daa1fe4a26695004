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

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .._zuko import zuko
from .spline import SplineMAF

__all__ = [
    "FlowOptionError",
    "FlowSize",
    "FlowSpec",
    "FLOWS",
    "ResolvedFlow",
    "SplineMAF",
    "UnknownFlowError",
    "accepted_options",
    "base_distribution",
    "check_hyper",
    "estimate_flow_parameters",
    "flow_names",
    "get_flow",
    "resolve_flow",
]


class UnknownFlowError(ValueError):
    """A flow name that the registry does not hold."""


class FlowOptionError(TypeError, ValueError):
    """A flow hyper-parameter that the family does not take, or a value it cannot use.

    Both a ``TypeError`` (an unexpected keyword) and a ``ValueError`` (a bad value).
    """


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
        reaches: The Zuko callables that the ``**kwargs`` of ``build`` are passed
            on to, in order; their keyword parameters are options of the family
            too (see :func:`accepted_options`).
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
    reaches: tuple = ()

    def make(self, features: int, context: int = 0, **hyper: Any) -> Any:
        """Builds the Zuko flow with the registry defaults overridden by ``hyper`` (checked first)."""
        check_hyper(self, hyper)
        return self.build(features, context, **{**self.defaults, **hyper})


_HIDDEN = (64, 64)
# Where each kind of family passes its extra keywords (zuko.flows.* and zuko.nn).
_MASKED = (zuko.flows.MaskedAutoregressiveTransform, zuko.nn.MaskedMLP)
_COUPLING = (zuko.flows.GeneralCouplingTransform, zuko.nn.MLP, zuko.nn.Linear)
_ELEMENTWISE = (zuko.flows.ElementWiseTransform, zuko.nn.MLP, zuko.nn.Linear)
_ODE = (zuko.flows.FFJTransform, zuko.nn.MLP, zuko.nn.Linear)


FLOWS: Mapping[str, FlowSpec] = MappingProxyType(
    {
        spec.name.lower(): spec
        for spec in (
            FlowSpec("MAF", zuko.flows.MAF, {"transforms": 3, "hidden_features": _HIDDEN},
                     summary="masked autoregressive flow, affine", reaches=_MASKED),
            FlowSpec("SplineMAF", SplineMAF, {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                     summary="one autoregressive spline layer, then affine MAF layers", reaches=_MASKED),
            FlowSpec("NSF", zuko.flows.NSF, {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                     summary="autoregressive rational-quadratic splines on [-5, 5], linear tails", reaches=_MASKED),
            FlowSpec("NCSF", zuko.flows.NCSF, {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                     support="circular", summary="circular splines for angles in [-pi, pi)", reaches=_MASKED),
            FlowSpec("NAF", zuko.flows.NAF, {"transforms": 3, "signal": 16, "hidden_features": _HIDDEN},
                     analytic_inverse=False, packable=False,
                     summary="neural autoregressive flow (monotonic networks)", reaches=_MASKED),
            FlowSpec("UNAF", zuko.flows.UNAF, {"transforms": 3, "signal": 16, "hidden_features": _HIDDEN},
                     analytic_inverse=False, packable=False,
                     summary="unconstrained monotonic neural autoregressive flow", reaches=_MASKED),
            FlowSpec("SOSPF", zuko.flows.SOSPF,
                     {"transforms": 3, "degree": 4, "polynomials": 3, "hidden_features": _HIDDEN},
                     analytic_inverse=False, summary="sum-of-squares polynomial flow", reaches=_MASKED),
            FlowSpec("BPF", zuko.flows.BPF, {"transforms": 3, "degree": 16, "hidden_features": _HIDDEN},
                     analytic_inverse=False, summary="Bernstein polynomial flow on [-5, 5]", reaches=_MASKED),
            FlowSpec("NICE", zuko.flows.NICE, {"transforms": 3, "hidden_features": _HIDDEN}, fast="both",
                     summary="coupling flow (affine coupling, as Zuko builds it)", reaches=_COUPLING),
            FlowSpec("RealNVP", zuko.flows.RealNVP, {"transforms": 3, "hidden_features": _HIDDEN}, fast="both",
                     summary="affine coupling flow", reaches=_COUPLING),
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
                reaches=_ELEMENTWISE,
            ),
            FlowSpec("CNF", zuko.flows.CNF, {"hidden_features": _HIDDEN}, fast="both", analytic_inverse=False,
                     packable=False, summary="continuous normalizing flow (ODE, exact trace)", reaches=_ODE),
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

    def check_hyper(self, hyper: Mapping[str, Any]) -> None:
        """Raises :class:`FlowOptionError` unless ``hyper`` suits this flow (see :func:`check_hyper`).

        Only a registry name or a Zuko flow class takes options; ``None``, a
        built flow or a factory takes none.
        """
        if self.takes_hyper:
            family = self.spec.name if self.spec is not None else getattr(self.flow, "__name__", "flow")
            check_hyper(self.spec, hyper, family)
        elif hyper:
            what = {"none": "flow=None (no flow: a Gaussian guide)", "instance": "an already built flow"}
            raise FlowOptionError(
                f"{what.get(self.kind, 'a flow callable')} takes no flow options, got {', '.join(sorted(hyper))}; "
                "drop them, or pass a registry name (e.g. flow='MAF') or a Zuko flow class to apply them"
            )


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


# ------------------------------------------------------------------ options
# Keywords the families fill in themselves, or positional sizes: never options.
_FILLED = frozenset(
    {"self", "features", "context", "in_features", "out_features", "adjacency", "order", "univariate", "shapes", "mask"}
)
_POSITIVE_INTS = frozenset({"transforms", "bins", "signal", "components", "degree", "polynomials", "freqs", "passes", "stack"})
_BOOLS = frozenset({"randperm", "randmask", "residual", "normalize", "bias", "exact"})
_POSITIVE_FLOATS = frozenset({"slope", "atol", "rtol"})


def _keywords(fn: Callable) -> tuple[set[str], bool]:
    """The keyword parameters of ``fn`` (a class: its ``__init__``) and whether it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def accepted_options(spec: FlowSpec) -> list[str]:
    """The hyper-parameters a family takes: its constructor's keywords and those its ``**kwargs`` reach.

    Example:
        >>> "hidden_features" in accepted_options(get_flow("MAF")), "bins" in accepted_options(get_flow("MAF"))
        (True, False)
    """
    names, more = set(), True
    # A family subclassing another (NSF of MAF) passes its **kwargs to the parent first.
    for cls in getattr(spec.build, "__mro__", (spec.build,)):
        flow_class = isinstance(cls, type) and issubclass(cls, zuko.flows.Flow) and cls is not zuko.flows.Flow
        if more and (flow_class or not isinstance(cls, type)) and "__init__" in getattr(cls, "__dict__", {}):
            found, more = _keywords(cls)
            names |= found
    for target in spec.reaches:
        if not more:
            break
        found, more = _keywords(target)
        names |= found
    return sorted(names - _FILLED)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_problem(name: str, value: Any) -> str | None:
    """What is wrong with one option's value, or ``None``."""
    if name in _POSITIVE_INTS and not (_is_int(value) and value > 0):
        return "must be a positive integer"
    if name in _BOOLS and not isinstance(value, bool):
        return "must be True or False"
    if name in _POSITIVE_FLOATS and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    ):
        return "must be a positive number"
    if name == "hidden_features" and not (
        isinstance(value, Sequence) and not isinstance(value, str) and all(_is_int(h) and h > 0 for h in value)
    ):
        return "must be a sequence of positive integers, e.g. (64, 64)"
    if name == "activation" and not callable(value):
        return "must be a module class or a callable returning a module, e.g. torch.nn.ELU"
    if name == "network":
        if not isinstance(value, Mapping):
            return "must be a dict of options for the monotonic network, e.g. {'hidden_features': (32, 32)}"
        for key, inner in value.items():
            problem = _value_problem(key, inner)
            if problem is not None:
                return f"has {key}={inner!r}, which {problem}"
    return None


def check_hyper(spec: FlowSpec | None, hyper: Mapping[str, Any], family: str | None = None) -> None:
    """Raises :class:`FlowOptionError` for an option the family does not take or a value it cannot use.

    Runs before any Zuko call. With ``spec=None`` (a Zuko class outside the
    registry) only the values of the options known here are checked.

    Example:
        >>> try:
        ...     check_hyper(get_flow("MAF"), {"bins": 8})
        ... except FlowOptionError as error:
        ...     print(str(error).split(";")[0])
        flow 'MAF' takes no option 'bins'
    """
    family = family or (spec.name if spec is not None else "flow")
    if spec is not None:
        valid = accepted_options(spec)
        for name in hyper:
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                elsewhere = [s.name for s in FLOWS.values() if s is not spec and name in accepted_options(s)]
                where = f"; {', '.join(elsewhere)} take it" if elsewhere else ""
                raise FlowOptionError(
                    f"flow {family!r} takes no option {name!r}{hint}{where}. Its options are: {', '.join(valid)}"
                )
    for name, value in hyper.items():
        problem = _value_problem(name, value)
        if problem is not None:
            raise FlowOptionError(f"option {name}={value!r} of flow {family!r} {problem}")


@dataclass(frozen=True)
class FlowSize:
    """What building a flow costs, estimated without building it.

    Arguments:
        parameters: The number of learnable parameters.
        build_bytes: The largest temporary allocation while it is built (masks).
        build_flops: Floating-point operations spent building it (mask products).
    """

    parameters: int
    build_bytes: int = 0
    build_flops: int = 0


def _mlp(sizes: Sequence[int]) -> int:
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def estimate_flow_parameters(spec: FlowSpec, features: int, hyper: Mapping[str, Any], context: int = 0) -> FlowSize:
    """The size of ``spec.make(features, context, **hyper)``, from the family's layout (nothing is allocated).

    Exact for the affine and spline families without residual blocks, close for the others.

    Example:
        >>> spec = get_flow("MAF")
        >>> estimate_flow_parameters(spec, 3, {}).parameters == sum(p.numel() for p in spec.make(3).parameters())
        True
    """
    h = {**spec.defaults, **hyper}
    hidden = tuple(h.get("hidden_features", (64, 64)))
    layers = h.get("transforms", 3)
    n_in = features + context
    params = build_bytes = build_flops = 0

    def masked(total: int, count: int = 1) -> int:
        # Each MaskedAutoregressiveTransform's mask is (features * total, n_in) booleans; MaskedMLP
        # multiplies its unique rows (at most ``features``) in double precision.
        nonlocal build_bytes, build_flops
        build_bytes = max(build_bytes, features * total * n_in + 8 * (2 * features * n_in + features * features))
        build_flops += count * 2 * features * features * n_in
        return count * _mlp((n_in, *hidden, features * total))

    name = spec.name
    if name == "MAF":
        params = masked(2, layers)
    elif name in ("NSF", "NCSF"):
        params = masked(3 * h["bins"] - 1, layers)
    elif name == "SplineMAF":
        params = masked(2, layers) + masked(3 * h["bins"] - 1)
    elif name == "SOSPF":
        params = masked(h["polynomials"] * (h["degree"] + 1) + 1, layers)
    elif name == "BPF":
        params = masked(h["degree"] + 1, layers)
    elif name in ("NAF", "UNAF"):
        net = tuple(h.get("network", {}).get("hidden_features", (64, 64)))
        params = masked(h["signal"], layers) + layers * features * _mlp((1 + h["signal"], *net, 1))
    elif name in ("NICE", "RealNVP"):
        half = features // 2
        params = layers * _mlp((features - half + context, *hidden, 2 * half))
    elif name == "GF":
        per = 2 * h["components"]
        params = layers * (_mlp((context, *hidden, features * per)) if context else features * per)
        params += (layers - 1) * features * features  # the rotations between layers
    elif name == "CNF":
        params = _mlp((n_in + 2 * h.get("freqs", 3), *hidden, features))
    return FlowSize(params, build_bytes, build_flops)
