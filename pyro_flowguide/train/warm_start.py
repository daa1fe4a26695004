"""The Gaussian stage, as ``fit`` uses it: :mod:`pyro_flowguide.guides.warm_start` holds it."""

from ..guides.warm_start import (
    GAUSSIAN_STAGE_DRAWS,
    GAUSSIAN_STAGE_ITERATIONS,
    GAUSSIAN_STAGE_ROUNDS,
    GaussianStageResult,
    gaussian_stage,
)

__all__ = [
    "GaussianStageResult", "gaussian_stage", "GAUSSIAN_STAGE_DRAWS", "GAUSSIAN_STAGE_ITERATIONS",
    "GAUSSIAN_STAGE_ROUNDS",
]
