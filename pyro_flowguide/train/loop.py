r"""Fitting a guide with Pyro's ``SVI``: sensible defaults, guards, progress, checkpoints.

:func:`fit` runs Pyro's ``SVI`` (its ELBOs, its optimisers, its param store)
with the defaults of :mod:`~pyro_flowguide.train.defaults` and wraps each step
in :class:`~pyro_flowguide.train.callbacks.Callback` objects: cache clearing,
the non-finite guard (a step with a NaN/inf loss or gradient is skipped),
a progress bar, early stopping and atomic checkpoints (``resume=True``
continues bit for bit).

Example:
    >>> import pyro, torch, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoDelta
    >>> def model():
    ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> pyro.clear_param_store()
    >>> result = fit(model, AutoDelta(model), steps=50, progress=False, seed=0)
    >>> result.steps, result.stop_reason
    (50, 'completed')
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import PyroOptim

from .callbacks import Callback, Checkpoint, ClearFlowCaches, NonFiniteGuard, ProgressBar
from .arguments import check_guide_sites, check_loss_enumerates, check_lr, checked_steps, enumerated_sites
from .checkpoints import check_resumable, fit_signature, load_checkpoint, restore
from .defaults import DEFAULT_CHECKPOINT_EVERY, DEFAULT_NUM_PARTICLES, DEFAULT_STEPS
from .defaults import default_optim, geometric_decay, training_defaults
from .guard import GuardedSVI, NonFiniteLossError, first_line
from .monitor import convergence, smooth_loss
from ..tracing import max_plate_nesting as max_plate_nesting_of
from ..tracing import trace_model_and_guide

__all__ = ["FitResult", "FitState", "fit"]


@dataclass(eq=False)
class FitState:
    """What callbacks see: the objects being fitted and the progress so far.

    Callbacks read it and may set ``stop_reason`` (a string) to end the fit
    after the current step, or write numbers into ``metrics``.
    """

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    svi: SVI
    steps: int
    step: int = 0
    loss: float = math.nan
    smoothed_loss: float = math.nan
    smoothed_scale: float = 0.0
    finite: bool = True
    bad_reason: str | None = None
    num_skipped: int = 0
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    error: BaseException | None = None
    signature: dict | None = None

    @property
    def optim(self) -> PyroOptim:
        return self.svi.optim


@dataclass(eq=False)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        losses: The loss of every step (NaN/inf where the step was skipped),
            including steps done before a resume.
        steps: Steps done in total.
        wall_time: Seconds this call took.
        stop_reason: ``"completed"``, an early-stopping message, or the reason
            a callback gave.
        num_skipped: Steps skipped by the non-finite guard.
        smoothed_loss: The final smoothed loss (a moving average that one
            outlying loss moves by a bounded amount).
        converged: Whether the loss had stopped falling at the end: ``False``
            when the last losses still fall clearly, relative to their noise
            (``fit`` then warns; see :func:`~pyro_flowguide.train.monitor.convergence`),
            ``True`` also after early stopping, ``None`` when the run was too
            short to tell or was stopped otherwise.
        num_particles: Particles per step; ``vectorized``: whether they ran
            under an outer plate.
        warm_start: What the guide type's warm start did before the first
            step (a :class:`~pyro_flowguide.train.warm_start.GaussianStageResult`
            for ``AutoFlowGuide``), or ``None`` when none ran.
    """

    losses: np.ndarray
    steps: int
    wall_time: float
    stop_reason: str
    num_skipped: int = 0
    smoothed_loss: float = math.nan
    num_particles: int | None = None
    vectorized: bool | None = None
    converged: bool | None = None
    warm_start: Any = None

    def __repr__(self) -> str:
        return (
            f"FitResult(steps={self.steps}, smoothed_loss={self.smoothed_loss:.6g}, "
            f"wall_time={self.wall_time:.1f}s, stop_reason={self.stop_reason!r}, "
            f"num_skipped={self.num_skipped}, converged={self.converged})"
        )

    def plot(self, ax=None, **kwargs):
        """Plots the loss curve (raw and smoothed); returns the matplotlib axes."""
        from ..diagnostics.plots import plot_losses

        return plot_losses(self.losses, ax=ax, **kwargs)


# --------------------------------------------------------------------------- loss selection


def _enum_elbo(guide, num_particles: int, vectorize_particles: bool, max_plate_nesting: int):
    return TraceEnum_ELBO(
        num_particles=num_particles,
        vectorize_particles=vectorize_particles and num_particles > 1,
        max_plate_nesting=max_plate_nesting,
    )


def _choose_loss(model, guide, args, kwargs, traces, num_particles: int | None, vectorize: bool):
    """The default ELBO, falling back to sequential particles if the model rejects an outer plate.

    A model with sites to enumerate (discrete, ``infer={"enumerate": "parallel"}``,
    not in the guide) gets ``TraceEnum_ELBO`` with the plates' nesting.
    """
    max_plate_nesting = max_plate_nesting_of(*traces)
    sequential = num_particles  # as many as asked for, or at most the default: each is a full pass
    if num_particles is None:
        num_particles = training_defaults(guide).num_particles
        sequential = min(num_particles, DEFAULT_NUM_PARTICLES)
    build = _enum_elbo if enumerated_sites(*traces) else training_defaults(guide).loss
    make = functools.partial(build, guide)
    if not (vectorize and num_particles > 1):
        return make(sequential, False, max_plate_nesting), False
    loss = make(num_particles, True, max_plate_nesting)
    try:
        with torch.no_grad(), poutine.block():
            loss.loss(model, guide, *args, **kwargs)
        return loss, True
    except Exception as vec_err:  # noqa: BLE001 - any failure under the plate counts
        try:
            with torch.no_grad(), poutine.block():
                make(1, False, max_plate_nesting).loss(model, guide, *args, **kwargs)
        except Exception:  # noqa: BLE001
            # The model fails without the particle plate too: not a plate problem.
            # Keep the vectorised loss and let the first step report the real error.
            return loss, True
        warnings.warn(
            f"fit: the model cannot run under an outer plate of {num_particles} vectorised "
            f"particles ({first_line(vec_err)}); using {sequential} sequential particles "
            "instead, about that many times slower per step. To vectorise, give every "
            "batch dimension a pyro.plate (or .to_event) and avoid code that depends on "
            "value shapes; or pass num_particles=1.",
            UserWarning,
            stacklevel=3,
        )
        return make(sequential, False, max_plate_nesting), False


def _default_callbacks(
    progress: bool, checkpoint, checkpoint_every: int, user: Sequence[Callback]
) -> list[Callback]:
    user = list(user)
    for cb in user:
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks must be pyro_flowguide.train.Callback instances, got {type(cb).__name__}; "
                "subclass Callback and override on_step/on_end"
            )
    user_types = {type(cb) for cb in user}
    defaults: list[Callback] = []
    if ClearFlowCaches not in user_types:
        defaults.append(ClearFlowCaches())
    if NonFiniteGuard not in user_types:
        defaults.append(NonFiniteGuard())
    if progress and ProgressBar not in user_types:
        defaults.append(ProgressBar())
    callbacks = defaults + user
    if checkpoint is not None:
        callbacks.append(Checkpoint(checkpoint, every=checkpoint_every))
    checkpoints = [cb for cb in callbacks if isinstance(cb, Checkpoint)]
    for cb in checkpoints:
        cb.callbacks = callbacks  # a checkpoint carries every callback's state
    return callbacks


# --------------------------------------------------------------------------- fit


def fit(
    model: Callable,
    guide: Callable,
    *args: Any,
    steps: int = DEFAULT_STEPS,
    optim: PyroOptim | None = None,
    loss: Any = None,
    num_particles: int | None = None,
    vectorize_particles: bool = True,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
    warm_start: bool = True,
    **kwargs: Any,
) -> FitResult:
    r"""Fits ``guide`` to the posterior of ``model`` with Pyro's ``SVI``.

    Every step is ``SVI``'s own (``loss_and_grads`` then the optimiser), with
    one difference: when the loss or a gradient is NaN/inf, or Pyro's
    validation rejects a non-finite distribution parameter, the optimiser
    update is not applied, so parameters and optimiser state stay exactly as
    they were. Parameters live in Pyro's global param store, as with ``SVI``
    (call ``pyro.clear_param_store()`` before fitting a fresh guide).

    Arguments:
        model, guide: A Pyro model and guide (any guide: autoguides,
            :class:`~pyro_flowguide.AutoFlowGuide`, hand-written).
        args, kwargs: Passed to model and guide at every step.
        steps: Total number of steps (a resumed fit counts the steps already done).
        optim: A ``pyro.optim`` optimiser; default :func:`default_optim`
            (ClippedAdam, lr 1e-2 decayed over ``steps`` to the ``final_lr`` of
            the guide's entry in :data:`~pyro_flowguide.train.defaults.TRAINING_DEFAULTS`
            (``AutoFlowGuide``: 3e-4; other guides: 1e-3); clip 10).
        loss: A Pyro ELBO. Default: the ``loss`` of the guide's entry in
            ``TRAINING_DEFAULTS`` (``AutoFlowGuide`` with sticking the landing and
            no non-centred sites: :class:`~pyro_flowguide.train.losses.RenyiDReG_ELBO`
            of order 1/2, whose losses are minus that bound, not minus the ELBO;
            otherwise ``Trace_ELBO``), with ``num_particles`` particles. A model
            with discrete sites marked for parallel enumeration (e.g. by
            ``@config_enumerate``) that the guide does not sample gets
            ``TraceEnum_ELBO`` with the model's plate nesting instead. When
            given, ``num_particles`` and ``vectorize_particles`` are not used.
        num_particles: Particles per step of the default loss. Default: the
            ``num_particles`` of the guide's entry in ``TRAINING_DEFAULTS``
            (``AutoFlowGuide``: 32; ``AutoAmortizedFlowGuide``: 8; other
            guides: :data:`DEFAULT_NUM_PARTICLES`, 4).
        vectorize_particles: Draw the particles under an outer plate. If the
            model cannot run under one, ``fit`` warns once with the reason and
            uses sequential particles (at most :data:`DEFAULT_NUM_PARTICLES`
            of them unless ``num_particles`` is given: each costs a full step).
        callbacks: Extra :class:`Callback` objects, run after the built-in
            ones (cache clearing, :class:`NonFiniteGuard`, progress bar). A
            callback of a built-in type replaces the built-in one.
        progress: Show a tqdm bar with the smoothed loss; ``False`` prints nothing.
        seed: Seeds torch, numpy and ``random`` (via ``pyro.set_rng_seed``) first.
        checkpoint: A file to checkpoint to (see :class:`Checkpoint`).
        checkpoint_every: Steps between checkpoints.
        resume: Continue from ``checkpoint`` if it exists: parameters,
            optimiser state, RNG states, step count and loss history are
            restored, so the run continues bit for bit. A checkpoint of another
            model/guide, a corrupted or incomplete one, or one with non-finite
            parameters raises a :class:`CheckpointMismatchError` subclass
            naming the problem. With another ``steps`` than the checkpoint's
            and the default optimiser, the learning rate decays from its
            current value to the final one over the remaining steps (with a warning).
        warm_start: Run the ``warm_start`` of the guide's entry in
            ``TRAINING_DEFAULTS`` before the first step, when the guide is
            untrained and the fit is not resumed (``AutoFlowGuide``: the
            Gaussian stage of :func:`~pyro_flowguide.train.warm_start.gaussian_stage`,
            which fits the affine stage (the Gaussian the guide starts as) by L-BFGS; other
            guides: none; not for a model with enumerated sites). A guide
            that ran the stage in its first call (its ``warm_start`` option)
            is not staged twice. ``False`` starts from the guide's initial
            values: an ``AutoFlowGuide`` not yet set up then skips its own stage too.

    Returns:
        A :class:`FitResult`.

    Warns when the loss was still falling at the end of a completed run
    (``FitResult.converged`` is then ``False``).

    Raises:
        NonFiniteLossError: after too many consecutive non-finite steps; it
            names the offending sites and carries the partial result.

    Example:
        >>> import pyro
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyro_flowguide.examples import linear_regression, linear_regression_data
        >>> x, y = linear_regression_data()
        >>> pyro.clear_param_store()
        >>> guide = AutoNormal(linear_regression)
        >>> result = fit(linear_regression, guide, x, y, steps=100, progress=False)
        >>> len(result.losses), result.num_particles, result.vectorized
        (100, 4, True)
    """
    steps = checked_steps(steps)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path> to resume from")
    default_schedule = optim is None
    if optim is None:
        optim = default_optim(steps, training_defaults(guide).final_lr)
    elif not isinstance(optim, PyroOptim):
        raise TypeError(
            f"optim must be a pyro.optim optimiser, got {type(optim).__name__}; wrap a torch "
            "optimiser as pyro.optim.Adam({'lr': 1e-2}) or pyro.optim.ClippedAdam({...})"
        )
    check_lr(optim)
    start = time.perf_counter()
    if seed is not None:
        pyro.set_rng_seed(seed)

    vectorized: bool | None = None
    particles: int | None = None
    with warnings.catch_warnings():
        # The guard reports skipped steps itself; Pyro's per-step NaN warnings would repeat it.
        warnings.filterwarnings("ignore", message="Encountered NaN")
        path = None if checkpoint is None else os.fspath(checkpoint)
        resuming = resume and os.path.exists(path)
        set_up = getattr(guide, "prototype_trace", True) is not None
        if (resuming or not warm_start) and not set_up and hasattr(guide, "_warm_start_arg"):
            guide._warm_start_arg = False  # the guide's own stage, in its first call, is the same start
        # One trace of guide and model: every parameter exists after it.
        traces = trace_model_and_guide(model, guide, args, kwargs)
        check_guide_sites(*traces)
        if loss is None:
            loss, vectorized = _choose_loss(model, guide, args, kwargs, traces, num_particles, vectorize_particles)
            particles = loss.num_particles
        else:
            check_loss_enumerates(loss, traces)
            particles = getattr(loss, "num_particles", None)
            vectorized = getattr(loss, "vectorize_particles", None)
        svi = GuardedSVI(model, guide, optim, loss)
        state = FitState(model=model, guide=guide, args=args, kwargs=kwargs, svi=svi, steps=steps)
        cbs = _default_callbacks(progress, checkpoint, checkpoint_every, callbacks)

        if resume:
            if resuming:
                state.signature = fit_signature(guide, *traces)
                payload = load_checkpoint(path)
                check_resumable(state, payload, path)
                if default_schedule:
                    _redo_decay(payload, steps, training_defaults(guide).final_lr, path)
                restore(state, payload, cbs, path)
                if state.step >= steps:
                    warnings.warn(
                        f"fit: the checkpoint {path!r} holds {state.step} steps already, at least steps={steps}, "
                        "so no step runs (steps counts every step of the run); pass a larger steps to train on",
                        UserWarning,
                        stacklevel=2,
                    )
            else:
                warnings.warn(
                    f"fit: no checkpoint at {path!r} yet; starting from step 0", UserWarning, stacklevel=2
                )
        if checkpoint is not None and state.signature is None:
            state.signature = fit_signature(guide, *traces)
        started = None
        stage = training_defaults(guide).warm_start
        # An enumerated model's objective is TraceEnum_ELBO's, which the stage does not use.
        enumerated = isinstance(loss, TraceEnum_ELBO)
        if warm_start and stage is not None and state.step == 0 and not enumerated and getattr(guide, "untrained", False):
            # A guide that ran the stage in its first call starts from it already.
            started = getattr(guide, "warm_start_result", None) or stage(model, guide, args, kwargs)

        _run(state, cbs)
    converged = None
    if state.stop_reason is None:
        converged, detail = convergence(state.losses)
        if converged is False:
            warnings.warn(
                f"fit: the loss was still falling when the run ended ({detail}), so the guide has "
                f"probably not converged. Run more steps (e.g. steps={2 * state.steps}): the "
                "learning rate decays over `steps`, so a short run ends before the loss settles; "
                "resume=True from a checkpoint continues with the larger steps.",
                UserWarning,
                stacklevel=2,
            )
    elif state.stop_reason.startswith("early stopping"):
        converged = True
    return FitResult(
        losses=np.asarray(state.losses, dtype=float),
        steps=state.step,
        wall_time=time.perf_counter() - start,
        stop_reason=state.stop_reason or "completed",
        num_skipped=state.num_skipped,
        smoothed_loss=state.smoothed_loss,
        num_particles=particles,
        vectorized=vectorized,
        converged=converged,
        warm_start=started,
    )


def _redo_decay(payload: dict, steps: int, final_lr: float, path: str) -> None:
    """Re-derives the default schedule's per-step decay when a run resumes with another ``steps``."""
    old_steps, step = int(payload["steps"]), int(payload["step"])
    if old_steps == steps or steps <= step:
        return
    lrs = []
    for optim_state in payload["optim"].values():
        for group in optim_state.get("param_groups", []):
            if "lrd" in group:
                group["lrd"] = geometric_decay(group["lr"], final_lr, steps - step)
                lrs.append(group["lr"])
    if lrs:
        warnings.warn(
            f"fit: checkpoint {path!r} was written by a run of steps={old_steps}, resumed with "
            f"steps={steps}; the learning rate now decays from the checkpoint's {max(lrs):.3g} to "
            f"{final_lr:.3g} over the remaining {steps - step} steps (instead of the old run's "
            "per-step decay).",
            UserWarning,
            stacklevel=3,
        )


def _run(state: FitState, callbacks: list[Callback]) -> None:
    svi = state.svi
    args, kwargs = state.args, state.kwargs
    losses = state.losses
    on_step = [cb.on_step for cb in callbacks if type(cb).on_step is not Callback.on_step]
    try:
        for cb in callbacks:
            cb.on_start(state)
        while state.step < state.steps and state.stop_reason is None:
            loss = svi.step(*args, **kwargs)
            state.finite = svi.finite
            if not svi.finite:
                state.bad_reason = svi.bad_reason
            state.step += 1
            state.loss = loss
            losses.append(loss)
            if state.finite:
                count = len(losses) - 1 - state.num_skipped
                state.smoothed_loss, state.smoothed_scale = smooth_loss(
                    state.smoothed_loss, state.smoothed_scale, count, loss
                )
            else:
                state.num_skipped += 1
            for hook in on_step:
                hook(state)
    except KeyboardInterrupt:
        state.stop_reason = "interrupted"
    except BaseException as err:
        state.error = err
        raise
    finally:
        for cb in callbacks:
            try:
                cb.on_end(state)
            except Exception:  # noqa: BLE001 - do not hide the error that ended the fit
                if state.error is None:
                    raise
        if isinstance(state.error, NonFiniteLossError):
            state.error.result = FitResult(
                losses=np.asarray(state.losses, dtype=float),
                steps=state.step,
                wall_time=math.nan,
                stop_reason="non-finite",
                num_skipped=state.num_skipped,
                smoothed_loss=state.smoothed_loss,
                converged=None,
            )
