"""Checking a fitted guide: PSIS diagnostics, export to ArviZ, and plots."""

from . import plots  # noqa: F401  (pyro_flowguide.diagnostics.plots)
from .inference_data import to_inference_data
from .psis import FLAT_LOG_WEIGHT_SD, PSISResult, psis_diagnostic

__all__ = ["FLAT_LOG_WEIGHT_SD", "PSISResult", "psis_diagnostic", "to_inference_data"]
