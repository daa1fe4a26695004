"""Flow families: the registry of Zuko flows by name, and the families this package adds."""

from .registry import (
    FLOWS,
    FlowOptionError,
    FlowSize,
    FlowSpec,
    ResolvedFlow,
    UnknownFlowError,
    accepted_options,
    base_distribution,
    check_hyper,
    estimate_flow_parameters,
    flow_names,
    get_flow,
    resolve_flow,
)
from .spline import SplineMAF

__all__ = ["FLOWS", "FlowSpec", "ResolvedFlow", "SplineMAF", "UnknownFlowError"]
__all__ += ["FlowOptionError", "FlowSize", "accepted_options", "check_hyper", "estimate_flow_parameters"]
__all__ += ["base_distribution", "flow_names", "get_flow", "resolve_flow"]
