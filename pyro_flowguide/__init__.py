"""pyro-flowguide: normalizing flows as first-class variational posteriors in Pyro."""

__version__ = "0.1.0"

from . import _bijections  # registers biject_to for lower-Cholesky and positive-definite supports
from . import amortized, flows, guides, transforms
from . import arviz, density, diagnostics, elbo, infer, plots
from .arviz import to_inference_data
from .density import DensityFit, fit_density
from .diagnostics import PSISResult, psis_diagnostic
from .elbo import RenyiDReG_ELBO
from .infer import (
    Callback,
    Checkpoint,
    CheckpointMismatchError,
    ClearFlowCaches,
    EarlyStopping,
    FitResult,
    NonFiniteGuard,
    NonFiniteLossError,
    ProgressBar,
    fit,
    load_checkpoint,
)
from .flows import FLOWS, FlowSpec, UnknownFlowError, flow_names, get_flow
from .guides import DEFAULT_FLOW, AutoFlowGuide, GuideSetupError
from .amortized import AutoAmortizedFlowGuide, local_psis_diagnostic
from .transforms import ConditionalFlowTransform, FlowTransform, flow_transform

__all__ = [
    "Callback",
    "Checkpoint",
    "CheckpointMismatchError",
    "ClearFlowCaches",
    "DensityFit",
    "EarlyStopping",
    "FitResult",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PSISResult",
    "ProgressBar",
    "RenyiDReG_ELBO",
    "amortized",
    "arviz",
    "density",
    "diagnostics",
    "elbo",
    "fit",
    "fit_density",
    "infer",
    "load_checkpoint",
    "local_psis_diagnostic",
    "plots",
    "psis_diagnostic",
    "to_inference_data",
    "AutoAmortizedFlowGuide",
    "AutoFlowGuide",
    "DEFAULT_FLOW",
    "GuideSetupError",
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
    "transforms",
]


def __getattr__(name: str):
    # `distributed` needs the optional Lightning dependency: import it on first use only.
    if name == "distributed":
        import importlib

        return importlib.import_module(f"{__name__}.distributed")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
