r"""Density estimation with the package's flows, trained by :func:`~pyro_flowguide.fit`.

:func:`fit_density` fits a flow distribution :math:`p_\theta(x)` (or a
conditional :math:`p_\theta(x \mid c)`) to data by maximum likelihood. It is
not a second training loop: it writes the data as a Pyro model
(``pyro.sample("x", flow, obs=batch)`` under a subsampled plate, the flow
registered with ``pyro.module``) with an empty guide, and hands it to
:func:`~pyro_flowguide.fit`, so the same callbacks (cache clearing,
non-finite guard, progress, early stopping, checkpoints) apply. A held-out
split is scored every ``eval_every`` steps; early stopping watches it and
restores the parameters of the best validation score.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> data = torch.randn(2000, 2) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]])
    >>> fitted = fit_density("MAF", data, steps=100, progress=False, seed=0)
    >>> fitted.distribution.log_prob(data[:5]).shape
    torch.Size([5])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.optim import PyroOptim
from torch import Tensor, nn

from .callbacks import Callback, ClearFlowCaches, EarlyStopping
from .defaults import DEFAULT_CLIP_NORM, DEFAULT_DENSITY_FINAL_LR, DEFAULT_DENSITY_LR, geometric_decay
from .loop import FitResult, FitState, fit
from ..transforms import ConditionalFlowTransform, FlowTransform, clear_flow_caches, flow_transform

__all__ = [
    "DEFAULT_DENSITY_FINAL_LR",
    "DEFAULT_DENSITY_LR",
    "DensityFit",
    "ValidationLoss",
    "fit_density",
]

_MODULE_NAME = "fit_density"


@dataclass(eq=False)
class DensityFit:
    """What :func:`fit_density` returns.

    Attributes:
        distribution: The fitted distribution (a ``TransformedDistribution``, or
            a ``ConditionalTransformedDistribution`` when fitted with context).
        train_nll: Minibatch negative log-likelihood per point, every step.
        validation_steps, validation_nll: Held-out NLL per point and when it was measured.
        result: The :class:`~pyro_flowguide.FitResult` of the underlying fit.
        module: The ``nn.Module`` holding the flow's parameters.
        validation_index: Which rows of ``data`` were held out.
    """

    distribution: Any
    train_nll: np.ndarray
    validation_steps: np.ndarray
    validation_nll: np.ndarray
    result: FitResult
    module: nn.Module = field(repr=False)
    validation_index: Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def best_validation_nll(self) -> float:
        return float(np.min(self.validation_nll)) if len(self.validation_nll) else math.nan

    def __repr__(self) -> str:
        return (
            f"DensityFit(steps={self.result.steps}, best_validation_nll={self.best_validation_nll:.4f}, "
            f"stop_reason={self.result.stop_reason!r})"
        )

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` (given ``context`` for a conditional fit), without gradients."""
        with torch.no_grad():
            return _condition(self.distribution, context).log_prob(x)


class ValidationLoss(Callback):
    """Scores held-out data every ``every`` steps; writes ``state.metrics["val_loss"]``.

    Arguments:
        distribution: The (conditional) flow distribution being fitted.
        data: Held-out points, shape ``(M, D)``.
        context: Their context, shape ``(M, C)``, for a conditional flow.
        every: Steps between evaluations.
        module: The module whose flow caches are cleared after scoring.
    """

    def __init__(self, distribution, data: Tensor, context: Tensor | None = None, every: int = 50, module=None):
        self.distribution = distribution
        self.data = data
        self.context = context
        self.every = every
        self.module = module
        self.steps: list[int] = []
        self.values: list[float] = []

    def evaluate(self) -> float:
        with torch.no_grad():
            value = -_condition(self.distribution, self.context).log_prob(self.data).mean().item()
        if self.module is not None:
            clear_flow_caches(self.module)
        return value

    def on_step(self, state: FitState) -> None:
        if state.step % self.every == 0 or state.step == state.steps:
            value = self.evaluate()
            self.steps.append(state.step)
            self.values.append(value)
            state.metrics["val_loss"] = value

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = [int(s) for s in state.get("steps", [])]
        self.values = [float(v) for v in state.get("values", [])]


def _condition(distribution, context: Tensor | None):
    if isinstance(distribution, dist.ConditionalDistribution):
        if context is None:
            raise ValueError("this flow is conditional: pass context=<tensor of shape (N, C)>")
        return distribution.condition(context)
    if context is not None:
        raise ValueError("context was given but the flow is not conditional; build it with context=C")
    return distribution


def _as_distribution(flow: Any, features: int, context: int, dtype: torch.dtype, **hyper: Any):
    """A (conditional) flow distribution and the module holding its parameters."""
    if isinstance(flow, (dist.TransformedDistribution, dist.ConditionalTransformedDistribution)):
        if hyper:
            raise TypeError(f"hyper-parameters {sorted(hyper)} only apply when the flow is given by name")
        transforms = flow.transforms
        distribution = flow
    else:
        if isinstance(flow, (FlowTransform, ConditionalFlowTransform)):
            if hyper:
                raise TypeError(f"hyper-parameters {sorted(hyper)} only apply when the flow is given by name")
            transform = flow
        else:
            transform = flow_transform(flow, features, context=context, direction="density", **hyper)
        transform = transform.to(dtype)
        base = dist.Normal(torch.zeros(features, dtype=dtype), torch.ones(features, dtype=dtype)).to_event(1)
        transforms = [transform]
        if isinstance(transform, ConditionalFlowTransform):
            distribution = dist.ConditionalTransformedDistribution(base, transforms)
        else:
            distribution = dist.TransformedDistribution(base, transforms)
    if context and not isinstance(distribution, dist.ConditionalDistribution):
        raise ValueError(
            "context was given but the flow is not conditional; pass a registry name or build "
            "it with flow_transform(..., context=C)"
        )
    if not context and isinstance(distribution, dist.ConditionalDistribution):
        raise ValueError("this flow is conditional: pass context=<tensor of shape (N, C)>")
    module = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
    return distribution, module


def fit_density(
    flow: Any,
    data: Tensor,
    context: Tensor | None = None,
    *,
    steps: int = 2000,
    batch_size: int | None = 512,
    validation_fraction: float = 0.1,
    eval_every: int = 50,
    patience: int | None = 500,
    optim: PyroOptim | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    seed: int | None = None,
    **hyper: Any,
) -> DensityFit:
    r"""Fits a normalizing flow to data by maximum likelihood, through :func:`~pyro_flowguide.fit`.

    Arguments:
        flow: A registry name (``"NSF"``, ``"MAF"``, ...) or Zuko flow class,
            built for ``data.shape[-1]`` features in the ``"density"``
            direction over a standard normal base; or a flow transform from
            :func:`~pyro_flowguide.transforms.flow_transform`; or a ready
            ``TransformedDistribution`` / ``ConditionalTransformedDistribution``.
        data: Training points, shape ``(N, D)``.
        context: Conditioning values, shape ``(N, C)``, for :math:`p(x \mid c)`.
        steps: Optimisation steps.
        batch_size: Points per step (``None``: all of the training split).
        validation_fraction: Share of the points held out for validation
            (0: none; early stopping then watches the smoothed training loss).
        eval_every: Steps between validation scores.
        patience: Early-stopping patience in steps (``None``: never stop early).
            The parameters of the best validation score are restored.
        optim: A ``pyro.optim`` optimiser; default ``ClippedAdam`` with lr
            :data:`DEFAULT_DENSITY_LR` decayed to :data:`DEFAULT_DENSITY_FINAL_LR`.
        callbacks, progress, seed: As for :func:`~pyro_flowguide.fit`.
        hyper: Hyper-parameters of the flow when given by name (``transforms``,
            ``hidden_features``, ``bins``, ...).

    Returns:
        A :class:`DensityFit` with the fitted distribution and the loss histories.
    """
    if not torch.is_tensor(data) or data.dim() != 2:
        raise ValueError(
            f"data must be a tensor of shape (N, D), got {tuple(data.shape) if torch.is_tensor(data) else type(data)}"
            "; reshape single-feature data to (N, 1)"
        )
    n = data.shape[0]
    if context is not None and (not torch.is_tensor(context) or context.dim() != 2 or context.shape[0] != n):
        raise ValueError(f"context must be a tensor of shape ({n}, C) matching data, got {getattr(context, 'shape', None)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    distribution, module = _as_distribution(
        flow, data.shape[-1], 0 if context is None else context.shape[-1], data.dtype, **hyper
    )

    order = torch.randperm(n)
    n_val = int(round(validation_fraction * n))
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_train = data[train_idx]
    c_train = context[train_idx] if context is not None else None
    n_train = x_train.shape[0]
    batch = None if batch_size is None or batch_size >= n_train else int(batch_size)

    # Stale entries under this name would be loaded into the module by pyro.module.
    store = pyro.get_param_store()
    for name in [k for k in store.keys() if k.startswith(_MODULE_NAME + "$$$")]:
        del store[name]

    def model(x: Tensor, c: Tensor | None) -> None:
        pyro.module(_MODULE_NAME, module)
        with pyro.plate("data", x.shape[0], subsample_size=batch) as idx:
            pyro.sample("x", _condition(distribution, None if c is None else c[idx]), obs=x[idx])

    def guide(x: Tensor, c: Tensor | None) -> None:
        pass

    user = list(callbacks)
    extra: list[Callback] = [ClearFlowCaches(module)]
    validation = None
    if n_val > 0:
        validation = ValidationLoss(
            distribution, data[val_idx], context[val_idx] if context is not None else None, eval_every, module
        )
        extra.append(validation)
    if patience is not None and not any(isinstance(cb, EarlyStopping) for cb in user):
        extra.append(EarlyStopping(patience=patience, monitor="val_loss" if validation else "loss"))
    if optim is None:
        lrd = geometric_decay(DEFAULT_DENSITY_LR, DEFAULT_DENSITY_FINAL_LR, steps)
        optim = pyro.optim.ClippedAdam({"lr": DEFAULT_DENSITY_LR, "clip_norm": DEFAULT_CLIP_NORM, "lrd": lrd})
    result = fit(
        model,
        guide,
        x_train,
        c_train,
        steps=steps,
        optim=optim,
        loss=Trace_ELBO(num_particles=1, max_plate_nesting=1),
        callbacks=extra + user,
        progress=progress,
    )
    return DensityFit(
        distribution=distribution,
        train_nll=result.losses / n_train,
        validation_steps=np.asarray(validation.steps if validation else [], dtype=int),
        validation_nll=np.asarray(validation.values if validation else [], dtype=float),
        result=result,
        module=module,
        validation_index=val_idx,
    )
