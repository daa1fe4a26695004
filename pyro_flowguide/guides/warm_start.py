r"""The Gaussian stage that starts a fresh :class:`~pyro_flowguide.AutoFlowGuide`.

A fresh guide is its affine stage alone (the flow starts at the identity): a
Gaussian at ``init_loc_fn``'s point with scale ``init_scale``. Adam moves the
location by about lr per step, so under ``fit``'s schedule it travels a few
units in all, and a posterior that the data pin far from the prior's median
is out of reach; a unit scale is also far from a posterior the data pin to
0.01. The stage fits the location and the per-coordinate log-scale of that
Gaussian first, by L-BFGS on the ELBO estimated with a fixed set of base
draws (a sample-average approximation: the same draws at every evaluation,
so the objective is deterministic and a line search is sound), and keeps the
result only if the ELBO on fresh draws improved. The ELBO, unlike the log
joint's mode, does not collapse into the neck of a funnel. A kept result's
scales become the location's unit
(:func:`~pyro_flowguide.guides.posterior.set_location_unit`): Adam's later
steps move the location by lr standard deviations rather than by lr. The
guide runs the stage in its first call (:func:`stage_at_setup`), so a plain
``SVI`` loop starts where :func:`~pyro_flowguide.fit` does.

Example:
    >>> import pyro
    >>> from pyro_flowguide import AutoFlowGuide
    >>> from pyro_flowguide.examples import linear_regression, linear_regression_data
    >>> x, y = linear_regression_data(intercept=9.0)
    >>> pyro.clear_param_store()
    >>> guide = AutoFlowGuide(linear_regression, warm_start=False)
    >>> result = gaussian_stage(linear_regression, guide, (x, y), {})
    >>> result.accepted, round(float(guide.affine_loc[0]), 1)
    (True, 9.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import Trace_ELBO

from ..tracing import max_plate_nesting, outside_handlers, trace_model_and_guide
from .posterior import set_location_unit

__all__ = [
    "GaussianStageResult", "gaussian_stage", "stage_at_setup", "GAUSSIAN_STAGE_DRAWS", "GAUSSIAN_STAGE_ITERATIONS",
    "GAUSSIAN_STAGE_ROUNDS",
]

#: Base draws of the sample-average ELBO.
GAUSSIAN_STAGE_DRAWS = 64
#: L-BFGS iterations in all (each may evaluate the ELBO more than once in its line search).
GAUSSIAN_STAGE_ITERATIONS = 100
#: Rounds the iterations are split into, each with a fresh curvature history.
GAUSSIAN_STAGE_ROUNDS = 4


@dataclass
class GaussianStageResult:
    """What :func:`gaussian_stage` did.

    ``before`` and ``after`` are minus the ELBO on fresh draws (not those it
    was fitted on) at the start and at the stage's end; ``accepted`` says
    whether the guide kept the stage's values; ``reason`` says why not.
    """

    accepted: bool
    before: float
    after: float
    evaluations: int
    reason: str = ""


def gaussian_stage(
    model,
    guide,
    args: tuple,
    kwargs: dict,
    *,
    draws: int = GAUSSIAN_STAGE_DRAWS,
    iterations: int = GAUSSIAN_STAGE_ITERATIONS,
    seed: int = 0,
) -> GaussianStageResult:
    """Fits the location and log-scale of ``guide``'s affine stage by L-BFGS on a fixed-draw ELBO.

    Arguments:
        model, guide: A model and an :class:`~pyro_flowguide.AutoFlowGuide` of it
            (set up here if it is not yet).
        args, kwargs: The model's arguments.
        draws: Base draws of the sample-average ELBO.
        iterations: L-BFGS iterations.
        seed: Seed of the fixed draws (``seed + 1``: the fresh draws that
            decide acceptance); the global random state is left as it was.

    Every other parameter (the flow's networks, the affine stage's
    triangular factor) is left as it is. The guide keeps the new values only
    if they are finite and minus the ELBO on fresh draws went down.
    """
    with torch.random.fork_rng(devices=[]):
        # One trace sets the guide up, registers its packed parameter and gives the plate nesting.
        nesting = max_plate_nesting(*trace_model_and_guide(model, guide, args, kwargs))
        elbo = Trace_ELBO(num_particles=draws, vectorize_particles=draws > 1, max_plate_nesting=nesting)
        packed = pyro.get_param_store()[guide.packed_param_name]
        keep = guide.affine_mask(("loc", "log_scale"))
        start = packed.detach().clone()
        estimator = guide.estimator
        # The stage needs the gradient of the value it reports, which sticking the landing is not.
        guide.estimator = "reparam"
        evaluations = 0

        def objective(draw_seed: int) -> torch.Tensor:
            torch.manual_seed(draw_seed)
            value = elbo.differentiable_loss(model, guide, *args, **kwargs)
            guide.clear_cache()
            return value

        try:
            with torch.no_grad():
                before = float(objective(seed + 1))
            hook = packed.register_hook(lambda g: torch.where(keep, g, torch.zeros_like(g)))
            best = math.inf

            def closure() -> torch.Tensor:
                nonlocal evaluations, best
                evaluations += 1
                optimizer.zero_grad()
                try:
                    value = objective(seed)
                except ValueError:  # Pyro's validation of a NaN/inf parameter: as a non-finite value
                    value = torch.tensor(math.nan, dtype=packed.dtype)
                if not torch.isfinite(value):
                    # Too far: a huge value makes the line search step back.
                    return torch.tensor(1e30, dtype=value.dtype)
                value.backward()
                best = min(best, float(value.detach()))
                return value.detach()

            try:
                with guide.without_flow():  # the flow is at the identity: its cost buys nothing here
                    # Rounds with a fresh curvature history: a line search that met a
                    # non-finite region can leave L-BFGS stalled with the old one.
                    for _ in range(GAUSSIAN_STAGE_ROUNDS):
                        reached = best
                        optimizer = torch.optim.LBFGS(
                            [packed], lr=1.0, max_iter=max(iterations // GAUSSIAN_STAGE_ROUNDS, 1),
                            history_size=20, line_search_fn="strong_wolfe",
                        )
                        optimizer.step(closure)
                        if not best < reached - 1e-4 * (1.0 + abs(best)):
                            break
            finally:
                hook.remove()
                packed.grad = None
            with torch.no_grad():
                after = float(objective(seed + 1)) if torch.isfinite(packed).all() else math.nan
        except Exception as err:  # noqa: BLE001 - the stage is a convenience: the fit goes on from the start
            with torch.no_grad():
                packed.copy_(start)
            return GaussianStageResult(False, math.nan, math.nan, evaluations, f"{type(err).__name__}: {err}")
        finally:
            guide.estimator = estimator
            guide.clear_cache()
        if not (math.isfinite(after) and (not math.isfinite(before) or after < before)):
            with torch.no_grad():
                packed.copy_(start)
            return GaussianStageResult(False, before, after, evaluations, "the ELBO on fresh draws did not improve")
        # Adam's later steps on the location then move it by lr of the stage's scales, not by lr.
        views = guide._packing.bind(packed)
        set_location_unit(views, views["log_scale"].detach().exp())
        return GaussianStageResult(True, before, after, evaluations)


def stage_at_setup(guide, args: tuple, kwargs: dict) -> GaussianStageResult:
    """Runs :func:`gaussian_stage` from within ``guide``'s first call, at the model's arguments.

    The first call may come from inside an ELBO's trace, a particle plate or
    ``torch.no_grad`` (``Predictive``): the stage runs outside every handler
    of the caller, with gradients on, and leaves the global random state as
    it was.
    """
    with outside_handlers(), torch.enable_grad():
        return gaussian_stage(guide._bare_model[0], guide, args, kwargs)
