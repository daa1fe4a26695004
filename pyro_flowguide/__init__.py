"""pyro-flowguide: normalizing flows as first-class variational posteriors in Pyro."""

__version__ = "0.1.0"

from . import bijections  # registers biject_to for lower-Cholesky and positive-definite supports
from . import diagnostics, flows, guides, train, transforms
from .diagnostics import (
    LocalPSISResult,
    PSISResult,
    local_psis_diagnostic,
    pareto_smooth,
    psis_diagnostic,
    to_inference_data,
)
from .flows import FLOWS, FlowOptionError, FlowSpec, UnknownFlowError, flow_names, get_flow
from .guides import (
    DEFAULT_FLOW,
    AutoAmortizedFlowGuide,
    AutoFlowGuide,
    AutoStructuredFlowGuide,
    GuideSetupError,
    GuideSizeWarning,
)
from .train import (
    Callback,
    Checkpoint,
    CheckpointCorruptedError,
    CheckpointIncompleteError,
    CheckpointMismatchError,
    CheckpointModelMismatchError,
    CheckpointNonFiniteError,
    ClearFlowCaches,
    DensityFit,
    EarlyStopping,
    FitResult,
    GaussianStageResult,
    GuardedSVI,
    NonFiniteGuard,
    NonFiniteLossError,
    ProgressBar,
    RenyiDReG_ELBO,
    fit,
    gaussian_stage,
    fit_density,
    load_checkpoint,
)
from .transforms import ConditionalFlowTransform, FlowTransform, flow_transform

__all__ = [
    "Callback",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointIncompleteError",
    "CheckpointMismatchError",
    "CheckpointModelMismatchError",
    "CheckpointNonFiniteError",
    "ClearFlowCaches",
    "DensityFit",
    "EarlyStopping",
    "FitResult",
    "GaussianStageResult",
    "GuardedSVI",
    "LocalPSISResult",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PSISResult",
    "ProgressBar",
    "RenyiDReG_ELBO",
    "diagnostics",
    "fit",
    "gaussian_stage",
    "fit_density",
    "load_checkpoint",
    "local_psis_diagnostic",
    "pareto_smooth",
    "psis_diagnostic",
    "to_inference_data",
    "AutoAmortizedFlowGuide",
    "AutoFlowGuide",
    "AutoStructuredFlowGuide",
    "DEFAULT_FLOW",
    "GuideSetupError",
    "GuideSizeWarning",
    "FlowOptionError",
    "guides",
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
    "train",
    "transforms",
]


def __getattr__(name: str):
    # The previous release's module names, and the Lightning trainer (which
    # needs an optional dependency): imported on first use only.
    import importlib

    from ._deprecated import MOVED

    if name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
