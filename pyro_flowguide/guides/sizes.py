"""The size guard: what a guide's flow will allocate, checked before it is built.

:func:`check_flow_size` estimates the flow from its family's layout
(:func:`~pyro_flowguide.flows.registry.estimate_flow_parameters`, nothing is
allocated), warns above :data:`LARGE_FLOW_PARAMETERS` parameters and raises a
:class:`~pyro_flowguide.guides.sites.GuideSetupError` when training it would
take more than :data:`MEMORY_FRACTION` of the free memory, or when building its
masks would take minutes (:data:`MAX_BUILD_FLOPS`). Each message names the flow
and what to choose instead.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..flows.registry import FlowSize, estimate_flow_parameters, resolve_flow
from .sites import GuideSetupError

__all__ = [
    "GuideSizeWarning",
    "LARGE_FLOW_PARAMETERS",
    "MAX_BUILD_FLOPS",
    "MEMORY_FRACTION",
    "available_memory",
    "check_allocation",
    "check_flow_size",
]

#: Above this many flow parameters the guide warns before building the flow.
LARGE_FLOW_PARAMETERS = 10_000_000

#: The largest share of the free memory a guide may take (parameters, gradients, optimiser state).
MEMORY_FRACTION = 0.5

#: Above this many operations spent on masks the build would take minutes: raise instead (may be raised).
MAX_BUILD_FLOPS = 3e11

# A float32 parameter, its gradient and two Adam moments.
_BYTES_PER_PARAMETER = 16


class GuideSizeWarning(UserWarning):
    """A guide about to allocate a large flow."""


def available_memory() -> int | None:
    """Free memory in bytes: ``MemAvailable`` of ``/proc/meminfo``, else psutil's, else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # pragma: no cover


def check_allocation(nbytes: float, what: str, advice: str = "", fraction: float | None = None) -> None:
    """Raises :class:`GuideSetupError` if ``what`` would take more than ``fraction`` of the free memory.

    Skipped where the free memory cannot be read.
    """
    free = available_memory()
    fraction = MEMORY_FRACTION if fraction is None else fraction
    if free is None or nbytes <= fraction * free:
        return
    raise GuideSetupError(
        f"{what} would allocate about {_human(nbytes)}, more than {fraction:.0%} of the "
        f"{_human(free)} of memory free now{'; ' + advice if advice else ''}"
    )


def check_flow_size(flow: Any, dim: int, hyper: dict) -> FlowSize | None:
    """Checks what the guide's flow over ``dim`` coordinates will allocate, before it is built.

    Arguments:
        flow: The ``flow=`` argument (only registry names and classes are estimated).
        dim: The number of latent coordinates.
        hyper: The hyper-parameters the flow will be built with (defaults included).

    Returns:
        The estimate, or ``None`` for a flow it cannot estimate.
    """
    resolved = resolve_flow(flow)
    if not resolved.takes_hyper or resolved.spec is None:
        return None
    spec = resolved.spec
    size = estimate_flow_parameters(spec, dim, hyper)
    what = f"flow {spec.name!r} over {dim} latent coordinates (hidden_features={tuple(hyper.get('hidden_features', ()))})"
    masked = size.build_flops > 0
    advice = (
        "for a model whose latents sit in plates or in long vectors (a chain), use "
        "AutoFlowGuide(model) without the full flow's options (or structure='sites'), whose "
        "structured posterior grows linearly with the latents; otherwise "
        "choose flow=None (a Gaussian guide), "
        + ("a coupling flow such as flow='RealNVP', " if masked else "")
        + "or a smaller hidden_features, e.g. (64, 64)"
    )
    if size.build_flops > MAX_BUILD_FLOPS:
        raise GuideSetupError(
            f"building the masks of the {what} takes about {size.build_flops:.1e} operations (they grow as "
            f"the cube of the latent size), minutes of set-up before the first step; use "
            "AutoFlowGuide(model, structure='sites') for plated or chain latents, or choose flow=None (a "
            "Gaussian guide) or a coupling flow such as flow='RealNVP', which have no such masks "
            "(or raise pyro_flowguide.guides.sizes.MAX_BUILD_FLOPS to build it anyway)"
        )
    check_allocation(size.parameters * _BYTES_PER_PARAMETER, f"training the {what}, {size.parameters:,} parameters,", advice)
    check_allocation(size.build_bytes, f"building the masks of the {what}", advice)
    if size.parameters > LARGE_FLOW_PARAMETERS:
        warnings.warn(
            f"the {what} has {size.parameters:,} parameters (about "
            f"{_human(size.parameters * _BYTES_PER_PARAMETER)} to train with Adam); if that is more than "
            f"intended, {advice}",
            GuideSizeWarning,
            stacklevel=3,
        )
    return size
