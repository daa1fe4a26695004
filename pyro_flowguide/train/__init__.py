"""Training: ``fit`` on Pyro's ``SVI`` with guards and checkpoints, its losses, density fitting, Lightning."""

from .callbacks import Callback, Checkpoint, ClearFlowCaches, EarlyStopping, NonFiniteGuard, ProgressBar
from .checkpoints import (
    CheckpointCorruptedError, CheckpointIncompleteError, CheckpointMismatchError, CheckpointModelMismatchError,
    CheckpointNonFiniteError, load_checkpoint,
)
from .defaults import (
    DEFAULT_CHECKPOINT_EVERY, DEFAULT_CLIP_NORM, DEFAULT_FINAL_LR, DEFAULT_LR, DEFAULT_MAX_BAD_STEPS,
    DEFAULT_NUM_PARTICLES, DEFAULT_STEPS, LOSS_SMOOTHING, default_loss, default_optim, geometric_decay,
)
from .density import DensityFit, ValidationLoss, fit_density
from .guard import GuardedSVI, NonFiniteLossError
from .loop import FitResult, FitState, fit
from .losses import DEFAULT_ALPHA, RenyiDReG_ELBO
from .warm_start import GaussianStageResult, gaussian_stage

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_CHECKPOINT_EVERY", "DEFAULT_CLIP_NORM", "DEFAULT_FINAL_LR", "DEFAULT_LR",
    "DEFAULT_MAX_BAD_STEPS", "DEFAULT_NUM_PARTICLES", "DEFAULT_STEPS", "LOSS_SMOOTHING",
    "Callback", "Checkpoint", "CheckpointCorruptedError", "CheckpointIncompleteError", "CheckpointMismatchError",
    "CheckpointModelMismatchError", "CheckpointNonFiniteError", "ClearFlowCaches", "DensityFit", "EarlyStopping",
    "FitResult", "FitState", "GaussianStageResult", "GuardedSVI", "NonFiniteGuard", "NonFiniteLossError", "ProgressBar",
    "RenyiDReG_ELBO", "ValidationLoss", "default_loss", "default_optim", "fit", "fit_density",
    "gaussian_stage", "geometric_decay", "load_checkpoint",
]
