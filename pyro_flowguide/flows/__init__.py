"""Flow families: the registry of Zuko flows by name, and the families this package adds."""

from .registry import (
    FLOWS,
    FlowSpec,
    ResolvedFlow,
    UnknownFlowError,
    base_distribution,
    flow_names,
    get_flow,
    resolve_flow,
)
from .spline import SplineMAF

__all__ = ["FLOWS", "FlowSpec", "ResolvedFlow", "SplineMAF", "UnknownFlowError"]
__all__ += ["base_distribution", "flow_names", "get_flow", "resolve_flow"]
