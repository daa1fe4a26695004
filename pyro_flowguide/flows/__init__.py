"""Flow families: the registry of Zuko flows by name, and the families this package adds."""

from .registry import (
    FLOWS,
    BoundedInputMAT,
    FlowSpec,
    ScaledSpline,
    SplineMAF,
    UnknownFlowError,
    base_distribution,
    flow_names,
    get_flow,
)

__all__ = [
    "FLOWS",
    "BoundedInputMAT",
    "FlowSpec",
    "ScaledSpline",
    "SplineMAF",
    "UnknownFlowError",
    "base_distribution",
    "flow_names",
    "get_flow",
]
