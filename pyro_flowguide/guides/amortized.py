r"""``AutoAmortizedFlowGuide``: conditional-flow posteriors for local latents under subsampled plates.

Each local site :math:`z_i` (one per datum of a plate) gets

.. math::

    h_i = e_\phi(c_i), \qquad
    z_i = T^{-1}\big(\mu(h_i, g) + \sigma(h_i, g)\, f_\theta(\varepsilon_i;\, h_i, g)\big),
    \qquad \varepsilon_i \sim \mathcal{N}(0, I),

where :math:`c_i` is the datum's context (rows of a user function of the
model's arguments), :math:`e_\phi` an encoder network (an MLP by default),
:math:`\mu, \sigma` an affine stage computed from the encoder's features,
:math:`f_\theta` a conditional flow that starts at the identity, :math:`g`
the unconstrained global latents drawn in the same step, and
:math:`T = \text{biject\_to(support)}^{-1}`. Global latents get an
:class:`~pyro_flowguide.AutoFlowGuide` inside the same guide object. The
guide draws the subsample indices itself (:func:`subsample_indices`) and the
model replays them; the encoder sees each context column standardised with
the mean and sd of the rows seen at set-up.

Example:
    >>> idx = subsample_indices(10**6, 256)  # the guide's own subsample draw
    >>> idx.shape, idx.unique().numel()
    (torch.Size([256]), 256)

See :class:`AutoAmortizedFlowGuide` for a model and its guide.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor, nn

from ..tracing import max_plate_nesting
from .contract import SeededSummaries, picklable, store_sync
from .flow_guide import DEFAULT_FLOW, AutoFlowGuide
from .local import (
    LocalLayer,
    check_amortized_sites,
    check_plate_members,
    init_unconstrained,
    local_frame,
    make_encoder,
    read_plates,
    subsample_indices,
)
from .sites import GuideSetupError, shapes_of, with_feasible_fallback

#: The conditional flow of each local site. Splines, because a local latent is
#: often one-dimensional, where an affine flow would be only a Gaussian.
DEFAULT_LOCAL_FLOW = "NSF"

__all__ = [
    "AutoAmortizedFlowGuide",
    "DEFAULT_LOCAL_FLOW",
    "subsample_indices",
]

#: Hidden layer sizes of the default encoder MLP.
DEFAULT_ENCODER_FEATURES = (64, 64)
# Hidden width of the loc/scale head when it also sees the globals.
_GLOBAL_HEAD = 32
# Context rows used to standardise the encoder's inputs at set-up.
_STANDARDISE_ROWS = 10_000


class _GlobalFlowGuide(AutoFlowGuide):
    """An :class:`AutoFlowGuide` that keeps its last flat latent, for the local flows to condition on."""

    def sample_latent(self, *args: Any, **kwargs: Any) -> Tensor:
        latent = super().sample_latent(*args, **kwargs)
        self.__dict__["_last_latent"] = latent
        return latent


class AutoAmortizedFlowGuide(SeededSummaries, AutoGuide):
    r"""Amortized conditional-flow posteriors for local latents, a flow for the globals.

    Arguments:
        model: A Pyro model whose local latents sit in a (possibly subsampled)
            ``pyro.plate``.
        amortized: Maps each local site name to a function of the model's
            arguments (``f(*args, **kwargs)``) returning that site's per-datum
            context: a tensor whose leading dimension is the plate's *full*
            size (a view of the data, e.g. ``lambda x, batch_size=None: x``).
            The guide indexes the current subsample's rows and flattens
            trailing dimensions into the context width.
        flow: The conditional flow of each local site (a registry name, a Zuko
            flow class, or ``None`` for a diagonal Gaussian encoder). Default:
            ``DEFAULT_LOCAL_FLOW`` (NSF). The globals get
            :class:`~pyro_flowguide.AutoFlowGuide`'s default flow (no flow when
            ``flow=None``) unless ``global_options`` names one.
        encoder: An ``nn.Module`` mapping a context batch ``(B, C)`` to
            features ``(B, H)``, used for every local site, or a dict of them
            by site name. Default: an MLP with ``encoder_features`` hidden
            sizes and ELU activations.
        encoder_features: Hidden sizes of the default encoder.
        condition_on_globals: Let each local flow (and its affine stage) also
            condition on the sampled global latents: q(z_i | x_i, globals).
        init_loc_fn: Initialisation strategy (as for Pyro's autoguides); local
            sites start at the mean over the prototype's rows.
        init_scale: Initial standard deviation of each unconstrained coordinate.
        global_options: Further keyword arguments for the globals'
            :class:`~pyro_flowguide.AutoFlowGuide` (e.g. ``estimator="stl"``).
            The globals stay in centred coordinates (``noncentered=False``)
            unless this says otherwise: non-centred ones would run the whole
            model, locals included, in every call.
        hyper: Hyper-parameters of the local flows (``transforms``,
            ``hidden_features``, ``bins``, ...).

    Subsampling: the guide draws the subsample indices itself (see the module
    docstring) and the model replays them. With ``Predictive`` or
    :meth:`sample_posterior` on new data, call the model without subsampling
    (``batch_size=None``) so that model and guide see the same rows.

    Example:
        >>> def model(x, batch_size=None):
        ...     with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(2 * z + 1, 0.5), obs=x[idx])
        >>> guide = AutoAmortizedFlowGuide(model, amortized={"z": lambda x, batch_size=None: x})
        >>> draws = guide.sample_posterior(100, torch.tensor([0.0, 3.0]))
        >>> draws["z"].shape
        torch.Size([100, 2])
    """

    def __init__(
        self,
        model: Callable,
        amortized: Mapping[str, Callable],
        *,
        flow: Any = DEFAULT_LOCAL_FLOW,
        encoder: nn.Module | Mapping[str, nn.Module] | None = None,
        encoder_features: Sequence[int] = DEFAULT_ENCODER_FEATURES,
        condition_on_globals: bool = True,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        global_options: Mapping[str, Any] | None = None,
        **hyper: Any,
    ) -> None:
        if not isinstance(amortized, Mapping) or not amortized:
            raise TypeError(
                "amortized must be a non-empty dict {site name: context function}, e.g. "
                "amortized={'z': lambda x, batch_size=None: x}"
            )
        for name, fn in amortized.items():
            if not callable(fn):
                raise TypeError(
                    f"amortized[{name!r}] must be a function of the model's arguments "
                    f"returning the per-datum context, got {type(fn).__name__}"
                )
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if isinstance(encoder, Mapping):
            unknown = sorted(set(encoder) - set(amortized))
            if unknown:
                raise ValueError(f"encoder given for sites {unknown} that are not in amortized")
        self._context_fns = dict(amortized)
        # Tuples keep user modules from being registered before set-up.
        self._flow_arg = (flow,)
        self._encoder_arg = (encoder,)
        self._encoder_features = tuple(encoder_features)
        self.condition_on_globals = bool(condition_on_globals)
        self._init_loc_fn = with_feasible_fallback(init_loc_fn)
        self._init_scale = float(init_scale)
        self._global_options = dict(global_options or {})
        self._hyper = dict(hyper)
        self._model_name = getattr(model, "__name__", type(model).__name__)
        super().__init__(model)
        self._signature = None
        self._device = None

    # ---------------------------------------------------------------- set-up
    def _check_prototype(self, trace) -> None:
        """Called by the inner globals guide (Pyro's master/child protocol); nothing to check."""

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        model = poutine.block(self.model, self._prototype_hide_fn)
        self.prototype_trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        sites = dict(self.prototype_trace.iter_stochastic_nodes())
        check_amortized_sites(sites, self._context_fns, self._model_name)
        self._local_plates = {}  # plate name -> its frame
        self._site_plate = {}  # local site -> plate name
        for name in self._context_fns:
            frame = local_frame(sites[name])
            self._local_plates[frame.name] = frame
            self._site_plate[name] = frame.name
        check_plate_members(sites, self._context_fns, self._site_plate, self._local_plates)
        self._plate_info = read_plates(self.prototype_trace, self._context_fns, self._site_plate, args, kwargs)
        self._signature = shapes_of(args, kwargs)

        local_names = set(self._context_fns)
        global_names = [n for n in sites if n not in local_names]
        dtype, device = torch.get_default_dtype(), None
        if global_names:
            # Globals get AutoFlowGuide's own default flow (none with flow=None,
            # the all-Gaussian baseline).
            options = {
                "flow": None if self._flow_arg[0] is None else DEFAULT_FLOW,
                "init_loc_fn": self._init_loc_fn,
                "init_scale": self._init_scale,
                # Non-centred globals would run the model, locals and all, in
                # every call of the global guide.
                "noncentered": False,
                "structure": "full",
            }
            options.update(self._global_options)
            self.global_guide = _GlobalFlowGuide(poutine.block(self.model, hide=list(local_names)), **options)
            self.global_guide._setup_prototype(*args, **kwargs)
            self._prototype_frames = dict(self.global_guide._prototype_frames)
            global_dim = self.global_guide.latent_dim
            dtype, device = self.global_guide.affine_loc.dtype, self.global_guide.affine_loc.device
        else:
            self.global_guide = None
            self._prototype_frames = {}
            global_dim = 0
        for name in self._context_fns:
            value = sites[name]["value"]
            if value.is_floating_point():
                dtype, device = value.dtype, value.device
        condition = global_dim if self.condition_on_globals else 0
        self._device = device

        layers = {}
        for name in self._context_fns:
            site = sites[name]
            frame = self._local_frames()[name]
            full = self._plate_info[frame.name][0]
            with torch.random.fork_rng(devices=[]):
                # The same rows for the same data whatever the random state: a
                # guide built again (to load a saved param store) standardises alike.
                torch.manual_seed(0)
                sample = subsample_indices(full, _STANDARDISE_ROWS)
            context = self._context_rows(name, args, kwargs, sample).to(dtype=dtype, device=device)
            encoder = make_encoder(self._encoder_arg[0], name, context.shape[-1], self._encoder_features).to(dtype=dtype, device=device)
            rows = context
            c_loc = rows.mean(0)
            c_scale = rows.std(0) if rows.shape[0] > 1 else torch.ones_like(c_loc)
            # Constant columns (e.g. all-zero pixels) keep their scale.
            c_scale = torch.where(c_scale > 1e-6, c_scale, torch.ones_like(c_scale))
            with torch.no_grad():
                out = encoder(context[:2])
            if out.dim() != 2 or out.shape[0] != context[:2].shape[0]:
                raise GuideSetupError(
                    f"the encoder of site {name!r} must map a context batch (B, C) to features "
                    f"(B, H); given shape {tuple(context[:2].shape)} it returned {tuple(out.shape)}"
                )
            init = init_unconstrained(self._init_loc_fn, site, frame.dim)
            layers[name] = LocalLayer(
                site,
                frame.dim,
                encoder,
                out.shape[-1],
                c_loc,
                c_scale,
                condition,
                init,
                self._init_scale,
                self._flow_arg[0],
                self._hyper,
                _GLOBAL_HEAD if condition else None,
            ).to(dtype=dtype, device=device)
        self.local_layers = nn.ModuleDict(layers)

    @property
    def local_plates(self) -> dict:
        """The frame of each local plate by name (after set-up)."""
        return self._local_plates

    def _local_frames(self) -> dict:
        return {name: self._local_plates[plate] for name, plate in self._site_plate.items()}

    def _context_rows(self, name: str, args: tuple, kwargs: dict, idx: Tensor | None) -> Tensor:
        context = self._context_fns[name](*args, **kwargs)
        rows = context if idx is None else context.index_select(0, idx.to(context.device))
        return rows.reshape(rows.shape[0], -1)

    # ------------------------------------------------------------- forward
    def _refresh(self, args: tuple, kwargs: dict) -> None:
        signature = shapes_of(args, kwargs)
        if signature == self._signature:
            return
        # New data or a new batch size: re-read plate sizes and check the contexts
        # (on a fork of the random state: draws do not depend on whether shapes changed).
        with torch.random.fork_rng(devices=[]):
            trace = poutine.block(poutine.trace(poutine.block(self.model, self._prototype_hide_fn)).get_trace)(
                *args, **kwargs
            )
        self._plate_info = read_plates(trace, self._context_fns, self._site_plate, args, kwargs)
        self._signature = signature

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        setting_up = self.prototype_trace is None
        if setting_up:
            self._setup_prototype(*args, **kwargs)
        else:
            self._refresh(args, kwargs)
            store_sync(self).tree(self)  # a param store loaded after set-up wins
        result: dict[str, Tensor] = {}
        globals_ = None
        guide = self.global_guide
        if guide is not None:
            # The globals guide takes its plates from this (master) guide.
            self._create_plates(*args, **kwargs)
            result.update(guide(*args, **kwargs))
            if self.condition_on_globals:
                globals_ = guide.__dict__.pop("_last_latent")
        layers = self.local_layers
        for plate_name, (full, size, dim) in self._plate_info.items():
            idx = subsample_indices(full, size, device=self._device)
            with pyro.plate(plate_name, full, subsample=idx, dim=dim) as ind:
                for name, plate in self._site_plate.items():
                    if plate != plate_name:
                        continue
                    layer = layers[name]
                    context = self._context_rows(name, args, kwargs, idx)
                    context = context.to(dtype=layer.context_loc.dtype)
                    batch_shape = torch.Size((len(ind),) + (1,) * (-dim - 1))
                    q = layer.posterior(context, globals_, batch_shape, layer.event_shape)
                    result[name] = pyro.sample(name, q)
        if setting_up:  # every parameter is in the store now: a store loaded before set-up wins
            store_sync(self).tree(self)
        return result

    def __getstate__(self) -> dict:
        # The guide maps new data through the model and the context functions,
        # so a pickle keeps both; Pyro's own __getstate__ would drop the model
        # from the live guide as well, so the links are put back.
        _refuse_unpicklable(self._context_fns, self._model, self._model_name)
        links = self._model, self.master
        try:
            state = dict(super().__getstate__())
        finally:
            self._model, self.master = links
        state["_model"] = links[0]
        return state

    # ------------------------------------------------------------ summaries
    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draws ``num_samples`` posterior samples of every latent site for the given data.

        Returns a dict mapping site names to tensors of shape ``(num_samples,) +
        site shape`` (local sites: one column per datum of the plate; call the
        model without subsampling to get every datum).
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._refresh(args, kwargs)
            store_sync(self).tree(self)
        nesting = max_plate_nesting(self.prototype_trace)
        with poutine.block(), pyro.plate("_num_posterior_samples", num_samples, dim=-(nesting + 1)):
            trace = poutine.trace(self).get_trace(*args, **kwargs)
        out = {}
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample" or site["infer"].get("is_auxiliary"):
                continue
            value = site["value"]
            shape = self._site_shape(name, site)
            if value.numel() != num_samples * math.prod(shape):
                value = value.expand(value.shape[: value.dim() - len(shape)] + shape)
            out[name] = value.reshape((num_samples,) + shape)
        return out

    def _site_shape(self, name: str, site: dict) -> torch.Size:
        if name in self._context_fns:
            frame = self._local_frames()[name]
            size = site["value"].shape[site["value"].dim() - len(self.local_layers[name].event_shape) + frame.dim]
            return torch.Size((size,) + (1,) * (-frame.dim - 1)) + self.local_layers[name].event_shape
        return self.global_guide.prototype_trace.nodes[name]["value"].shape


def _refuse_unpicklable(context_fns: Mapping[str, Callable], model: tuple | None, model_name: str) -> None:
    unpicklable = [f"amortized[{name!r}]" for name, fn in context_fns.items() if not picklable(fn)]
    if model is not None and not picklable(model[0]):
        unpicklable.append(f"the model {model_name!r}")
    if unpicklable:
        raise pickle.PicklingError(
            f"AutoAmortizedFlowGuide: {', '.join(unpicklable)} cannot be pickled (a lambda or a "
            "closure), and the guide needs it to serve new data. Define it at module level, or "
            "save torch.save(guide.state_dict(), path) and load that into a new guide built "
            "the same way, after one call guide(*args)."
        )
