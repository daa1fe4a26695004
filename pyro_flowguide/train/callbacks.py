"""The callbacks of :func:`~pyro_flowguide.fit`: cache clearing, non-finite guard, progress, early stopping, checkpoints."""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .checkpoints import atomic_save, checkpoint_payload, store_params
from .defaults import DEFAULT_CHECKPOINT_EVERY, DEFAULT_MAX_BAD_STEPS
from .guard import NonFiniteLossError, nonfinite_sites
from ..transforms import flow_cache_clearers

if TYPE_CHECKING:  # pragma: no cover
    from .loop import FitState

__all__ = [
    "Callback",
    "Checkpoint",
    "ClearFlowCaches",
    "EarlyStopping",
    "NonFiniteGuard",
    "ProgressBar",
]


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
    """Backs off after every ``backoff_every`` skipped (non-finite) steps in a row, and stops after ``max_consecutive``.

    :func:`fit` always skips a non-finite step (its optimiser update is not
    applied); this callback decides what to do about a run of them. Every
    ``backoff_every`` bad steps in a row it halves the learning rate of every
    parameter group (the rest of a decay schedule follows from there) and
    counts it in ``backoffs``. After ``max_consecutive`` it gives up: it traces the model
    and guide once and raises :class:`NonFiniteLossError` naming every site
    whose value or log-density is non-finite. Pass your own instance in
    ``callbacks`` to change the limit.

    Arguments:
        max_consecutive: Bad steps in a row before giving up (default 20).
        backoff_every: Bad steps in a row between two halvings of the
            learning rate (default 5; ``None``: never).
    """

    def __init__(self, max_consecutive: int = DEFAULT_MAX_BAD_STEPS, backoff_every: int | None = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        if backoff_every is not None and not (isinstance(backoff_every, int) and backoff_every >= 1):
            raise ValueError(f"backoff_every must be a positive integer or None, got {backoff_every!r}")
        self.max_consecutive = max_consecutive
        self.backoff_every = backoff_every
        self.backoffs = 0
        self._run = 0

    def _back_off(self, state: FitState) -> None:
        for opt in getattr(state.optim, "optim_objs", {}).values():
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 0.5
        self.backoffs += 1

    def on_step(self, state: FitState) -> None:
        if state.finite:
            self._run = 0
            return
        self._run += 1
        if self.backoff_every and self._run % self.backoff_every == 0 and self._run < self.max_consecutive:
            self._back_off(state)
        if self._run >= self.max_consecutive:
            sites = nonfinite_sites(state.model, state.guide, state.args, state.kwargs)
            found = (
                "Sites with a non-finite value or log-density at the current parameters: "
                + ", ".join(sites)
                if sites
                else "One fresh trace of model and guide found no site with a non-finite "
                "log-density, so the gradient itself is non-finite (e.g. sqrt or log at 0)"
            )
            raise NonFiniteLossError(
                f"fit stopped at step {state.step}: {self._run} consecutive steps had a "
                f"non-finite loss or gradient (last: {state.bad_reason}), after {self.backoffs} "
                f"halvings of the learning rate. {found}. Check the parameterisation of these "
                "sites (constraints, scales that can reach 0, a likelihood that overflows), or "
                "pass a smaller learning rate (optim=pyro.optim.ClippedAdam({'lr': ...})).",
                sites=sites,
            )

    def state_dict(self) -> dict:
        return {"run": self._run, "backoffs": self.backoffs}

    def load_state_dict(self, state: dict) -> None:
        self._run = int(state.get("run", 0))
        self.backoffs = int(state.get("backoffs", 0))


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
            average with weight :data:`LOSS_SMOOTHING` in which each loss's pull is
            clipped to a few mean absolute deviations, so one outlying loss
            does not end the fit) or a key of
            ``state.metrics`` that another callback writes (e.g. ``"val_loss"``).
        warmup: Steps to ignore at the start (the smoothed loss is still falling fast).
        restore_best: On stopping, copy back the parameters seen at the best value.

    An instance can be reused: each fit starts afresh (a resumed fit takes
    the state its checkpoint carried).

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
        self._restored = False

    def on_start(self, state: FitState) -> None:
        if self._restored:
            # A checkpoint's state, loaded just before: continue from it.
            self._restored = False
            self.stopped = False
            return
        params = store_params()
        self._names = list(params)
        self._params = list(params.values())
        self._buffers = [p.detach().clone() for p in self._params]
        self.best = math.inf
        self.best_step = state.step
        self.stopped = False

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
        params = store_params()
        self._names = list(state["buffers"])
        self._params = [params[n] for n in self._names]
        self._buffers = [state["buffers"][n].clone() for n in self._names]
        self._restored = True


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
        #: Every callback of the fit, whose states the checkpoint carries (:func:`~pyro_flowguide.fit` sets it).
        self.callbacks: Sequence[Callback] = ()

    def on_step(self, state: FitState) -> None:
        if state.step % self.every == 0:
            self.save(state)

    def on_end(self, state: FitState) -> None:
        # After an error or an interrupt the parameters may be mid-update: keep the last good file.
        if state.error is None and state.stop_reason != "interrupted":
            self.save(state)

    def save(self, state: FitState) -> None:
        atomic_save(checkpoint_payload(state, self.callbacks), self.path)
