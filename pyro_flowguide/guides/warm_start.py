r"""The Gaussian stage that starts a fresh :class:`~pyro_flowguide.AutoFlowGuide`.

A fresh guide is its affine stage alone (the flow starts at the identity): a
Gaussian at ``init_loc_fn``'s point with scale ``init_scale``, which Adam
moves by about lr per step, too slowly for a posterior the data pin far from
there. The stage fits the location and per-coordinate log-scale first, by
L-BFGS on the ELBO at a fixed set of base draws (a deterministic objective,
so a line search is sound), and keeps the result only if the ELBO on fresh
draws improved; unlike the log joint's mode, the ELBO does not collapse into
the neck of a funnel. A kept result's scales become the location's unit
(:func:`~pyro_flowguide.guides.posterior.set_location_unit`): Adam then moves
the location by lr standard deviations. :func:`curvature_stage` then gives
the Gaussian the covariance of the log joint's mean curvature and a Newton
step, where that improves the ELBO and a Gaussian explains the posterior by
PSIS; from there on a guide with a flow holds the affine scale and factor
(:func:`~pyro_flowguide.guides.posterior.holds_affine_scale`); the flow
shapes the rest. The guide runs the stage in its first call
(:func:`stage_at_setup`), so a plain ``SVI`` loop starts where
:func:`~pyro_flowguide.fit` does.

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
from pyro.infer.importance import vectorized_importance_weights

from ..arviz_compat import psislw
from ..tracing import max_plate_nesting, outside_handlers, trace_model_and_guide
from .posterior import affine_shift, row_scale, set_location_unit, write_affine_shift

__all__ = [
    "GaussianStageResult", "curvature_stage", "gaussian_stage", "stage_at_setup", "GAUSSIAN_STAGE_DRAWS",
    "GAUSSIAN_STAGE_ITERATIONS", "GAUSSIAN_STAGE_ROUNDS",
]

#: Draws of the PSIS check of :func:`curvature_stage`, and the largest k-hat it keeps.
CURVATURE_KHAT_DRAWS, CURVATURE_MAX_KHAT = 1000, 0.7
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
    whether the guide kept the stage's values; ``reason`` says why not;
    ``curvature`` says what :func:`curvature_stage` did after a kept stage.
    """

    accepted: bool
    before: float
    after: float
    evaluations: int
    reason: str = ""
    curvature: str = ""


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
        views = guide._packing.bind(packed)
        scales = views["log_scale"].detach().exp().clone()
        curvature = curvature_stage(model, guide, args, kwargs, after, elbo, seed)
        # Adam's later steps on the location then move it by lr of the stage's scales, not by lr.
        set_location_unit(views, scales)
        return GaussianStageResult(True, before, after, evaluations, curvature=curvature)


def _fixed_draw_loss(model, guide, args: tuple, kwargs: dict, elbo, draw_seed: int) -> torch.Tensor:
    """Minus the ELBO of ``guide``'s affine stage alone at the draws of ``draw_seed`` (plain reparameterised gradient)."""
    estimator, guide.estimator = guide.estimator, "reparam"
    try:
        torch.manual_seed(draw_seed)
        with guide.without_flow():
            return elbo.differentiable_loss(model, guide, *args, **kwargs)
    finally:
        guide.estimator = estimator
        guide.clear_cache()


def curvature_stage(model, guide, args: tuple, kwargs: dict, after: float, elbo, seed: int = 0) -> str:
    r"""Gives a fitted diagonal stage the covariance of the log joint's mean curvature.

    With :math:`q` the stage's Gaussian, :math:`P = \mathbb{E}_q[-\nabla^2 \log p]`
    (the Hessian of minus the fixed-draw ELBO in the location; one double
    backward pass per coordinate) is the precision at which a Gaussian
    :math:`q` is stationary, and exact for a Gaussian posterior. The affine
    stage's covariance becomes :math:`P^{-1}`, and its location takes one
    Newton step, :math:`P^{-1} \nabla \log p` at the location. The guide
    keeps them if :math:`P` is positive definite, minus the ELBO on fresh
    draws (seed ``seed + 1``) goes below ``after``, and the new Gaussian
    explains the posterior: PSIS k-hat of :data:`CURVATURE_KHAT_DRAWS` draws
    at most :data:`CURVATURE_MAX_KHAT`. A Gaussian held where it does not (a
    multimodal posterior, a funnel) would keep the flow from reaching the
    rest. Otherwise the guide is left as it was. Runs only on a guide with a
    triangular factor and a learnable flow. Returns what it did:
    ``"kept"``, or why not.
    """
    packed = pyro.get_param_store()[guide.packed_param_name]
    views = guide._packing.bind(packed)
    if "scale_tril" not in views or not guide.has_learnable_flow:
        return "no factor or no flow"
    start = packed.detach().clone()
    loc = guide.affine_mask(("loc",))
    try:
        with torch.random.fork_rng(devices=[]):
            grad = torch.autograd.grad(_fixed_draw_loss(model, guide, args, kwargs, elbo, seed), packed,
                                       create_graph=True)[0][loc]
            rows = [torch.autograd.grad(grad[i], packed, retain_graph=i + 1 < grad.numel())[0][loc]
                    for i in range(grad.numel())]
            unit = views["loc_unit"].detach().double()  # the shift is loc * unit
            precision = torch.stack(rows).double() / unit[:, None] / unit[None, :]
            chol, info = torch.linalg.cholesky_ex((precision + precision.mT) / 2)
            if info != 0 or not torch.isfinite(chol).all():
                return "the mean curvature is not positive definite"
            covariance = torch.cholesky_inverse(chol)
            factor = torch.linalg.cholesky(covariance)
            scale = factor.diagonal()
            raw = (factor / scale[:, None]).tril(-1)
            if guide._factor_scaled:
                raw = raw / row_scale(raw.shape[-1], raw)
            with torch.no_grad():
                views["log_scale"].sub_(math.log(1e3))  # nearly a point mass at the location
            point = torch.autograd.grad(_fixed_draw_loss(model, guide, args, kwargs, elbo, seed), packed)[0][loc]
            with torch.no_grad():
                views["log_scale"].add_(math.log(1e3))
                shift = affine_shift(views).double() - covariance @ (point.double() / unit)
                write_affine_shift(views, shift.to(packed.dtype))
                views["log_scale"].copy_(scale.log().to(packed.dtype))
                views["scale_tril"].copy_(raw.to(packed.dtype))
                new = float(_fixed_draw_loss(model, guide, args, kwargs, elbo, seed + 1))
            reason = "the ELBO on fresh draws did not improve"
            if math.isfinite(new) and new < after:
                torch.manual_seed(seed + 2)
                with guide.without_flow(), torch.no_grad():
                    log_weights = vectorized_importance_weights(
                        model, guide, *args, num_samples=CURVATURE_KHAT_DRAWS,
                        max_plate_nesting=elbo.max_plate_nesting, normalized=False, **kwargs)[0]
                guide.clear_cache()
                log_weights = log_weights.detach().double()
                # Nearly equal weights: the Gaussian is the posterior, whatever shape the tail fit takes. The
                # bound is diagnostics.psis.FLAT_LOG_WEIGHT_SD's, which this layer may not import.
                flat = float(log_weights.std()) < 0.05
                khat = -math.inf if flat else psislw(log_weights.numpy())[1]
                if khat <= CURVATURE_MAX_KHAT:
                    return "kept"
                reason = f"the Gaussian does not explain the posterior (PSIS k-hat {khat:.2f} > {CURVATURE_MAX_KHAT})"
    except Exception as err:  # noqa: BLE001 - as the stage: the guide goes on from the diagonal stage
        reason = f"{type(err).__name__}: {err}"
    with torch.no_grad():
        packed.copy_(start)
    return reason


def stage_at_setup(guide, args: tuple, kwargs: dict) -> GaussianStageResult:
    """Runs :func:`gaussian_stage` from within ``guide``'s first call, at the model's arguments.

    The first call may come from inside an ELBO's trace, a particle plate or
    ``torch.no_grad`` (``Predictive``): the stage runs outside every handler
    of the caller, with gradients on, and leaves the global random state as
    it was.
    """
    with outside_handlers(), torch.enable_grad():
        return gaussian_stage(guide._bare_model[0], guide, args, kwargs)
