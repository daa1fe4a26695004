"""Autoguides: the flow posterior over a model's continuous latents, its amortized and structured variants."""

from .amortized import AutoAmortizedFlowGuide, subsample_indices
from .flow_guide import DEFAULT_FLOW, STL_MAX_DIM, AutoFlowGuide
from .sites import GuideSetupError
from .sizes import GuideSizeWarning
from .structured import AutoStructuredFlowGuide

__all__ = [
    "DEFAULT_FLOW",
    "STL_MAX_DIM",
    "AutoAmortizedFlowGuide",
    "AutoFlowGuide",
    "AutoStructuredFlowGuide",
    "GuideSetupError",
    "GuideSizeWarning",
    "subsample_indices",
]

