"""Checking a fitted guide: PSIS diagnostics (joint and per datum), export to ArviZ, and plots.

Example:
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from pyro_flowguide.diagnostics import psis_diagnostic
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> psis_diagnostic(model, AutoNormal(model), num_samples=100).num_samples
    100
"""

from . import plots
from .inference_data import to_inference_data
from .local import LocalPSISResult, local_psis_diagnostic
from .psis import FLAT_LOG_WEIGHT_SD, PSISResult, pareto_smooth, psis_diagnostic

__all__ = [
    "FLAT_LOG_WEIGHT_SD",
    "LocalPSISResult",
    "PSISResult",
    "local_psis_diagnostic",
    "pareto_smooth",
    "plots",
    "psis_diagnostic",
    "to_inference_data",
]
