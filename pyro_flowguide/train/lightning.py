r"""Distributed stochastic variational inference on Lightning.

Sharding minibatches over processes (or GPUs) and averaging gradients, for
data that no longer fit one process: Lightning does both, and this module
adapts a Pyro model and guide to it.

* :class:`~pyro_flowguide.train.svi_module.SVIModule` is a ``LightningModule``
  whose training step is ``loss.differentiable_loss(model, guide, *batch)``;
  its module docstring states the contract on the model's data plate.
* :func:`fit_distributed` builds the data loader, the module and the
  ``Trainer`` in one call.
* :func:`load_guide_checkpoint` loads a Lightning checkpoint into a plain
  guide in a single process.

It needs the ``distributed`` extra: ``pip install "pyro-flowguide[distributed]"``.

Example:
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> x = torch.randn(512, 3); y = x @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(512)
    >>> def model(x, y=None):
    ...     w = pyro.sample("w", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
    ...     with pyro.plate("data", 512, subsample_size=len(x)):
    ...         pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)
    >>> guide = AutoNormal(model)
    >>> result = fit_distributed(model, guide, (x, y), steps=200, batch_size=64,
    ...                          devices=1, progress=False)  # doctest: +SKIP
    >>> guide.median()["w"].shape  # doctest: +SKIP
    torch.Size([3])
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
except ImportError as error:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "pyro_flowguide.train.lightning needs Lightning, which is an optional "
        'dependency: pip install "pyro-flowguide[distributed]"'
    ) from error


import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .defaults import DEFAULT_CLIP_NORM, DEFAULT_FINAL_LR, DEFAULT_LR, geometric_decay
from .svi_module import GUIDE_PREFIX, MODEL_PREFIX, STORE_PREFIX, ScalingError, SVIModule, store_name

__all__ = [
    "DistributedFitResult",
    "SVIModule",
    "ScalingError",
    "fit_distributed",
    "load_guide_checkpoint",
]


class _FinalCheckpoint(Callback):
    """Writes one checkpoint when training ends (every rank calls; rank 0 writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


@dataclass
class DistributedFitResult:
    """What :func:`fit_distributed` returns.

    Arguments:
        module: The trained :class:`SVIModule`; ``module.guide`` is the guide
            passed in, now trained, in the calling process.
        trainer: The Lightning ``Trainer`` that ran.
        loss: The last loss logged by rank 0 (one minibatch, scaled to the
            full data), or ``None``.
        wall_time: Seconds spent in ``Trainer.fit``, process start-up included.
        checkpoint: Where the final checkpoint was written, or ``None``.
    """

    module: SVIModule
    trainer: pl.Trainer
    loss: float | None
    wall_time: float
    checkpoint: Path | None


class _Tensors(Dataset):
    """Tensors sharing their first dimension, fetched a whole batch at a time.

    ``DataLoader`` fetches items one by one and stacks them unless the dataset
    has ``__getitems__``; one indexing per tensor is what keeps large batches
    cheap.
    """

    def __init__(self, *tensors: Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def _whole_batch(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return batch


def _as_loader(data: Any, batch_size: int, shuffle: bool) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    tensors = (data,) if isinstance(data, Tensor) else tuple(data)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(
            "data must be a tensor, a tuple of tensors (the model's arguments), "
            "a Dataset or a DataLoader"
        )
    lengths = {t.shape[0] if t.dim() else None for t in tensors}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(
            f"the data tensors must share their first (data) dimension; got shapes "
            f"{[tuple(t.shape) for t in tensors]}"
        )
    return DataLoader(
        _Tensors(*tensors), batch_size=batch_size, shuffle=shuffle, collate_fn=_whole_batch
    )


def fit_distributed(
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    steps: int,
    batch_size: int,
    loss: ELBO | None = None,
    lr: float = DEFAULT_LR,
    final_lr: float | None = DEFAULT_FINAL_LR,
    clip_norm: float = DEFAULT_CLIP_NORM,
    devices: int | str = 2,
    accelerator: str = "cpu",
    strategy: Any = "auto",
    num_nodes: int = 1,
    model_kwargs: Mapping[str, Any] | None = None,
    check_scaling: bool = True,
    seed: int | None = 0,
    checkpoint: str | Path | None = None,
    default_root_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    shuffle: bool = True,
    **trainer_kwargs: Any,
) -> DistributedFitResult:
    r"""Trains a Pyro guide with data-parallel SVI on Lightning, in one call.

    Builds a data loader of ``batch_size`` items per process, an
    :class:`SVIModule` initialised on the first batch (so every parameter
    exists before the strategy wraps it), and a ``Trainer``; under DDP
    Lightning gives each process its shard of the data with a
    ``DistributedSampler`` and averages gradients, so one step sees
    ``batch_size * devices * num_nodes`` items. The optimiser is Pyro's
    ``ClippedAdam`` with a learning rate decayed geometrically from ``lr`` to
    ``final_lr`` over ``steps`` (the schedule ``fit`` uses).

    Strategy. ``"auto"`` lets Lightning choose: ``"ddp"`` in a script (it
    starts the other processes by re-running the script, so the call must be
    reached the same way in each, as in any Lightning script) and
    ``"ddp_fork"`` in a notebook. Where re-running is not possible (a test
    runner, a library call), pass ``strategy="ddp_spawn"``: the model, guide
    and data are pickled to fresh processes (define them at module level) and
    the trained parameters are copied back into ``guide`` at the end.
    ``devices=1`` trains in the calling process without any of this.

    Limits. The loss must have ``differentiable_loss`` (``RenyiELBO`` and
    ``TraceGraph_ELBO`` run their own backward pass and are refused). When the
    data size is not a multiple of the number of processes, the sampler repeats
    a few items to even the shards out, as it does for every Lightning model.
    Under ``ddp_spawn`` the sub-guides of an ``AutoGuideList`` lose the link to
    their (blocked) models in the spawned copies, as any pickled Pyro autoguide
    does; guides that re-trace their model during training then fail there.

    Arguments:
        model: A Pyro model taking a batch's tensors as its arguments; it
            must scale its likelihood to the full data (see
            :mod:`~pyro_flowguide.train.svi_module`).
        guide: The guide to train (trained in place).
        data: A tensor, a tuple of tensors with a common first dimension (the
            model's positional arguments), a ``Dataset`` or a ``DataLoader``
            (used as is; ``batch_size`` and ``shuffle`` are then ignored).
        steps: Optimiser steps.
        batch_size: Items per process per step.
        loss: A Pyro ELBO with ``differentiable_loss``; default ``Trace_ELBO()``.
            (``elbo=`` is the deprecated name of this argument; it goes in the next release.)
        lr: Initial learning rate.
        final_lr: Learning rate at the last step (``None``: constant ``lr``).
        clip_norm: ``ClippedAdam``'s element-wise gradient clip.
        devices: Processes (CPU) or GPUs per node.
        accelerator: ``"cpu"`` (gloo) or ``"gpu"`` / ``"cuda"`` (NCCL), or
            anything Lightning accepts.
        strategy: A Lightning strategy name or object (see above).
        num_nodes: Machines taking part.
        model_kwargs: Keyword arguments for the model and guide on every step.
        check_scaling: Check on the first batch that every observed site is
            scaled by ``len(data) / batch_size`` (:class:`ScalingError` if not).
        seed: Seeds parameter initialisation and each process's noise
            (``seed + rank``); ``None`` leaves the random state alone.
        checkpoint: A path for a checkpoint written when training ends; load
            it with :func:`load_guide_checkpoint`.
        default_root_dir: Lightning's working directory (for loggers and
            checkpoint callbacks). Default: the current directory.
        callbacks: Extra Lightning callbacks (e.g. a ``ModelCheckpoint``).
        progress: Show Lightning's progress bar and model summary.
        shuffle: Shuffle the data every epoch.
        **trainer_kwargs: Passed to ``lightning.pytorch.Trainer`` (e.g.
            ``logger=``, ``precision=``). No logger unless given.

    Returns:
        A :class:`DistributedFitResult`; ``guide`` itself holds the result.

    Example:
        >>> result = fit_distributed(model, guide, (x, y), steps=2000, batch_size=256,
        ...                          devices=2, strategy="ddp_spawn")  # doctest: +SKIP
        >>> guide.median()  # doctest: +SKIP
    """
    if "elbo" in trainer_kwargs:
        if loss is not None:
            raise TypeError("fit_distributed got both loss= and its deprecated name elbo=; pass loss= only")
        warnings.warn(
            "fit_distributed(elbo=...) is deprecated and will be removed in the next release; "
            "pass loss=... (as for fit)",
            DeprecationWarning,
            stacklevel=2,
        )
        loss = trainer_kwargs.pop("elbo")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    loader = _as_loader(data, batch_size, shuffle)
    num_data = len(loader.dataset) if check_scaling else None

    if seed is not None:
        pyro.set_rng_seed(seed)
    lrd = 1.0 if final_lr is None else geometric_decay(lr, final_lr, steps)
    module = SVIModule(
        model,
        guide,
        loss,
        optimizer=partial(ClippedAdam, lr=lr, clip_norm=clip_norm, lrd=lrd),
        num_data=num_data,
        model_kwargs=model_kwargs,
        init_batch=next(iter(loader)),
        seed=seed,
    )

    callbacks = list(callbacks)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        callbacks.append(_FinalCheckpoint(checkpoint))
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_model_summary", progress)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
        max_steps=steps, callbacks=callbacks, enable_progress_bar=progress,
        default_root_dir=default_root_dir,
        # Lightning's own checkpointing only where the caller asked for it.
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    wall_time = time.perf_counter() - start
    module._restore_autoguide_links()
    last_loss = trainer.callback_metrics.get("loss")
    return DistributedFitResult(
        module=module,
        trainer=trainer,
        loss=None if last_loss is None else float(last_loss),
        wall_time=wall_time,
        checkpoint=checkpoint,
    )


def load_guide_checkpoint(
    guide: Callable,
    path: str | Path,
    *args: Any,
    model: nn.Module | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> Callable:
    r"""Loads the parameters of a Lightning checkpoint into a plain guide.

    The guide (built as for training, e.g. ``AutoFlowGuide(model)``) is called
    once with the model's arguments so that it creates its parameters, then
    gets the checkpoint's values. Parameters that lived in Pyro's param store
    (``pyro.param`` outside modules) go back into the param store, and a
    ``PyroModule`` model passed as ``model=`` gets its own. Everything runs in
    the calling process: no Lightning, no process group.

    As everywhere in Pyro, module parameters are shared by name through the
    global param store: load into a guide in a process (or after
    ``pyro.clear_param_store()``) where no other guide of that name lives.

    Arguments:
        guide: A guide of the same structure as the trained one.
        path: A checkpoint written by Lightning from an :class:`SVIModule`
            (``trainer.save_checkpoint``, ``ModelCheckpoint`` or
            ``fit_distributed(checkpoint=...)``).
        *args: The model's arguments for the initialising call (a batch is
            enough).
        model: The model, if it holds parameters of its own.
        strict: Refuse missing or unexpected guide (and model) parameters.
        **kwargs: The model's keyword arguments for the initialising call.

    Returns:
        ``guide``, holding the checkpoint's parameters.

    Example:
        >>> guide = load_guide_checkpoint(AutoNormal(model), "run.ckpt", x[:8], y[:8])  # doctest: +SKIP
        >>> guide.median()  # doctest: +SKIP
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or "state_dict" not in state:
        raise ValueError(f"{path} is not a Lightning checkpoint (it has no 'state_dict')")
    state = state["state_dict"]
    with torch.no_grad(), poutine.block():
        guide(*args, **kwargs)

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    guide_state = part(GUIDE_PREFIX)
    if isinstance(guide, nn.Module):
        guide.load_state_dict(guide_state, strict=strict)
    elif guide_state:
        raise TypeError(
            f"the checkpoint holds guide module parameters {sorted(guide_state)} "
            f"but the guide is a {type(guide).__name__}, not a module"
        )
    if model is not None:
        model.load_state_dict(part(MODEL_PREFIX), strict=strict)
    store = pyro.get_param_store()
    for key, value in part(STORE_PREFIX).items():
        name = store_name(key)
        if name in store:
            # The checkpoint holds unconstrained values: copy them as they are.
            with torch.no_grad():
                pyro.param(name).unconstrained().copy_(value)
        elif strict:
            raise KeyError(
                f"the checkpoint holds param store parameter {name!r}, which the "
                "initialising call did not create"
            )
    return guide
