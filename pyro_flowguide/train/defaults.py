"""Training defaults: one table, by guide type, of what ``fit`` uses unless told otherwise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
from pyro.infer import Trace_ELBO
from pyro.optim import PyroOptim

from ..guides import AutoAmortizedFlowGuide, AutoFlowGuide, AutoStructuredFlowGuide
from .losses import DEFAULT_ALPHA, RenyiDReG_ELBO
from .warm_start import gaussian_stage

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CLIP_NORM",
    "DEFAULT_DENSITY_FINAL_LR",
    "DEFAULT_DENSITY_LR",
    "DEFAULT_FINAL_LR",
    "DEFAULT_LR",
    "DEFAULT_MAX_BAD_STEPS",
    "DEFAULT_NUM_PARTICLES",
    "DEFAULT_STEPS",
    "LOSS_SMOOTHING",
    "TRAINING_DEFAULTS",
    "TrainingDefaults",
    "default_loss",
    "default_optim",
    "geometric_decay",
    "training_defaults",
]

# Protocol A of the benchmarks: ClippedAdam, lr 1e-2 decayed geometrically to
# 1e-3 over the run, element-wise clipping at 10, 4 vectorised particles.
DEFAULT_STEPS = 3000
DEFAULT_LR = 1e-2
DEFAULT_FINAL_LR = 1e-3
DEFAULT_CLIP_NORM = 10.0
DEFAULT_NUM_PARTICLES = 4
DEFAULT_CHECKPOINT_EVERY = 500
DEFAULT_MAX_BAD_STEPS = 20

#: Learning rate of :func:`~pyro_flowguide.train.density.fit_density` (decayed geometrically to the final one).
DEFAULT_DENSITY_LR = 3e-3
DEFAULT_DENSITY_FINAL_LR = 3e-4

#: Weight of the newest loss in the exponential moving average shown and monitored.
LOSS_SMOOTHING = 0.02


def geometric_decay(lr: float, final_lr: float, steps: int) -> float:
    """The per-step factor that takes a learning rate from ``lr`` to ``final_lr`` in ``steps`` steps."""
    return (final_lr / lr) ** (1.0 / max(int(steps), 1))


def default_optim(steps: int = DEFAULT_STEPS, final_lr: float = DEFAULT_FINAL_LR) -> PyroOptim:
    """``ClippedAdam`` with lr :data:`DEFAULT_LR` decayed geometrically to ``final_lr`` over ``steps``."""
    lrd = geometric_decay(DEFAULT_LR, final_lr, steps)
    return pyro.optim.ClippedAdam({"lr": DEFAULT_LR, "clip_norm": DEFAULT_CLIP_NORM, "lrd": lrd})


def default_loss(
    num_particles: int = DEFAULT_NUM_PARTICLES,
    vectorize_particles: bool = True,
    max_plate_nesting: int | None = None,
) -> Trace_ELBO:
    """``Trace_ELBO`` with ``num_particles`` particles (under an outer plate when ``vectorize_particles``).

    ``max_plate_nesting=None`` lets Pyro guess it on the first step.
    """
    return Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=vectorize_particles and num_particles > 1,
        max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
    )


def _flow_guide_loss(guide, num_particles: int, vectorize_particles: bool, max_plate_nesting):
    # The Rényi bound with its doubly-reparameterised gradient needs the
    # sticking-the-landing log-density; a guide with non-centred sites sees a
    # near-Gaussian posterior, where the ELBO does as well.
    if not guide.path_derivative_log_density or guide.noncentered_sites:
        return default_loss(num_particles, vectorize_particles, max_plate_nesting)
    return RenyiDReG_ELBO(
        DEFAULT_ALPHA,
        num_particles=num_particles,
        vectorize_particles=vectorize_particles and num_particles > 1,
        max_plate_nesting=max_plate_nesting,
    )


def _elbo(guide, num_particles: int, vectorize_particles: bool, max_plate_nesting):
    return default_loss(num_particles, vectorize_particles, max_plate_nesting)


@dataclass(frozen=True)
class TrainingDefaults:
    """What :func:`~pyro_flowguide.fit` uses with a kind of guide.

    Arguments:
        num_particles: Particles per step.
        final_lr: Where the learning rate decays to over the run.
        loss: ``loss(guide, num_particles, vectorize_particles, max_plate_nesting)``
            builds the ELBO; called once the guide is set up.
        warm_start: ``warm_start(model, guide, args, kwargs)``, run before the
            first step of a fresh fit, or ``None``.
    """

    num_particles: int = DEFAULT_NUM_PARTICLES
    final_lr: float = DEFAULT_FINAL_LR
    loss: Callable = _elbo
    warm_start: Callable | None = None


#: Guide type -> its training defaults (a subclass gets its nearest base's; figures in ``benchmarks/RESULTS.md``).
TRAINING_DEFAULTS: dict[type, TrainingDefaults] = {
    AutoFlowGuide: TrainingDefaults(num_particles=32, final_lr=3e-4, loss=_flow_guide_loss, warm_start=gaussian_stage),
    AutoAmortizedFlowGuide: TrainingDefaults(num_particles=8, final_lr=1e-4),
    # The budget AutoFlowGuide's structured default trains with, used directly.
    AutoStructuredFlowGuide: TrainingDefaults(num_particles=32, final_lr=3e-4),
}


def training_defaults(guide) -> TrainingDefaults:
    """The entry of :data:`TRAINING_DEFAULTS` for ``guide``'s type (by its method resolution order)."""
    for cls in type(guide).__mro__:
        if cls in TRAINING_DEFAULTS:
            return TRAINING_DEFAULTS[cls]
    return TrainingDefaults()
