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
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor, nn

from ..tracing import max_plate_nesting
from .contract import SeededSummaries, checked_num_samples, picklable, store_sync
from .flow_guide import DEFAULT_FLOW, AutoFlowGuide
from .local import (
    build_layer,
    check_amortized_sites,
    check_list_plates,
    check_plate_members,
    draw_plates,
    enter_plates,
    init_unconstrained,
    local_frames,
    make_encoder,
    read_plates,
    subsample_indices,
)
from .sites import shapes_of, with_feasible_fallback

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
    """An :class:`AutoFlowGuide` that keeps its last flat latent, for the local flows to condition on.

    Inside a call of its :class:`AutoAmortizedFlowGuide` it enters that guide's
    plates of the call (``_given_plates``): an outer plate may hold global
    and local latents alike, and each plate is drawn once per call.
    """

    def sample_latent(self, *args: Any, **kwargs: Any) -> Tensor:
        latent = super().sample_latent(*args, **kwargs)
        self.__dict__["_last_latent"] = latent
        return latent

    def _create_plates(self, *args: Any, **kwargs: Any) -> dict:
        given = self.__dict__.get("_given_plates")
        if given is None:
            return super()._create_plates(*args, **kwargs)
        self.plates = given
        return given


class AutoAmortizedFlowGuide(SeededSummaries, AutoGuide):
    r"""Amortized conditional-flow posteriors for local latents, a flow for the globals.

    Arguments:
        model: A Pyro model whose local latents sit in a (possibly subsampled)
            ``pyro.plate``, or in nested plates (classes within schools).
        amortized: Maps each local site name to a function of the model's
            arguments (``f(*args, **kwargs)``) returning that site's per-datum
            context: a tensor whose leading dimension is the plate's *full*
            size (a view of the data, e.g. ``lambda x, batch_size=None: x``);
            for a site in nested plates, one leading dimension per plate, in
            the order of the plates' dims (outermost first). The guide indexes
            the current subsample's rows and flattens trailing dimensions into
            the context width.
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

    Nested plates: a local site may sit in several plates (classes within
    schools); its context has one leading dimension per plate. An outer plate
    may also hold global latents (one per school), which the globals' flow
    serves; a latent in a local site's innermost plate must be amortized too.

    In an ``AutoGuideList`` (``AutoAmortizedFlowGuide(poutine.block(model,
    hide=[...]), ...)`` next to other autoguides) the list draws every plate,
    this guide's local plates included, with the sizes of its first call; for
    other batch sizes or new data give the list ``create_plates``.

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
        # The user's function: it pickles where that does (the wrapped one never does).
        self._init_loc_fn_arg = init_loc_fn
        # Tuples keep user modules from being registered before set-up.
        self._flow_arg = (flow,)
        self._encoder_arg = (encoder,)
        self._encoder_features = tuple(encoder_features)
        self.condition_on_globals = bool(condition_on_globals)
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

    @property
    def _init_loc_fn(self) -> Callable:
        return with_feasible_fallback(self._init_loc_fn_arg)

    def _global_kwargs(self) -> dict:
        # AutoFlowGuide's default flow (none with flow=None, the all-Gaussian baseline), centred:
        # non-centred globals would run the model, locals and all, in every call of the globals guide.
        options = {"flow": None if self._flow_arg[0] is None else DEFAULT_FLOW, "init_loc_fn": self._init_loc_fn_arg,
                   "init_scale": self._init_scale, "noncentered": False, "structure": "full"}
        return {**options, **self._global_options}

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        self.prototype_trace, self._nesting = _latent_trace(self.model, self._prototype_hide_fn, args, kwargs)
        sites = dict(self.prototype_trace.iter_stochastic_nodes())
        check_amortized_sites(sites, self._context_fns, self._model_name)
        self._local_plates = {}  # plate name -> its frame
        self._site_plates = {}  # local site -> its plates' names, outermost dim first
        for name in self._context_fns:
            frames = local_frames(sites[name])
            self._local_plates.update((frame.name, frame) for frame in frames)
            self._site_plates[name] = tuple(frame.name for frame in frames)
        check_plate_members(sites, self._context_fns, self._site_plates)
        self._plate_info = read_plates(self.prototype_trace, self._context_fns, self._site_plates, args, kwargs)
        self._signature = shapes_of(args, kwargs)

        local_names = set(self._context_fns)
        global_names = [n for n in sites if n not in local_names]
        dtype, device = torch.get_default_dtype(), None
        if global_names:
            blocked = poutine.block(self.model, hide=list(local_names))
            self.global_guide = _GlobalFlowGuide(blocked, **self._global_kwargs())
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
            context = _standardising_rows(self._context_rows(name, args, kwargs))
            layers[name] = build_layer(
                sites[name],
                self._local_plates[self._site_plates[name][0]].dim,
                context.to(dtype=dtype, device=device),
                make_encoder(self._encoder_arg[0], name, context.shape[-1], self._encoder_features),
                condition,
                init_unconstrained(self._init_loc_fn, sites[name]),
                self._init_scale,
                self._flow_arg[0],
                self._hyper,
                _GLOBAL_HEAD if condition else None,
            )
        self.local_layers = nn.ModuleDict(layers)

    @property
    def local_plates(self) -> dict:
        """The frame of each plate holding an amortized site, by name (after set-up)."""
        return self._local_plates

    def _context_rows(self, name: str, args: tuple, kwargs: dict, indices: Sequence[Tensor | None] = ()) -> Tensor:
        """The site's context rows ``(B, C)``: indexed along each of its plates (``None``: all), then flattened."""
        context = self._context_fns[name](*args, **kwargs)
        for k, idx in enumerate(indices):
            if idx is not None:
                context = context.index_select(k, idx.to(context.device))
        k = len(self._site_plates[name])
        return context.reshape(math.prod(context.shape[:k]), -1)

    # ------------------------------------------------------------- forward
    def _refresh(self, args: tuple, kwargs: dict) -> None:
        signature = shapes_of(args, kwargs)
        if signature == self._signature:
            return
        # New data or a new batch size: plate sizes, contexts and the globals guide's check,
        # on a fork of the random state (draws do not depend on whether shapes changed).
        with torch.random.fork_rng(devices=[]):
            trace, self._nesting = _latent_trace(self.model, self._prototype_hide_fn, args, kwargs)
            if self.global_guide is not None:
                self.global_guide._check_shapes(args, kwargs)
        self._plate_info = read_plates(trace, self._context_fns, self._site_plates, args, kwargs)
        self._signature = signature

    def _create_plates(self, *args: Any, **kwargs: Any) -> dict:
        """This call's plates, each drawn once (local ones with this guide's indices); an ``AutoGuideList``'s in one."""
        if self.master is not None and not self.__dict__.get("_own_plates"):
            self.plates = check_list_plates(self.master().plates, self._plate_info)
        else:
            self.plates = draw_plates(self._plate_info, self._prototype_frames, self._device)
        return self.plates

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        setting_up = self.prototype_trace is None
        if setting_up:
            self._setup_prototype(*args, **kwargs)
        else:
            self._refresh(args, kwargs)
            store_sync(self).tree(self)  # a param store loaded after set-up wins
        result: dict[str, Tensor] = {}
        globals_ = None
        plates = self._create_plates(*args, **kwargs)
        guide = self.global_guide
        if guide is not None:
            # The globals guide enters this call's plates (a plate may hold globals and locals).
            guide.__dict__["_given_plates"] = plates
            try:
                result.update(guide(*args, **kwargs))
            finally:
                guide.__dict__.pop("_given_plates", None)
            if self.condition_on_globals:
                globals_ = guide.__dict__.pop("_last_latent")
        layers = self.local_layers
        for name, plate_names in self._site_plates.items():
            layer = layers[name]
            with ExitStack() as stack:
                region, indices = enter_plates(stack, plates, plate_names, self._plate_info, layer.plate_nesting)
                context = self._context_rows(name, args, kwargs, indices)
                context = context.to(dtype=layer.context_loc.dtype)
                q = layer.posterior(context, globals_, region, layer.event_shape)
                result[name] = pyro.sample(name, q)
        if setting_up:  # every parameter is in the store now: a store loaded before set-up wins
            store_sync(self).tree(self)
        return result

    def __getstate__(self) -> dict:
        # The guide maps new data through the model and the context functions,
        # so a pickle keeps both; Pyro's own __getstate__ would drop the model
        # from the live guide as well, so the links are put back.
        _refuse_unpicklable(self._context_fns, self._model, self._model_name, self._init_loc_fn_arg)
        links = self._model, self.master
        try:
            state = dict(super().__getstate__())
        finally:
            self._model, self.master = links
        state["_model"] = links[0]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        guide = self._modules.get("global_guide")
        if guide is not None and guide._model is None and self._model is not None:
            # Pyro's pickle drops the globals guide's model: rebuilt as at set-up.
            blocked = poutine.block(self._model[0], hide=list(self._context_fns))
            guide._model = (InitMessenger(self._init_loc_fn)(blocked),)

    # ------------------------------------------------------------ summaries
    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draws ``num_samples`` posterior samples of every latent site for the given data.

        Returns site name -> ``(num_samples,) + site shape`` (local sites: one column
        per datum of the plate; call the model without subsampling for every datum).
        """
        num_samples = checked_num_samples(num_samples, self)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._refresh(args, kwargs)
            store_sync(self).tree(self)
        # Its own plates, also in an AutoGuideList: the list's are those of its last call.
        self.__dict__["_own_plates"] = True
        try:
            # Left of every plate of the model, observed sites' too: the globals guide may
            # run the model in it (to check new argument shapes).
            with poutine.block(), pyro.plate("_num_posterior_samples", num_samples, dim=-(self._nesting + 1)):
                trace = poutine.trace(self).get_trace(*args, **kwargs)
        finally:
            self.__dict__.pop("_own_plates", None)
        out = {}
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample" or site["infer"].get("is_auxiliary"):
                continue
            value = site["value"]
            shape = _draw_shape(self, name, site)
            if value.numel() != num_samples * math.prod(shape):
                value = value.expand(value.shape[: value.dim() - len(shape)] + shape)
            out[name] = value.reshape((num_samples,) + shape)
        return out


def _latent_trace(model: Callable, hide_fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, int]:
    """One trace of the model: its latent sites' trace (the prototype), and how many dims all its plates use.

    The count includes the plates of observed sites, which the prototype leaves out.
    """
    trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    nesting = max_plate_nesting(trace)
    for name, site in list(trace.nodes.items()):
        if site["type"] not in ("args", "return") and hide_fn(site):
            trace.remove_node(name)
    return trace, nesting


def _draw_shape(guide: AutoAmortizedFlowGuide, name: str, site: dict) -> torch.Size:
    """The shape of one draw of a site: a local site's batch shape from its outermost plate's dim on, and event."""
    if name in guide.local_layers:
        layer, value = guide.local_layers[name], site["value"]
        batch = value.shape[: value.dim() - len(layer.event_shape)]
        return batch[len(batch) - layer.plate_nesting :] + layer.event_shape
    return guide.global_guide.prototype_trace.nodes[name]["value"].shape


def _standardising_rows(context: Tensor) -> Tensor:
    """At most ``_STANDARDISE_ROWS`` rows of a site's context, to standardise its columns with."""
    with torch.random.fork_rng(devices=[]):
        # The same rows for the same data whatever the random state: a guide
        # built again (to load a saved param store) standardises alike.
        torch.manual_seed(0)
        sample = subsample_indices(context.shape[0], _STANDARDISE_ROWS)
    return context if sample is None else context.index_select(0, sample.to(context.device))


def _refuse_unpicklable(
    context_fns: Mapping[str, Callable], model: tuple | None, model_name: str, init_loc_fn: Callable
) -> None:
    unpicklable = [f"amortized[{name!r}]" for name, fn in context_fns.items() if not picklable(fn)]
    if model is not None and not picklable(model[0]):
        unpicklable.append(f"the model {model_name!r}")
    if not picklable(init_loc_fn):
        unpicklable.append("init_loc_fn")
    if unpicklable:
        raise pickle.PicklingError(
            f"AutoAmortizedFlowGuide: {', '.join(unpicklable)} cannot be pickled (a lambda or a "
            "closure); a pickled guide keeps the model, its context functions (to serve new data) "
            "and init_loc_fn. Define it at module level, or save torch.save(guide.state_dict(), "
            "path) and load that into a new guide built the same way, after one call guide(*args)."
        )
