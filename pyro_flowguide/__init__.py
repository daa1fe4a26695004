"""pyro-flowguide: normalizing flows as first-class variational posteriors in Pyro."""

__version__ = "0.1.0"

from . import flows, transforms
from .flows import FLOWS, FlowSpec, UnknownFlowError, flow_names, get_flow
from .transforms import ConditionalFlowTransform, FlowTransform, flow_transform

__all__ = [
    "FLOWS",
    "ConditionalFlowTransform",
    "FlowSpec",
    "FlowTransform",
    "UnknownFlowError",
    "__version__",
    "flow_names",
    "flow_transform",
    "flows",
    "get_flow",
    "transforms",
]
