"""Autoguides: the flow posterior over a model's continuous latents, and its amortized variant."""

from .amortized import AutoAmortizedFlowGuide, subsample_indices
from .flow_guide import DEFAULT_FLOW, STL_MAX_DIM, AutoFlowGuide
from .sites import GuideSetupError
from .sizes import GuideSizeWarning

__all__ = [
    "DEFAULT_FLOW",
    "STL_MAX_DIM",
    "AutoAmortizedFlowGuide",
    "AutoFlowGuide",
    "GuideSetupError",
    "GuideSizeWarning",
    "subsample_indices",
]

