r"""Fitting a guide with Pyro's ``SVI``: sensible defaults, guards, progress, checkpoints.

:func:`fit` runs Pyro's ``SVI`` (its ELBOs, its optimisers, its param store)
with the defaults that measured best on this project's targets, and wraps
each step in small :class:`Callback` objects:

* :class:`ClearFlowCaches`: drops transform caches every step so memory stays
  flat over long runs.
* :class:`NonFiniteGuard`: a step whose loss or gradient is NaN/inf, or whose
  model raised Pyro's "Expected parameter ... found invalid values" check, is
  skipped (parameters and optimiser state untouched); after ``max_consecutive``
  such steps in a row :func:`fit` stops with :class:`NonFiniteLossError`
  naming the sites whose log-density is non-finite.
* :class:`ProgressBar`: a tqdm bar with the smoothed loss.
* :class:`EarlyStopping`: stops on a plateau of the smoothed loss (or any
  metric a callback writes into ``state.metrics``) and restores the best
  parameters.
* :class:`Checkpoint`: writes param store, optimiser state, RNG states, step
  count and loss history atomically every N steps; ``fit(..., resume=True)``
  continues bit for bit.

Example:
    >>> import pyro, torch, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> pyro.clear_param_store()
    >>> result = fit(model, AutoNormal(model), torch.randn(20), steps=200, progress=False, seed=0)
    >>> result.steps, result.stop_reason
    (200, 'completed')
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyro
import pyro.util
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads
from pyro.optim import PyroOptim
from pyro.optim.optim import _load_state_dict
from torch import Tensor, nn

from .defaults import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CLIP_NORM,
    DEFAULT_FINAL_LR,
    DEFAULT_LR,
    DEFAULT_MAX_BAD_STEPS,
    DEFAULT_NUM_PARTICLES,
    DEFAULT_STEPS,
    default_loss,
    default_optim,
    training_defaults,
)
from ..tracing import max_plate_nesting, trace_model_and_guide
from ..transforms import flow_cache_clearers

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CLIP_NORM",
    "DEFAULT_FINAL_LR",
    "DEFAULT_LR",
    "DEFAULT_MAX_BAD_STEPS",
    "DEFAULT_NUM_PARTICLES",
    "DEFAULT_STEPS",
    "LOSS_SMOOTHING",
    "Callback",
    "Checkpoint",
    "CheckpointMismatchError",
    "ClearFlowCaches",
    "EarlyStopping",
    "FitResult",
    "FitState",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "ProgressBar",
    "default_loss",
    "default_optim",
    "fit",
    "load_checkpoint",
]

#: Weight of the newest loss in the exponential moving average shown and monitored.
LOSS_SMOOTHING = 0.02

_CHECKPOINT_FORMAT = "pyro_flowguide.fit/1"
_INVALID_PARAMETER = re.compile(r"Expected parameter .* found invalid values", re.DOTALL)


class NonFiniteLossError(ValueError):
    """Raised by :func:`fit` after too many consecutive non-finite steps.

    ``.result`` holds the :class:`FitResult` up to the failure and ``.sites``
    the names of the sites whose log-density was non-finite.
    """

    def __init__(self, message: str, sites: list[str], result: FitResult | None = None):
        super().__init__(message)
        self.sites = sites
        self.result = result


class CheckpointMismatchError(ValueError):
    """Raised when a checkpoint's parameters do not match the model and guide being fitted."""


# --------------------------------------------------------------------------- state


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
    finite: bool = True
    bad_reason: str | None = None
    num_skipped: int = 0
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    error: BaseException | None = None

    @property
    def optim(self) -> PyroOptim:
        return self.svi.optim


def _store_params() -> dict[str, Tensor]:
    """Unconstrained parameters of the param store, by name (the tensors themselves)."""
    return dict(pyro.get_param_store().named_parameters())


def _copy_into_params(values: dict[str, Tensor]) -> None:
    params = _store_params()
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


# --------------------------------------------------------------------------- callbacks


class Callback:
    """Base class of :func:`fit` callbacks; override what you need.

    Hooks run in the order the callbacks are listed: ``on_start(state)`` once
    before the first step (after the guide is set up and any checkpoint is
    restored), ``on_step(state)`` after every step, ``on_end(state)`` once at
    the end, also when the fit stops with an error (``state.error`` is set).
    ``state_dict()`` / ``load_state_dict()`` let :class:`Checkpoint` carry a
    callback's own state across a resume.

    Example:
        >>> class PrintEvery(Callback):
        ...     def __init__(self, n):
        ...         self.n = n
        ...     def on_step(self, state):
        ...         if state.step % self.n == 0:
        ...             print(state.step, round(state.smoothed_loss, 1))
    """

    def on_start(self, state: FitState) -> None:
        pass

    def on_step(self, state: FitState) -> None:
        pass

    def on_end(self, state: FitState) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ClearFlowCaches(Callback):
    """Drops the cached value, log-determinant and graph of every flow transform each step.

    A cache entry is never served stale (it is tied to the parameters'
    versions), but it keeps the last step's graph alive; clearing it keeps
    memory flat.

    Arguments:
        module: The module holding the flows; default the guide being fitted.
    """

    def __init__(self, module: nn.Module | None = None) -> None:
        self.module = module
        self._clears: list[Callable[[], None]] = []

    def on_start(self, state: FitState) -> None:
        module = self.module if self.module is not None else state.guide
        # Collected once (the guide is set up by now) so the hot path is a short loop.
        self._clears = flow_cache_clearers(module) if isinstance(module, nn.Module) else []

    def on_step(self, state: FitState) -> None:
        for clear in self._clears:
            clear()

    on_end = on_step


class NonFiniteGuard(Callback):
    """Stops the fit after ``max_consecutive`` skipped (non-finite) steps in a row.

    :func:`fit` always skips a non-finite step (its optimiser update is not
    applied); this callback decides when to give up. It then traces the model
    and guide once and raises :class:`NonFiniteLossError` naming every site
    whose value or log-density is non-finite. Pass your own instance in
    ``callbacks`` to change the limit.

    Arguments:
        max_consecutive: Bad steps in a row before giving up (default 20).
    """

    def __init__(self, max_consecutive: int = DEFAULT_MAX_BAD_STEPS) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self._run = 0

    def on_step(self, state: FitState) -> None:
        if state.finite:
            self._run = 0
            return
        self._run += 1
        if self._run >= self.max_consecutive:
            sites = _nonfinite_sites(state.model, state.guide, state.args, state.kwargs)
            found = (
                "Sites with a non-finite value or log-density at the current parameters: "
                + ", ".join(sites)
                if sites
                else "One fresh trace of model and guide found no site with a non-finite "
                "log-density, so the gradient itself is non-finite (e.g. sqrt or log at 0)"
            )
            raise NonFiniteLossError(
                f"fit stopped at step {state.step}: {self._run} consecutive steps had a "
                f"non-finite loss or gradient (last: {state.bad_reason}). {found}. Check "
                "the parameterisation of these sites (constraints, scales that can reach 0), "
                "lower the learning rate, or initialise closer to the data "
                "(e.g. init_loc_fn=init_to_median).",
                sites=sites,
            )

    def state_dict(self) -> dict:
        return {"run": self._run}

    def load_state_dict(self, state: dict) -> None:
        self._run = int(state.get("run", 0))


class ProgressBar(Callback):
    """A tqdm bar showing the smoothed loss, refreshed at most every ``refresh_seconds``."""

    def __init__(self, refresh_seconds: float = 0.2, **tqdm_kwargs: Any) -> None:
        self.refresh_seconds = refresh_seconds
        self.tqdm_kwargs = tqdm_kwargs
        self._bar = None
        self._last = 0.0

    def on_start(self, state: FitState) -> None:
        from tqdm.auto import tqdm

        kwargs = {"desc": "fit", "dynamic_ncols": True, "mininterval": self.refresh_seconds}
        kwargs.update(self.tqdm_kwargs)
        self._bar = tqdm(total=state.steps, initial=state.step, **kwargs)
        self._last = time.perf_counter()

    def _show(self, state: FitState) -> None:
        bar = self._bar
        bar.set_postfix_str(f"loss {state.smoothed_loss:.4g}", refresh=False)
        bar.update(state.step - bar.n)

    def on_step(self, state: FitState) -> None:
        now = time.perf_counter()
        if now - self._last >= self.refresh_seconds:
            self._last = now
            self._show(state)

    def on_end(self, state: FitState) -> None:
        if self._bar is not None:
            self._show(state)
            self._bar.close()
            self._bar = None


class EarlyStopping(Callback):
    """Stops when a monitored value has not improved for ``patience`` steps; restores the best parameters.

    Arguments:
        patience: Steps without an improvement before stopping.
        min_delta: An improvement must lower the value by more than this.
        monitor: ``"loss"`` (the smoothed training loss, an exponential moving
            average with weight :data:`LOSS_SMOOTHING`) or a key of
            ``state.metrics`` that another callback writes (e.g. ``"val_loss"``).
        warmup: Steps to ignore at the start (the smoothed loss is still falling fast).
        restore_best: On stopping, copy back the parameters seen at the best value.

    Example:
        >>> stopper = EarlyStopping(patience=300, min_delta=0.01)
        >>> # fit(model, guide, data, callbacks=[stopper])
    """

    def __init__(
        self,
        patience: int = 500,
        min_delta: float = 0.0,
        monitor: str = "loss",
        warmup: int = 0,
        restore_best: bool = True,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.min_delta = min_delta
        self.monitor = monitor
        self.warmup = warmup
        self.restore_best = restore_best
        self.best = math.inf
        self.best_step = -1
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._buffers: list[Tensor] = []
        self.stopped = False

    def on_start(self, state: FitState) -> None:
        params = _store_params()
        self._names = list(params)
        self._params = list(params.values())
        if len(self._buffers) != len(self._params):
            self._buffers = [p.detach().clone() for p in self._params]
        if self.best_step < 0:
            self.best_step = state.step

    def _value(self, state: FitState) -> float | None:
        if self.monitor == "loss":
            return state.smoothed_loss
        return state.metrics.get(self.monitor)

    def on_step(self, state: FitState) -> None:
        if state.step <= self.warmup:
            self.best_step = state.step
            return
        value = self._value(state)
        if value is not None and value < self.best - self.min_delta:
            self.best = value
            self.best_step = state.step
            if self.restore_best:
                with torch.no_grad():
                    torch._foreach_copy_(self._buffers, self._params)
        elif state.step - self.best_step >= self.patience:
            self.stopped = True
            state.stop_reason = (
                f"early stopping: the {'smoothed loss' if self.monitor == 'loss' else self.monitor}"
                f" did not improve by more than {self.min_delta:g} in {self.patience} steps "
                f"(best {self.best:.6g} at step {self.best_step})"
            )

    def on_end(self, state: FitState) -> None:
        if self.stopped and self.restore_best and math.isfinite(self.best):
            with torch.no_grad():
                torch._foreach_copy_(self._params, self._buffers)

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "buffers": {n: b.clone() for n, b in zip(self._names, self._buffers)},
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])
        self.best_step = int(state["best_step"])
        params = _store_params()
        self._names = list(state["buffers"])
        self._params = [params[n] for n in self._names]
        self._buffers = [state["buffers"][n].clone() for n in self._names]


class Checkpoint(Callback):
    """Writes a checkpoint every ``every`` steps and at the end, atomically.

    The file is written to a temporary name in the same folder and moved over
    the old one with ``os.replace``, so a kill at any moment leaves the last
    complete checkpoint. It holds only tensors, numbers, strings, lists and
    dicts, and is read with ``torch.load(..., weights_only=True)``: param
    store values, optimiser state, torch/numpy/python RNG states, the step
    count, the loss history and the callbacks' own state.
    :func:`fit` adds one when given ``checkpoint=path``.

    Arguments:
        path: The checkpoint file.
        every: Steps between checkpoints.
    """

    def __init__(self, path: str | os.PathLike, every: int = DEFAULT_CHECKPOINT_EVERY) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1, got {every}")
        self.path = os.fspath(path)
        self.every = every
        self._callbacks: Sequence[Callback] = ()

    def on_step(self, state: FitState) -> None:
        if state.step % self.every == 0:
            self.save(state)

    def on_end(self, state: FitState) -> None:
        # After an error or an interrupt the parameters may be mid-update: keep the last good file.
        if state.error is None and state.stop_reason != "interrupted":
            self.save(state)

    def save(self, state: FitState) -> None:
        payload = _checkpoint_payload(state, self._callbacks)
        _atomic_save(payload, self.path)


def _atomic_save(payload: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _callback_keys(callbacks: Sequence[Callback]) -> list[str]:
    seen: dict[str, int] = {}
    keys = []
    for cb in callbacks:
        name = type(cb).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(f"{name}:{seen[name]}")
    return keys


def _rng_state() -> dict:
    state = pyro.util.get_rng_state()
    version, internal, gauss = state["random"]
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    out = {
        "torch": state["torch"],
        "python": {"version": version, "state": list(internal), "gauss": [] if gauss is None else [gauss]},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    npy = state["numpy"]
    pyro.util.set_rng_state(
        {
            "torch": state["torch"],
            "random": (py["version"], tuple(py["state"]), py["gauss"][0] if py["gauss"] else None),
            "numpy": (
                npy["name"],
                npy["keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            ),
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_payload(state: FitState, callbacks: Sequence[Callback]) -> dict:
    return {
        "format": _CHECKPOINT_FORMAT,
        "step": state.step,
        "steps": state.steps,
        "smoothed_loss": state.smoothed_loss,
        "num_skipped": state.num_skipped,
        "losses": torch.tensor(state.losses, dtype=torch.float64),
        "params": {n: p.detach().clone() for n, p in _store_params().items()},
        "optim": state.optim.get_state(),
        "rng": _rng_state(),
        "callbacks": {k: cb.state_dict() for k, cb in zip(_callback_keys(callbacks), callbacks)},
    }


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a :func:`fit` checkpoint with ``torch.load(..., weights_only=True)``.

    Returns:
        A dict with ``step``, ``losses``, ``params`` (unconstrained values by
        param-store name), ``optim``, ``rng`` and ``callbacks``.
    """
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} is not a pyro_flowguide fit checkpoint "
            f"(expected format {_CHECKPOINT_FORMAT!r})"
        )
    return payload


def _check_params_match(saved: dict[str, Tensor], path: str) -> None:
    current = {n: tuple(p.shape) for n, p in _store_params().items()}
    saved_shapes = {n: tuple(v.shape) for n, v in saved.items()}
    missing = sorted(set(saved_shapes) - set(current))
    extra = sorted(set(current) - set(saved_shapes))
    shapes = sorted(
        f"{n} (checkpoint {saved_shapes[n]}, now {current[n]})"
        for n in set(current) & set(saved_shapes)
        if current[n] != saved_shapes[n]
    )
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"in the checkpoint but not in this model/guide: {missing}")
        if extra:
            parts.append(f"in this model/guide but not in the checkpoint: {extra}")
        if shapes:
            parts.append(f"different shapes: {shapes}")
        raise CheckpointMismatchError(
            f"checkpoint {path!r} was written for another model or guide; parameters "
            + "; ".join(parts)
            + ". Resume with the same model, guide and data, or start afresh with resume=False "
            "(and pyro.clear_param_store() if the store holds another guide's parameters)."
        )


def _restore(state: FitState, payload: dict, callbacks: Sequence[Callback], path: str) -> None:
    _check_params_match(payload["params"], path)
    _copy_into_params(payload["params"])
    optim = state.optim
    by_tensor = {p: n for n, p in _store_params().items()}
    waiting = dict(payload["optim"])
    # Optimisers already built (an optim reused across calls) take their state now;
    # the rest take it when SVI first meets their parameter.
    for p, torch_optim in optim.optim_objs.items():
        name = by_tensor.get(p)
        if name in waiting:
            _load_state_dict(torch_optim, waiting.pop(name))
    optim.set_state(waiting)
    state.step = int(payload["step"])
    state.losses = payload["losses"].tolist()
    state.smoothed_loss = float(payload["smoothed_loss"])
    state.num_skipped = int(payload["num_skipped"])
    saved_callbacks = payload.get("callbacks", {})
    for key, cb in zip(_callback_keys(callbacks), callbacks):
        if key in saved_callbacks:
            cb.load_state_dict(saved_callbacks[key])
    _set_rng_state(payload["rng"])


# --------------------------------------------------------------------------- result


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
        smoothed_loss: The final smoothed loss.
        num_particles: Particles per step; ``vectorized``: whether they ran
            under an outer plate.
    """

    losses: np.ndarray
    steps: int
    wall_time: float
    stop_reason: str
    num_skipped: int = 0
    smoothed_loss: float = math.nan
    num_particles: int | None = None
    vectorized: bool | None = None

    def __repr__(self) -> str:
        return (
            f"FitResult(steps={self.steps}, smoothed_loss={self.smoothed_loss:.6g}, "
            f"wall_time={self.wall_time:.1f}s, stop_reason={self.stop_reason!r}, "
            f"num_skipped={self.num_skipped})"
        )

    def plot(self, ax=None, **kwargs):
        """Plots the loss curve (raw and smoothed); returns the matplotlib axes."""
        from ..diagnostics.plots import plot_losses

        return plot_losses(self.losses, ax=ax, **kwargs)


# --------------------------------------------------------------------------- defaults


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _setup(model, guide, args, kwargs) -> int:
    """Runs guide and model once so every parameter exists; returns the max plate nesting."""
    return max_plate_nesting(*trace_model_and_guide(model, guide, args, kwargs))


def _choose_loss(model, guide, args, kwargs, num_particles: int | None, vectorize: bool):
    """The default ELBO, falling back to sequential particles if the model rejects an outer plate."""
    max_plate_nesting = _setup(model, guide, args, kwargs)
    sequential = num_particles  # as many as asked for, or at most the default: each is a full pass
    if num_particles is None:
        num_particles = training_defaults(guide).num_particles
        sequential = min(num_particles, DEFAULT_NUM_PARTICLES)
    make = functools.partial(training_defaults(guide).loss, guide)
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
            f"particles ({_first_line(vec_err)}); using {sequential} sequential particles "
            "instead, about that many times slower per step. To vectorise, give every "
            "batch dimension a pyro.plate (or .to_event) and avoid code that depends on "
            "value shapes; or pass num_particles=1.",
            UserWarning,
            stacklevel=3,
        )
        return make(sequential, False, max_plate_nesting), False


def _grads_finite(params) -> bool:
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    if not grads:
        return True
    # The cheapest check measured: a sum holding NaN/inf is NaN/inf (a sum that
    # overflows float range counts as non-finite too, and such a step is skipped).
    return math.isfinite(torch.cat(grads).sum().item())


def _nonfinite_sites(model, guide, args, kwargs) -> list[str]:
    """Names of sites whose value or log-density is non-finite in one fresh trace."""
    bad: list[str] = []
    # Without validation a NaN parameter reaches log_prob, where the site has a name.
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        try:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        except Exception as err:  # noqa: BLE001 - report, do not mask the original failure
            return [f"(tracing model and guide raised {_first_line(err)})"]
        for label, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "param":
                    if not torch.isfinite(site["value"]).all():
                        bad.append(f"{label} param '{name}' (value)")
                    continue
                if site["type"] != "sample" or site["infer"].get("_do_not_trace"):
                    continue
                kind = "observed" if site["is_observed"] else "latent"
                value = site["value"]
                if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                    bad.append(f"{label} site '{name}' ({kind}, value)")
                    continue
                try:
                    lp = site["fn"].log_prob(value)
                except Exception as err:  # noqa: BLE001
                    bad.append(f"{label} site '{name}' ({kind}, log_prob raised {_first_line(err, 120)})")
                    continue
                if not torch.isfinite(lp).all():
                    bad.append(f"{label} site '{name}' ({kind}, log-density)")
    return bad


def _default_callbacks(
    progress: bool, checkpoint, checkpoint_every: int, user: Sequence[Callback]
) -> list[Callback]:
    user = list(user)
    for cb in user:
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks must be pyro_flowguide.infer.Callback instances, got {type(cb).__name__}; "
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
        cb._callbacks = callbacks  # a checkpoint carries every callback's state
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
            (ClippedAdam, lr 1e-2 decayed over ``steps`` to the guide's
            ``default_final_lr`` if it has one (``AutoFlowGuide``: 3e-4),
            else 1e-3; clip 10).
        loss: A Pyro ELBO. Default: the guide's ``default_loss`` if it has
            one (``AutoFlowGuide`` with sticking the landing and no
            non-centred sites: :class:`~pyro_flowguide.elbo.RenyiDReG_ELBO` of
            order 1/2, whose losses are minus that bound, not minus the ELBO), else
            ``Trace_ELBO``, with ``num_particles`` particles. When given,
            ``num_particles`` and ``vectorize_particles`` are not used.
        num_particles: Particles per step of the default loss. Default: the
            guide's ``default_num_particles`` if it has one (``AutoFlowGuide``:
            32, chosen on the benchmark targets; ``AutoAmortizedFlowGuide``:
            8), else :data:`DEFAULT_NUM_PARTICLES` (4).
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
            model/guide raises :class:`CheckpointMismatchError`.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: after too many consecutive non-finite steps; it
            names the offending sites and carries the partial result.

    Example:
        >>> import pyro, torch, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> pyro.clear_param_store()
        >>> result = fit(model, AutoNormal(model), torch.randn(20), steps=100, progress=False)
        >>> len(result.losses), result.num_particles, result.vectorized
        (100, 4, True)
    """
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path> to resume from")
    if optim is None:
        optim = default_optim(steps, training_defaults(guide).final_lr)
    elif not isinstance(optim, PyroOptim):
        raise TypeError(
            f"optim must be a pyro.optim optimiser, got {type(optim).__name__}; wrap a torch "
            "optimiser as pyro.optim.Adam({'lr': 1e-2}) or pyro.optim.ClippedAdam({...})"
        )
    start = time.perf_counter()
    if seed is not None:
        pyro.set_rng_seed(seed)

    vectorized: bool | None = None
    particles: int | None = None
    with warnings.catch_warnings():
        # The guard reports skipped steps itself; Pyro's per-step NaN warnings would repeat it.
        warnings.filterwarnings("ignore", message="Encountered NaN")
        if loss is None:
            loss, vectorized = _choose_loss(model, guide, args, kwargs, num_particles, vectorize_particles)
            particles = loss.num_particles
        else:
            _setup(model, guide, args, kwargs)
            particles = getattr(loss, "num_particles", None)
            vectorized = getattr(loss, "vectorize_particles", None)
        svi = SVI(model, guide, optim, loss)
        state = FitState(model=model, guide=guide, args=args, kwargs=kwargs, svi=svi, steps=steps)
        cbs = _default_callbacks(progress, checkpoint, checkpoint_every, callbacks)

        if resume:
            path = os.fspath(checkpoint)
            if os.path.exists(path):
                _restore(state, load_checkpoint(path), cbs, path)
            else:
                warnings.warn(
                    f"fit: no checkpoint at {path!r} yet; starting from step 0", UserWarning, stacklevel=2
                )

        _run(state, cbs)
    return FitResult(
        losses=np.asarray(state.losses, dtype=float),
        steps=state.step,
        wall_time=time.perf_counter() - start,
        stop_reason=state.stop_reason or "completed",
        num_skipped=state.num_skipped,
        smoothed_loss=state.smoothed_loss,
        num_particles=particles,
        vectorized=vectorized,
    )


def _run(state: FitState, callbacks: list[Callback]) -> None:
    svi = state.svi
    model, guide, optim, loss_and_grads = svi.model, svi.guide, svi.optim, svi.loss_and_grads
    args, kwargs = state.args, state.kwargs
    losses = state.losses
    alpha = LOSS_SMOOTHING
    store = pyro.get_param_store()
    on_step = [cb.on_step for cb in callbacks if type(cb).on_step is not Callback.on_step]
    try:
        for cb in callbacks:
            cb.on_start(state)
        while state.step < state.steps and state.stop_reason is None:
            # SVI.step, with the optimiser update skipped when anything is non-finite.
            try:
                with poutine.trace(param_only=True) as capture:
                    loss = loss_and_grads(model, guide, *args, **kwargs)
            except ValueError as err:
                if not _INVALID_PARAMETER.search(str(err)):
                    raise
                zero_grads(p for _, p in store.named_parameters())
                state.finite, state.bad_reason, loss = False, _first_line(err), math.nan
            else:
                params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
                if isinstance(loss, tuple):
                    loss = sum(loss)
                loss = float(loss)
                if math.isfinite(loss) and _grads_finite(params):
                    optim(params)
                    state.finite = True
                else:
                    state.finite = False
                    state.bad_reason = f"loss {loss}" if not math.isfinite(loss) else "non-finite gradient"
                zero_grads(params)

            state.step += 1
            state.loss = loss
            losses.append(loss)
            if state.finite:
                s = state.smoothed_loss
                state.smoothed_loss = loss if s != s else s + alpha * (loss - s)
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
            )
