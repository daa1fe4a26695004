r"""Distributed stochastic variational inference on Lightning.

When the data no longer fit one process, training a Pyro model and guide
becomes a matter of sharding minibatches over processes (or GPUs) and
averaging gradients. Lightning does both; this module adapts a Pyro model and
guide to it.

* :class:`SVIModule` is a ``LightningModule`` whose training step is
  ``elbo.differentiable_loss(model, guide, *batch)``. Its parameters (the
  guide's, the model's, and any ``pyro.param`` outside a module) exist before
  the strategy wraps it, so DDP broadcasts and synchronises all of them.
* :func:`fit_distributed` builds the data loader, the module and the
  ``Trainer`` in one call.
* :func:`load_guide_checkpoint` loads a Lightning checkpoint into a plain
  guide in a single process.

It needs the ``distributed`` extra: ``pip install "pyro-flowguide[distributed]"``.

**The model contract.** Under DDP every process sees its own minibatch (a
``DistributedSampler`` hands each rank a disjoint shard). Each rank's loss must
estimate the *full-data* ELBO, so that the averaged gradient does too. The
model therefore receives the minibatch as its arguments and must scale the
likelihood to the full data size :math:`N` itself, with the data plate::

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
        with pyro.plate("data", N, subsample_size=len(x)):  # scale N / len(x)
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

When the guide has local latent variables (or ``N`` is large, where the
plate's own random permutation costs time), put the indices in the data and
pass them as ``subsample=idx`` instead of ``subsample_size``. With
``num_data=N`` the module checks the contract on its first batch: every
observed site must be scaled by ``N / batch size``; a site that is not raises
a :class:`ScalingError` naming it.

Data and devices. A batch is a tuple of tensors (the arguments of the model,
in order) or a mapping (its keyword arguments). Lightning moves batches to the
accelerator and the module's parameters with them; tensors the model builds
itself should follow its inputs (``x.new_zeros(...)``) so that the same model
runs unchanged on CPU (gloo) and GPU (NCCL).

Limits. The ELBO must have ``differentiable_loss`` (``RenyiELBO`` and
``TraceGraph_ELBO`` run their own backward pass and are refused). When the
data size is not a multiple of the number of processes, the sampler repeats
a few items to even the shards out, as it does for every Lightning model.
Under ``ddp_spawn`` the sub-guides of an ``AutoGuideList`` lose the link to
their (blocked) models in the spawned copies, as any pickled Pyro autoguide
does; guides that re-trace their model during training then fail there.

Example:
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from pyro_flowguide.distributed import fit_distributed
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

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
except ImportError as error:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "pyro_flowguide.distributed needs Lightning, which is an optional "
        'dependency: pip install "pyro-flowguide[distributed]"'
    ) from error

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.infer.elbo import ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .losses import RenyiDReG_ELBO
from ..transforms import clear_flow_caches

__all__ = [
    "DistributedFitResult",
    "SVIModule",
    "ScalingError",
    "fit_distributed",
    "load_guide_checkpoint",
]

# Prefixes of the three parameter groups in SVIModule.state_dict().
_GUIDE, _MODEL, _STORE = "guide.", "model.", "store_params."


class ScalingError(ValueError):
    """An observed site whose log-likelihood is not scaled to the full data size."""


def _split_batch(batch: Any) -> tuple[tuple, dict]:
    """A data-loader batch as (positional, keyword) arguments of the model."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)):
        return tuple(batch), {}
    return (batch,), {}


def _batch_length(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the batch holds no tensor with a leading (data) dimension")


def _modules(obj: Any) -> Iterable[nn.Module]:
    return obj.modules() if isinstance(obj, nn.Module) else ()


def _store_key(name: str) -> str:
    # nn.Module attribute names cannot hold dots; Pyro names usually do.
    return name.replace("%", "%25").replace(".", "%2E")


def _store_name(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


class SVIModule(pl.LightningModule):
    r"""A Pyro model and guide as a ``LightningModule`` trained on the ELBO.

    The training step returns ``elbo.differentiable_loss(model, guide,
    *batch)``; Lightning runs backward and the optimiser, and under DDP
    averages the gradients over processes. Transform caches are cleared after
    every step (they hold autograd graphs). Each process draws its own Monte
    Carlo noise (seeded by ``seed + global rank``).

    Parameters must exist before the strategy wraps the module, so the module
    must be initialised with one batch (``init_batch=`` or :meth:`initialize`)
    before ``Trainer.fit``. Initialisation runs the loss once, so that the
    guide (and a ``PyroModule`` model) create their parameters, registers any
    ``pyro.param`` that lives outside a module under ``store_params`` (so DDP
    synchronises it and checkpoints hold it), checks the scaling contract of
    the module docstring when ``num_data`` is given, and warns about
    parameters the loss does not use (DDP fails on those unless
    ``find_unused_parameters=True``).

    Arguments:
        model: A Pyro model called with a batch's tensors (see the module
            docstring for the contract on the data plate).
        guide: A guide for ``model``: an ``AutoFlowGuide``, a Pyro autoguide
            or any ``PyroModule``; a function guide works if its parameters
            are ``pyro.param`` statements.
        elbo: A Pyro ELBO with ``differentiable_loss`` (``Trace_ELBO``,
            ``TraceMeanField_ELBO``, ``TraceEnum_ELBO``); default
            ``Trace_ELBO()``.
        optimizer: Builds the optimiser from the parameters, e.g.
            ``functools.partial(torch.optim.Adam, lr=1e-3)``. Default:
            Pyro's ``ClippedAdam(lr=1e-2, clip_norm=10)``. Must be picklable
            (a ``partial``, not a lambda) when the strategy spawns processes.
        lr_scheduler: Builds a learning-rate scheduler from the optimiser;
            stepped after every optimiser step. Default: none.
        num_data: The full data size :math:`N`. When given, the first batch is
            checked: every observed site must be scaled by ``N / batch size``.
        model_kwargs: Keyword arguments passed to the model and guide on every
            step, besides the batch (e.g. ``{"num_data": N}``).
        init_batch: A batch to initialise with (same structure as the data
            loader's batches); without it, call :meth:`initialize` yourself.
        seed: Base seed of each process's Monte Carlo noise; ``None`` leaves
            the random state alone.

    Example:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> module = SVIModule(model, guide, num_data=len(x), init_batch=(x[:64], y[:64]))
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
        >>> pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn",
        ...            max_steps=1000).fit(module, loader)
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        elbo: ELBO | None = None,
        *,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        num_data: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        init_batch: Any = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        elbo = Trace_ELBO() if elbo is None else elbo
        # RenyiDReG_ELBO has the method only to refuse: its gradient is not one scalar's.
        if isinstance(elbo, RenyiDReG_ELBO) or not callable(getattr(elbo, "differentiable_loss", None)):
            raise TypeError(
                f"{type(elbo).__name__} has no differentiable_loss, so Lightning cannot "
                "run its backward pass; use Trace_ELBO, TraceMeanField_ELBO or TraceEnum_ELBO"
            )
        if num_data is not None and int(num_data) < 1:
            raise ValueError(f"num_data must be a positive data size, got {num_data}")
        # nn.Module registers model and guide as submodules when they are
        # modules, so their parameters are this module's parameters.
        self.model = model
        self.guide = guide
        self.elbo = elbo
        self.optimizer_factory = optimizer or partial(ClippedAdam, lr=1e-2, clip_norm=10.0)
        self.lr_scheduler_factory = lr_scheduler
        self.num_data = None if num_data is None else int(num_data)
        self.model_kwargs = dict(model_kwargs or {})
        self.seed = seed
        # Pickling a Pyro autoguide (ddp_spawn pickles this module) drops its
        # link to the model, on the original as well; keep the links to put back.
        self._autoguide_links = [
            (m, m._model, m.master) for m in _modules(guide) if isinstance(m, AutoGuide)
        ]
        self.store_params = nn.ParameterDict()
        self._store_names: dict[str, str] = {}
        self._store_constraints: dict[str, Any] = {}
        self.initialized = False
        if init_batch is not None:
            self.initialize(init_batch)

    # -- initialisation -------------------------------------------------

    def _loss(self, args: tuple, kwargs: dict) -> Tensor:
        return self.elbo.differentiable_loss(
            self.model, self.guide, *args, **kwargs, **self.model_kwargs
        )

    def initialize(self, batch: Any) -> None:
        """Creates every parameter with one pass of the loss on ``batch``.

        Call it once before ``Trainer.fit`` (``init_batch=`` does). It also
        registers ``pyro.param`` statements outside modules, checks the
        scaling contract when ``num_data`` is set, and warns about parameters
        the loss leaves unused.

        Arguments:
            batch: A batch as the data loader yields it.
        """
        args, kwargs = _split_batch(batch)
        with poutine.trace(param_only=True) as capture:
            self._loss(args, kwargs)
        own = {id(p) for p in self.parameters()}
        outside = {
            name: site["value"].unconstrained()
            for name, site in capture.trace.nodes.items()
            if id(site["value"].unconstrained()) not in own
        }
        # (get_state() strips the `.unconstrained` links read above: call it after.)
        constraints = pyro.get_param_store().get_state()["constraints"]
        for name, unconstrained in outside.items():
            if not isinstance(unconstrained, nn.Parameter):
                # Parameters (not plain tensors) so DDP and the optimiser see them;
                # the param store is pointed at the same object below.
                unconstrained = nn.Parameter(unconstrained.detach())
            key = _store_key(name)
            self.store_params[key] = unconstrained
            self._store_names[key] = name
            self._store_constraints[key] = constraints[name]
        self._link_param_store()
        if self.num_data is not None:
            self._check_scaling(args, kwargs)
        self._warn_unused(args, kwargs)
        self.initialized = True

    def _link_param_store(self) -> None:
        """Points Pyro's param store at ``store_params`` (in this process)."""
        if not self._store_names:
            return
        names = self._store_names
        pyro.get_param_store().set_state(
            {
                "params": {names[k]: p for k, p in self.store_params.items()},
                "constraints": {names[k]: self._store_constraints[k] for k in names},
            }
        )

    def _check_scaling(self, args: tuple, kwargs: dict) -> None:
        size = _batch_length(args, kwargs)
        expected = self.num_data / size
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs, **self.model_kwargs)
        observed = [
            site
            for site in trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]
        ]
        if not observed:
            raise ScalingError("the model has no observed sample site to scale")
        for site in observed:
            scale = float(torch.as_tensor(site["scale"]).max())
            if not math.isclose(scale, expected, rel_tol=1e-5):
                raise ScalingError(
                    f"observed site {site['name']!r} is scaled by {scale:g} on a batch of "
                    f"{size} out of num_data={self.num_data}; it must be scaled by "
                    f"{expected:g} so that each process's loss estimates the full-data "
                    "ELBO. Declare the data plate with the full size and the batch: "
                    f"pyro.plate('data', {self.num_data}, subsample_size=len(x)) or "
                    "subsample=idx with the batch's indices (or pass num_data=None if "
                    "the model scales its likelihood some other way on purpose)"
                )

    def _warn_unused(self, args: tuple, kwargs: dict) -> None:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "the model and guide have no trainable parameters after one call; "
                "is the guide a PyroModule (e.g. an autoguide) or does it use pyro.param?"
            )
        loss = self._loss(args, kwargs)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        clear_flow_caches(self)
        unused = [n for (n, _), g in zip(named, grads) if g is None]
        if unused:
            warnings.warn(
                f"parameters {unused} get no gradient from the loss; DDP stops with "
                "'Expected to have finished reduction' on those. Freeze them "
                "(requires_grad_(False)) or use "
                "strategy=DDPStrategy(find_unused_parameters=True)",
                stacklevel=3,
            )

    # -- pickling (ddp_spawn) -------------------------------------------

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_autoguide_links", None)  # they belong to this process
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._restore_autoguide_links()

    def _restore_autoguide_links(self) -> None:
        links = self.__dict__.get("_autoguide_links")
        if links is not None:
            for guide, model, master in links:
                if guide._model is None:
                    guide._model, guide.master = model, master
        elif isinstance(self.guide, AutoGuide) and self.guide._model is None:
            # An unpickled copy: the guide's model is the copied model.
            self.guide._model = (self.model,)

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        # After ddp_spawn, Lightning loads the trained parameters into the
        # original module with this; its autoguides were unlinked by pickling.
        self._restore_autoguide_links()
        return super().load_state_dict(state_dict, *args, **kwargs)

    # -- Lightning hooks ------------------------------------------------

    def setup(self, stage: str) -> None:
        if not self.initialized:
            raise RuntimeError(
                "SVIModule has no parameters yet: pass init_batch= or call "
                "module.initialize(batch) before Trainer.fit, so that they exist "
                "before the strategy wraps the module"
            )
        # A spawned process starts with an empty param store.
        self._link_param_store()
        if self.seed is not None:
            pyro.set_rng_seed(self.seed + self.trainer.global_rank)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        args, kwargs = _split_batch(batch)
        loss = self._loss(args, kwargs)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=_batch_length(args, kwargs))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Cached flow values hold autograd graphs; dropping them keeps memory flat.
        clear_flow_caches(self)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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
    elbo: ELBO | None = None,
    lr: float = 1e-2,
    final_lr: float | None = 1e-3,
    clip_norm: float = 10.0,
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

    Arguments:
        model: A Pyro model taking a batch's tensors as its arguments; it
            must scale its likelihood to the full data (module docstring).
        guide: The guide to train (trained in place).
        data: A tensor, a tuple of tensors with a common first dimension (the
            model's positional arguments), a ``Dataset`` or a ``DataLoader``
            (used as is; ``batch_size`` and ``shuffle`` are then ignored).
        steps: Optimiser steps.
        batch_size: Items per process per step.
        elbo: A Pyro ELBO with ``differentiable_loss``; default ``Trace_ELBO()``.
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
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    loader = _as_loader(data, batch_size, shuffle)
    num_data = len(loader.dataset) if check_scaling else None

    if seed is not None:
        pyro.set_rng_seed(seed)
    lrd = 1.0 if final_lr is None else (final_lr / lr) ** (1.0 / steps)
    module = SVIModule(
        model,
        guide,
        elbo,
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
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=steps,
        callbacks=callbacks,
        # Lightning's own checkpointing only where the caller asked for it.
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=progress,
        default_root_dir=default_root_dir,
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    wall_time = time.perf_counter() - start
    module._restore_autoguide_links()
    loss = trainer.callback_metrics.get("loss")
    return DistributedFitResult(
        module=module,
        trainer=trainer,
        loss=None if loss is None else float(loss),
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

    guide_state = part(_GUIDE)
    if isinstance(guide, nn.Module):
        guide.load_state_dict(guide_state, strict=strict)
    elif guide_state:
        raise TypeError(
            f"the checkpoint holds guide module parameters {sorted(guide_state)} "
            f"but the guide is a {type(guide).__name__}, not a module"
        )
    if model is not None:
        model.load_state_dict(part(_MODEL), strict=strict)
    store = pyro.get_param_store()
    for key, value in part(_STORE).items():
        name = _store_name(key)
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
