"""Watching the loss of :func:`~pyro_flowguide.fit`: a smoothing robust to outliers, and a convergence check.

The smoothed loss is an exponential moving average in which each loss's pull
is clipped to a few mean absolute deviations of the recent losses around it,
so one wild (but finite) loss moves it by a bounded amount. The convergence
check fits a line to the last three tenths of the losses and asks whether it still
falls clearly, relative to the losses' noise.
"""

from __future__ import annotations

import math

import numpy as np

from .defaults import LOSS_SMOOTHING

__all__ = ["CLIP_DEVIATIONS", "FALLING_Z", "MIN_DROP", "SMOOTHING_WARMUP", "convergence", "smooth_loss"]

#: A loss pulls the smoothed loss by at most this many mean absolute deviations.
CLIP_DEVIATIONS = 6.0
#: Finite losses averaged plainly (no clipping) before the spread is trusted.
SMOOTHING_WARMUP = 20
#: The run is "still falling" when the slope of the last losses exceeds this many standard errors ...
FALLING_Z = 4.0
#: ... and the fall over the last tenth of the run exceeds this many noise levels of a single loss.
MIN_DROP = 0.25


def smooth_loss(smoothed: float, scale: float, count: int, loss: float) -> tuple[float, float]:
    """One update of the smoothed loss and its spread.

    Arguments:
        smoothed, scale: The current smoothed loss (NaN before the first) and
            mean absolute deviation of the losses from it.
        count: Finite losses seen before this one.
        loss: The new (finite) loss.

    Returns:
        The new ``(smoothed, scale)``.
    """
    if smoothed != smoothed:
        return loss, 0.0
    d = loss - smoothed
    if count < SMOOTHING_WARMUP:
        # A plain average of |d| while the moving average of the spread would still be biased.
        return smoothed + LOSS_SMOOTHING * d, scale + (abs(d) - scale) / count
    if scale > 0.0:
        limit = CLIP_DEVIATIONS * scale
        d = min(max(d, -limit), limit)
    return smoothed + LOSS_SMOOTHING * d, scale + LOSS_SMOOTHING * (abs(d) - scale)


def convergence(losses) -> tuple[bool | None, str]:
    """Whether the loss had stopped falling at the end of a run, with the figures behind the answer.

    Fits a line to the last three tenths of the finite losses (at least 30; losses
    more than :data:`FALLING_Z` noise levels off the line are clipped and the
    line refitted). The run is unconverged when the line falls by more than
    :data:`FALLING_Z` standard errors of its slope and, over the last tenth,
    by more than :data:`MIN_DROP` noise levels. The noise comes from the
    median absolute deviation of successive differences, which a trend does
    not inflate. ``None`` with fewer than 30 finite losses.
    """
    x = np.asarray(losses, dtype=float)
    x = x[np.isfinite(x)]
    n = max(len(x) // 10, 10)
    if len(x) < 3 * n:
        return None, ""
    y = x[-3 * n :]
    diffs = np.diff(y)
    sigma = 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2.0)
    t = np.arange(3 * n, dtype=float) - (3 * n - 1) / 2.0
    sxx = float(t @ t)
    slope, level = float(t @ y) / sxx, float(y.mean())
    if sigma > 0:
        # One outlying loss must not tilt the line: clip residuals to a few noise levels, refit.
        y = level + slope * t + np.clip(y - level - slope * t, -FALLING_Z * sigma, FALLING_Z * sigma)
        slope, level = float(t @ y) / sxx, float(y.mean())
    drop = -slope * n  # the fall over the last tenth
    se = sigma / math.sqrt(sxx)
    falling = -slope > FALLING_Z * se and drop > MIN_DROP * sigma
    detail = (
        f"over the last {3 * n} steps the loss fell by {drop:.3g} per {n} steps, to about "
        f"{level + slope * (1.5 * n - 0.5):.6g}, with noise {sigma:.3g} per step"
    )
    return not falling, detail
