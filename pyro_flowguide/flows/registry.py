r"""The registry of flow families: one table from a name to how the family is built.

Every Zuko flow family is listed once, and so is :class:`SplineMAF` (Zuko's
NSF and MAF transforms composed; the guides' default), with its class, the
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

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .._zuko import zuko

__all__ = [
    "FlowSpec",
    "FLOWS",
    "BoundedInputMAT",
    "ScaledSpline",
    "SplineMAF",
    "UnknownFlowError",
    "base_distribution",
    "flow_names",
    "get_flow",
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
            flat tensor (see ``pyro_flowguide._packed``). NAF, UNAF and CNF
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


def _check_positive(name: str, value: Any, alternative: str = "") -> None:
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number{alternative}, got {value!r}")


class BoundedInputMAT(zuko.flows.MaskedAutoregressiveTransform):
    r"""Zuko's masked autoregressive transform whose network reads :math:`B \tanh(x / B)`.

    The element-wise map of feature :math:`i` still acts on :math:`x_i`
    itself; only the network that gives its parameters from :math:`x_{<i}`
    sees the squashed inputs. Inside :math:`[-B/2, B/2]` they differ from the
    inputs by under 8 %, so the fit there is barely touched; beyond
    :math:`\pm B` the network's outputs level off, and the layer tends to a
    fixed affine (or spline) map of each feature. A ReLU network instead
    extrapolates linearly, so the log-scales of a plain MAF layer go on
    growing or shrinking in the tails, where training draws almost never
    land: the flow's far tails are left to chance, and with them PSIS k-hat
    (see :class:`SplineMAF`).

    Arguments:
        args, kwargs: As for ``zuko.flows.MaskedAutoregressiveTransform``.
        input_bound: :math:`B` (> 0).
    """

    def __init__(self, *args: Any, input_bound: float = 4.0, **kwargs: Any) -> None:
        _check_positive("input_bound", input_bound)
        super().__init__(*args, **kwargs)
        self.input_bound = float(input_bound)

    def meta(self, c: torch.Tensor | None, x: torch.Tensor):
        b = self.input_bound
        return super().meta(c, b * torch.tanh(x / b))


class SplineMAF(zuko.flows.Flow):
    r"""One autoregressive spline layer, then affine MAF layers (the guides' default).

    Zuko's normalising map (data to base) is one NSF transform (monotonic
    rational-quadratic splines on :math:`[-5, 5]` with ``bins`` bins, identity
    outside) followed by ``transforms`` MAF transforms, as Zuko's ``NSF`` and
    ``MAF`` build them: the spline and the first MAF transform take the
    features in their natural order and the MAF transforms alternate it. As a
    guide (``direction="sample"``) the draws therefore pass the spline first:
    it can split the base noise into modes in one pass, which affine layers
    alone can only approximate, and the MAF layers then shear and scale what
    it made.

    ``input_bound`` (:class:`BoundedInputMAT`; off by default) has every
    layer's network read :math:`B \tanh(x / B)` instead of :math:`x`, so the
    flow levels off to fixed maps in its far tails instead of extrapolating
    its networks. It is a trade-off, measured under the benchmark's protocol A
    (4 particles) at ``B = 4``: the banana's PSIS k-hat, decided by the few
    draws beyond :math:`|\varepsilon| \approx 4` that no training step had
    seen, went from 0.59 / 0.64 / 0.36 / 0.03 / 0.61 / 0.09 (seeds 0-5) to
    0.00 / 0.29 / 0.20 / 0.09 / 0.40 / 0.09 with the same w1 (0.030, 0.029),
    but the two-mode mixture's w1 over seeds 0-11 went from 0.036 to 0.057
    (its modes lie 2-3 standardised units out, where the squashed inputs are
    already compressed), and eight schools' k-hat through
    :func:`~pyro_flowguide.fit` from 0.47 to 0.54 (seeds 0-5). At ``B = 8``
    both effects were gone (mixture 0.037, banana k-hat 0.34). Pass it for
    posteriors with Gaussian-like tails whose importance weights matter.

    ``spline_scale`` multiplies the spline network's outputs (the raw bin
    widths, heights and knot slopes) before Zuko's spline reads them. The map
    is the same family at any scale, but Adam moves each weight by about its
    learning rate per step whatever the gradient's size, so the scale is the
    spline's learning rate relative to the MAF layers'. As a guide under the
    benchmark's protocol A (4 particles), 0.3 made how a two-mode mixture's
    mass is shared steadier but not settled (w1 over seeds 0-2: 0.053 at 1,
    0.041 at 0.3, worst seed 0.100 against 0.058; with autograd's STL score,
    which rounds differently, 0.031 over seeds 0-5) and raised eight schools'
    k-hat (mean over seeds 0-2: 0.48 at 1, 0.61 at 0.3, 0.58 at 0.1), so the
    default stays 1.

    Arguments:
        features: The number of features.
        context: The number of context features.
        transforms: The number of affine MAF transforms after the spline.
        bins: The number of spline bins.
        spline_scale: The factor on the spline network's outputs (> 0).
        input_bound: :math:`B` of the networks' squashed inputs (> 0), or
            ``None`` (the default) for Zuko's plain layers.
        randperm: Random feature orders instead of natural and alternated ones.
        kwargs: Passed to every layer (``hidden_features``, ``activation``, ...).

    Example:
        >>> flow = SplineMAF(2, transforms=1, hidden_features=(8,))
        >>> flow().sample((3,)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        transforms: int = 3,
        bins: int = 8,
        spline_scale: float = 1.0,
        input_bound: float | None = None,
        randperm: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_positive("spline_scale", spline_scale)
        if input_bound is not None:  # checked here too: one feature builds no BoundedInputMAT
            _check_positive("input_bound", input_bound, " or None")
        if input_bound is None or features == 1:  # Zuko's layer is element-wise for one feature
            layer = zuko.flows.MaskedAutoregressiveTransform
        else:
            layer = functools.partial(BoundedInputMAT, input_bound=input_bound)
        ordered = torch.arange(features)

        def order(i: int) -> torch.Tensor:
            return torch.randperm(features) if randperm else (ordered if i % 2 == 0 else ordered.flip(0))

        # Built in the order Zuko's MAF and NSF would build them (the MAF part
        # first), so the initial weights are those of the guides' measurements.
        affine = [layer(features, context, order=order(i), **kwargs) for i in range(transforms)]
        if spline_scale != 1:
            univariate = ScaledSpline(float(spline_scale))
        else:
            univariate = functools.partial(zuko.transforms.MonotonicRQSTransform, slope=1e-3)
        spline = layer(
            features,
            context,
            order=order(0),
            univariate=univariate,
            shapes=[(bins,), (bins,), (bins - 1,)],
            **kwargs,
        )
        base = zuko.flows.UnconditionalDistribution(
            zuko.distributions.DiagNormal,
            loc=torch.zeros(features),
            scale=torch.ones(features),
            buffer=True,
        )
        super().__init__([spline, *affine], base)


class ScaledSpline:
    """Zuko's monotonic rational-quadratic spline of ``scale`` times the raw parameters.

    A picklable stand-in for Zuko's ``univariate`` constructor (see :class:`SplineMAF`).
    """

    def __init__(self, scale: float, slope: float = 1e-3) -> None:
        self.scale = scale
        self.slope = slope

    def __call__(self, widths, heights, derivatives) -> zuko.transforms.MonotonicRQSTransform:
        s = self.scale
        return zuko.transforms.MonotonicRQSTransform(
            s * widths, s * heights, s * derivatives, slope=self.slope
        )

    def __repr__(self) -> str:
        return f"ScaledSpline(scale={self.scale})"


FLOWS: Mapping[str, FlowSpec] = MappingProxyType(
    {
        spec.name.lower(): spec
        for spec in (
            FlowSpec(
                "MAF",
                zuko.flows.MAF,
                {"transforms": 3, "hidden_features": _HIDDEN},
                summary="masked autoregressive flow, affine",
            ),
            FlowSpec(
                "SplineMAF",
                SplineMAF,
                {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                summary="one autoregressive spline layer, then affine MAF layers",
            ),
            FlowSpec(
                "NSF",
                zuko.flows.NSF,
                {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                summary="autoregressive rational-quadratic splines on [-5, 5], linear tails",
            ),
            FlowSpec(
                "NCSF",
                zuko.flows.NCSF,
                {"transforms": 3, "bins": 8, "hidden_features": _HIDDEN},
                support="circular",
                summary="circular splines for angles in [-pi, pi)",
            ),
            FlowSpec(
                "NAF",
                zuko.flows.NAF,
                {"transforms": 3, "signal": 16, "hidden_features": _HIDDEN},
                analytic_inverse=False,
                summary="neural autoregressive flow (monotonic networks)",
                packable=False,
            ),
            FlowSpec(
                "UNAF",
                zuko.flows.UNAF,
                {"transforms": 3, "signal": 16, "hidden_features": _HIDDEN},
                analytic_inverse=False,
                summary="unconstrained monotonic neural autoregressive flow",
                packable=False,
            ),
            FlowSpec(
                "SOSPF",
                zuko.flows.SOSPF,
                {"transforms": 3, "degree": 4, "polynomials": 3, "hidden_features": _HIDDEN},
                analytic_inverse=False,
                summary="sum-of-squares polynomial flow",
            ),
            FlowSpec(
                "BPF",
                zuko.flows.BPF,
                {"transforms": 3, "degree": 16, "hidden_features": _HIDDEN},
                analytic_inverse=False,
                summary="Bernstein polynomial flow on [-5, 5]",
            ),
            FlowSpec(
                "NICE",
                zuko.flows.NICE,
                {"transforms": 3, "hidden_features": _HIDDEN},
                fast="both",
                summary="coupling flow (affine coupling, as Zuko builds it)",
            ),
            FlowSpec(
                "RealNVP",
                zuko.flows.RealNVP,
                {"transforms": 3, "hidden_features": _HIDDEN},
                fast="both",
                summary="affine coupling flow",
            ),
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
            FlowSpec(
                "CNF",
                zuko.flows.CNF,
                {"hidden_features": _HIDDEN},
                fast="both",
                analytic_inverse=False,
                summary="continuous normalizing flow (ODE, exact trace)",
                packable=False,
            ),
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
