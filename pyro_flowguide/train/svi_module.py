r"""``SVIModule``: a Pyro model and guide as a ``LightningModule`` trained on the ELBO.

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
runs unchanged on CPU (gloo) and GPU (NCCL). Import it from
:mod:`pyro_flowguide.train.lightning`, which checks that Lightning is installed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import lightning.pytorch as pl
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.infer.elbo import ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor, nn

from .defaults import DEFAULT_CLIP_NORM, DEFAULT_LR
from .losses import RenyiDReG_ELBO
from ..transforms import clear_flow_caches

__all__ = [
    "GUIDE_PREFIX",
    "MODEL_PREFIX",
    "STORE_PREFIX",
    "SVIModule",
    "ScalingError",
    "batch_length",
    "split_batch",
    "store_name",
]

#: Prefixes of the three parameter groups in ``SVIModule.state_dict()``: guide, model, param store.
GUIDE_PREFIX, MODEL_PREFIX, STORE_PREFIX = "guide.", "model.", "store_params."


class ScalingError(ValueError):
    """An observed site whose log-likelihood is not scaled to the full data size."""


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """A data-loader batch as (positional, keyword) arguments of the model."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)):
        return tuple(batch), {}
    return (batch,), {}


def batch_length(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the batch holds no tensor with a leading (data) dimension")


def _modules(obj: Any) -> Iterable[nn.Module]:
    return obj.modules() if isinstance(obj, nn.Module) else ()


def store_key(name: str) -> str:
    # nn.Module attribute names cannot hold dots; Pyro names usually do.
    return name.replace("%", "%25").replace(".", "%2E")


def store_name(key: str) -> str:
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
        >>> import lightning.pytorch as pl, pyro
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from pyro_flowguide.examples import linear_regression, linear_regression_data
        >>> x, y = linear_regression_data()
        >>> pyro.clear_param_store()
        >>> module = SVIModule(linear_regression, AutoNormal(linear_regression), init_batch=(x, y))
        >>> module.initialized
        True
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
        >>> pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn",
        ...            max_steps=1000).fit(module, loader)  # doctest: +SKIP
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
        self.optimizer_factory = optimizer or partial(ClippedAdam, lr=DEFAULT_LR, clip_norm=DEFAULT_CLIP_NORM)
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
        args, kwargs = split_batch(batch)
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
            key = store_key(name)
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
        size = batch_length(args, kwargs)
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
        args, kwargs = split_batch(batch)
        loss = self._loss(args, kwargs)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=batch_length(args, kwargs))
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
