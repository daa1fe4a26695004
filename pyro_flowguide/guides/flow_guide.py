r"""``AutoFlowGuide``: a normalizing-flow posterior over every continuous latent of a model.

The guide traces the model once, maps each latent site to unconstrained space
with ``biject_to(site support)``, flattens all of them into one vector
:math:`u \in \mathbb{R}^D` and gives that vector the posterior

.. math:: u = \mu + L \, f_\theta(\varepsilon), \qquad \varepsilon \sim \mathcal{N}(0, I_D),

where :math:`f_\theta` is a flow that starts at the identity and
:math:`\mu + L\,\cdot` is a learnable affine stage (full-rank lower-triangular
:math:`L` by default), so the guide starts as a Gaussian at the model's init
values with scale ``init_scale``. The flow runs in its one-pass direction,
Normal sites whose prior follows other latents are given to it in
non-centred coordinates (:mod:`~pyro_flowguide.guides.centring`), the
gradient sticks the landing (:mod:`~pyro_flowguide.guides.stl`) and the
affine stage and the flow's networks are views of one flat parameter
(:mod:`~pyro_flowguide.guides.packing`). A model with many latents gets the
structured posterior instead (:mod:`~pyro_flowguide.guides.dispatch`). The
measurements behind these defaults are in ``benchmarks/RESULTS.md``.

Example:
    >>> def model():
    ...     z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    ...     pyro.sample("x", dist.Normal(z.sum(), 0.5), obs=torch.tensor(1.0))
    >>> AutoFlowGuide(model)()["z"].shape
    torch.Size([2])
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.infer.autoguide import AutoContinuous, AutoGuide, AutoGuideList
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch import nn

from ..flows.registry import resolve_flow
from ..transforms import flow_transform
from .centring import NoncenteredMixin
from .contract import GuideContractMixin, packed_fingerprint, packed_param_name, picklable
from .dispatch import StructureDispatch, check_structure
from .full_flow import FullFlowPosterior
from .packing import Packing, fan_in_factor
from .sizes import check_flow_size
from .posterior import affine_parameters
from .sites import (
    GuideSetupError,
    check_flow_sites,
    checked_arg_shapes,
    check_options,
    check_setup_trace,
    named_setup_errors,
    flat_layout,
    shapes_of,
    with_feasible_fallback,
)

__all__ = [
    "AutoFlowGuide",
    "DEFAULT_FLOW",
    "GuideSetupError",
    "STL_MAX_DIM",
    "build_flow",
    "sequential_plate",
    "warn_unused_init_values",
]

#: The family used when ``flow`` is not given.
DEFAULT_FLOW = "SplineMAF"

#: Largest latent size for which ``estimator="auto"`` picks sticking the landing.
STL_MAX_DIM = 64


def _hidden_size(dim: int) -> int:
    return max(64, 4 * dim)


class AutoFlowGuide(StructureDispatch, FullFlowPosterior, GuideContractMixin, NoncenteredMixin, AutoContinuous):
    r"""A normalizing-flow posterior over all continuous latent sites of a model.

    A drop-in for ``AutoNormal`` / ``AutoMultivariateNormal``: construct it with
    the model, train it with SVI (or :func:`pyro_flowguide.fit`), use it with
    ``Predictive``, ``median()``, ``quantiles()``.

    Arguments:
        model: A Pyro model. Every latent site must be continuous; plates must
            be vectorised and not subsampled (for local latents under a
            subsampled plate use the amortized guide).
        flow: The flow applied in standardised coordinates. A registry name
            (``"NSF"``, ``"MAF"``, ... see :func:`pyro_flowguide.flows.flow_names`),
            a Zuko flow class, a Zuko ``Flow`` or ``LazyTransform`` instance of the
            right size, a callable ``dim -> TransformModule`` (or list of them,
            e.g. Pyro's ``T.planar``, ``T.spline_autoregressive``), or ``None``
            for no flow (a full-rank Gaussian). Default: ``DEFAULT_FLOW``.
        init_loc_fn: Per-site initialisation strategy (as for Pyro's autoguides).
        init_scale: Initial standard deviation of each unconstrained coordinate;
            default 1 for the full flow, the structured posterior's own (0.1) for it.
        covariance: ``"full"`` (lower-triangular affine stage) or ``"diagonal"``.
            Default: full when the latent dimension is at most 200.
        hidden_features: Hidden layer sizes of the flow's networks; default
            ``(H, H)`` with ``H = max(64, 4 D)``.
        transforms: Number of flow layers (registry families only).
        estimator: ``"stl"`` (sticking the landing: a draw's log-density is
            differentiated along the sampling path only, see
            :mod:`~pyro_flowguide.guides.stl`; the draws are differentiable
            once), ``"reparam"`` (the plain reparameterisation gradient) or
            ``"auto"`` (the default): STL for no flow and the registry families
            with a closed-form inverse up to ``STL_MAX_DIM`` coordinates.
        noncentered: Latent Normal sites that the flow sees in non-centred
            coordinates :math:`v = (z - m) / s`, with the model's own location
            :math:`m` and scale :math:`s` evaluated at the parents just drawn
            (see :mod:`pyro_flowguide.guides.noncentered`). ``"auto"`` (the default)
            or ``True``: every latent Normal site whose location or scale
            depends on another latent site (hierarchies, funnels); ``False``:
            none; or a list of site names. The sites chosen are in
            :attr:`noncentered_sites` once the guide is set up. The model is
            run once per guide call to evaluate :math:`m` and :math:`s`.
        network_scale: ``"fan_in"`` (the default): the flow's network layers
            are held at :math:`1/\sqrt{\text{fan-in}}` of their scale in the
            packed parameter (see :func:`~pyro_flowguide.guides.packing.fan_in_factor`),
            so that an optimiser step of lr moves each layer by about lr
            relative to its size, as it moves the affine stage, and row
            :math:`i` of the affine stage's triangular factor is held at
            :math:`1/\sqrt{i}` (see :func:`~pyro_flowguide.guides.posterior.unit_tril`);
            ``None``: both held as they are (the flow's heads then move about
            ``hidden / 2`` times faster than the affine stage).
        structure: ``"auto"`` (the default): the full flow for fewer than
            :data:`~pyro_flowguide.guides.dispatch.STRUCTURED_MIN_DIM` latent
            coordinates, and for any size when one of the full flow's options
            above is given; from that size the posterior of
            :class:`~pyro_flowguide.AutoStructuredFlowGuide` (held as
            :attr:`structured`), whose parameters and cost grow linearly with
            the latents. ``"full"``: always the full flow; ``"sites"``: always
            the structured posterior.
        warm_start: Whether the guide's first call fits the location and the
            per-coordinate scale of its affine stage to the model, by the
            Gaussian stage of :func:`~pyro_flowguide.guides.warm_start.gaussian_stage`
            (L-BFGS on the ELBO of that Gaussian, seeded, kept only if the
            ELBO improved; its outcome is :attr:`warm_start_result`). ``None``
            (the default): when ``init_loc_fn`` and ``init_scale`` are left at
            their defaults, the guide is not part of an ``AutoGuideList`` and
            the posterior is the full flow, so that an explicit initialisation
            is honoured; ``True``: also then; ``False``: never (the guide
            starts at ``init_loc_fn``'s point with scale ``init_scale``).
            :func:`~pyro_flowguide.fit` runs the same stage for a fresh guide
            that skipped it.
        hyper: Further hyper-parameters for the Zuko constructor (e.g. ``bins``).

    Example:
        >>> def model():
        ...     z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        ...     pyro.sample("x", dist.Normal(z.sum(), 0.5), obs=torch.tensor(1.0))
        >>> guide = AutoFlowGuide(model)
        >>> guide()["z"].shape
        torch.Size([2])
    """

    def __init__(
        self,
        model: Callable,
        flow: Any = DEFAULT_FLOW,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float | None = None,
        covariance: str | None = None,
        hidden_features: Sequence[int] | None = None,
        transforms: int | None = None,
        estimator: str = "auto",
        noncentered: bool | str | Sequence[str] = "auto",
        network_scale: str | None = "fan_in",
        structure: str = "auto",
        warm_start: bool | None = None,
        **hyper: Any,
    ) -> None:
        if warm_start not in (None, True, False):
            raise ValueError(f"warm_start must be None, True or False, got {warm_start!r}")
        self._warm_start_arg = warm_start
        self._init_scale_given = init_scale is not None
        init_scale = 1.0 if init_scale is None else init_scale
        if not callable(model):
            raise TypeError(f"AutoFlowGuide(model, ...): model must be the Pyro model (a callable), got a {type(model).__name__}")
        self._noncentered_arg = check_options(noncentered, init_scale, estimator, covariance)
        defaults = {"flow": DEFAULT_FLOW, "covariance": None, "hidden_features": None, "transforms": None,
                    "estimator": "auto", "noncentered": "auto", "network_scale": "fan_in"}
        values = {"flow": flow, "covariance": covariance, "hidden_features": hidden_features, "transforms": transforms,
                  "estimator": estimator, "noncentered": self._noncentered_arg, "network_scale": network_scale}
        given = [k for k, v in values.items() if not (v is defaults[k] or (isinstance(v, str) and v == defaults[k]))]
        given += list(hyper)
        check_structure(structure, given)
        self._structure, self._full_options_given = structure, bool(given)
        if network_scale not in ("fan_in", None):
            raise ValueError(f"network_scale must be 'fan_in' or None, got {network_scale!r}")
        self._network_scale = network_scale
        self.estimator = estimator  # "auto" is resolved once the latent size is known
        resolved = resolve_flow(flow)  # unknown names fail here, before any tracing
        given = {"hidden_features": hidden_features, "transforms": transforms}
        resolved.check_hyper({**hyper, **{k: v for k, v in given.items() if v is not None}})
        if resolved.kind == "name" and resolved.spec.support != "real":
            self._refused_support = resolved.spec
        # Kept in a tuple so a module passed here is not registered twice.
        self._flow_arg = (flow,)
        self._init_scale = float(init_scale)
        self._covariance = covariance
        self._hyper = dict(hyper)
        if hidden_features is not None:
            self._hyper["hidden_features"] = tuple(hidden_features)
        if transforms is not None:
            self._hyper["transforms"] = int(transforms)
        self._model_name = getattr(model, "__name__", type(model).__name__)
        self._init_loc_fn_arg = (init_loc_fn,)
        super().__init__(model, init_loc_fn=with_feasible_fallback(init_loc_fn))
        # Pyro's self.model runs the model under init_loc_fn's InitMessenger,
        # which computes an initial value for every site it meets (init_to_median
        # draws 15 prior samples per site). The model that maps non-centred
        # draws to sites gets every value from the guide, so it runs bare.
        self._bare_model = (model,)

    _refused_support = None
    #: What the Gaussian stage of the first call did (a
    #: :class:`~pyro_flowguide.guides.warm_start.GaussianStageResult`), or ``None`` where it did not run.
    warm_start_result = None

    @property
    def path_derivative_log_density(self) -> bool:
        """Whether the log-densities this guide reports carry gradient along the sampling path only.

        True with ``estimator="stl"``; :class:`~pyro_flowguide.train.RenyiDReG_ELBO`
        needs it.
        """
        return self.estimator == "stl"

    # ---------------------------------------------------------------- set-up
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        # AutoGuide's part: trace the model once and record its plates.
        try:
            with named_setup_errors(self.model, self._model_name, args, kwargs):
                AutoGuide._setup_prototype(self, *args, **kwargs)
        except NotImplementedError as e:
            raise GuideSetupError(
                f"model {self._model_name!r}: {e}{sequential_plate(self.prototype_trace)}. AutoFlowGuide needs "
                "vectorised plates (pyro.plate with a dim, used as a context manager)."
            ) from None
        check_flow_sites(self.prototype_trace, self._model_name, self._refused_support)
        warn_unused_init_values(self._init_loc_fn_arg[0], self.prototype_trace, self._model_name)
        # The prototype trace hides observed sites, so the model is traced once more.
        self._signature = check_setup_trace(
            self.model, self._bare_model[0], self._model_name, self.prototype_trace, args, kwargs
        )
        # AutoContinuous's part: the flat unconstrained layout.
        self._unconstrained_shapes, self._cond_indep_stacks = flat_layout(self.prototype_trace, self._model_name)
        self.latent_dim = sum(math.prod(shape) for shape in self._unconstrained_shapes.values())
        self._arg_shapes = shapes_of(args, kwargs)
        if self._wants_structured(self.latent_dim):
            return self._setup_structured(args, kwargs)
        self.noncentered_sites = self._choose_noncentered(args, kwargs)
        # Non-centred sites need the model's arguments to map draws to sites;
        # summaries called without them use these.
        self._setup_call = (args, kwargs) if self.noncentered_sites else ((), {})
        init = self._init_loc()
        if self.noncentered_sites:
            self._check_noncentered(init, args, kwargs)
        dtype, device = init.dtype, init.device
        dim = self.latent_dim
        named = affine_parameters(init, self._init_scale, self._covariance)
        if self.estimator == "auto":
            # The STL score costs a D x D solve per draw and layer: only for small latents.
            stl = resolve_flow(self._flow_arg[0]).stl_by_default and dim <= STL_MAX_DIM
            self.estimator = "stl" if stl else "reparam"
        check_flow_size(self._flow_arg[0], dim, {"hidden_features": (_hidden_size(dim),) * 2, **self._hyper})
        flow = build_flow(self._flow_arg[0], dim, self._hyper).to(dtype=dtype, device=device)
        # One flat parameter for the affine stage and (where allowed) the flow.
        factor = fan_in_factor if self._network_scale == "fan_in" else None
        self._packing = Packing(named, flow if resolve_flow(self._flow_arg[0]).packable else None, factor)
        self._flow_has_params = any(True for _ in flow.parameters())
        self.flow = flow
        self._factor_scaled = self._network_scale == "fan_in" and "scale_tril" in self._packing.named
        # The network scale is part of the name: the same numbers mean other weights under another scale.
        scaled = {"network_scale": self._network_scale} if self._network_scale else {}
        if self._factor_scaled:
            scaled["factor_scale"] = "fan_in"
        self._packed_name = packed_param_name(
            self._model_name, self._unconstrained_shapes, self.noncentered_sites,
            self._packing.layout(), self._flow_arg[0], {**self._hyper, **scaled},
        )
        loaded = self._check_store(self._packing.initial.shape)
        self.packed = nn.Parameter(self._packing.initial)
        self._initial_fingerprint = packed_fingerprint(self._packing.initial)
        if not loaded and self._stages_at_setup():
            from .warm_start import stage_at_setup  # it traces the model with this guide

            self.warm_start_result = stage_at_setup(self, args, kwargs)
            self._initial_fingerprint = packed_fingerprint(self._packed().detach())  # the stage is the start

    def _stages_at_setup(self) -> bool:
        if self._warm_start_arg is False or torch.jit.is_tracing():
            return False
        if self._warm_start_arg is True:
            return True
        defaults = self._init_loc_fn_arg[0] is init_to_median and not self._init_scale_given
        # A member of an AutoGuideList would be fitted with the other members' sites at their priors.
        listed = self.master is not None and isinstance(self.master(), AutoGuideList)
        return defaults and not listed

    def _check_shapes(self, args: tuple, kwargs: dict) -> None:
        # New argument shapes are fine if the latent shapes do not change.
        self._arg_shapes = checked_arg_shapes(self._arg_shapes, self._signature, self, self._model_name, args, kwargs)

    def __getstate__(self) -> dict:
        # Bound views and cached values carry a graph, which deepcopy and pickle
        # refuse; both are rebuilt on the next use.
        self.clear_cache()
        flow = self._modules.get("flow")
        if flow is not None and getattr(self, "_packing", None) is not None:
            self._packing.unbind(flow)
        # Pyro's __getstate__ drops the model links from the guide itself, not
        # only from the copy: the copy leaves them out, the guide keeps them.
        # Non-centred sites need the model after loading: it is kept where it
        # pickles (a module-level function does, by name; a lambda does not).
        links = self._model, self._bare_model, self.master
        try:
            self._bare_model = links[1] if self.noncentered_sites and picklable(links[1]) else None
            state = dict(super().__getstate__())
        finally:
            self._model, self._bare_model, self.master = links
        return state


def sequential_plate(trace: Any) -> str:
    """`` (plate 'p' around site 's')`` for the first site of ``trace`` inside a sequential plate, or ``""``."""
    for name, site in (trace.iter_stochastic_nodes() if trace is not None else ()):
        for frame in site["cond_indep_stack"]:
            if not frame.vectorized:
                return f" (plate {frame.name!r} around site {name!r})"
    return ""


def warn_unused_init_values(init_loc_fn: Any, trace: Any, model_name: str) -> None:
    """Warns when ``init_to_value(values=...)`` names sites that are not latent sites of the traced model.

    A warning, not an error: a member of an ``AutoGuideList`` sees only its own
    sites, and may share one ``values`` dict with the other members.
    """
    if not (isinstance(init_loc_fn, functools.partial) and init_loc_fn.func is init_to_value):
        return
    latent = [name for name, _ in trace.iter_stochastic_nodes()]
    unused = sorted(set(init_loc_fn.keywords.get("values", {})) - set(latent))
    if unused:
        warnings.warn(
            f"model {model_name!r}: init_to_value names {', '.join(map(repr, unused))}, which "
            f"{'is not a latent site' if len(unused) == 1 else 'are not latent sites'} of the model "
            f"(its latent sites: {', '.join(latent)}); the value is not used. Check the spelling.",
            UserWarning,
            stacklevel=4,
        )


def build_flow(flow: Any, dim: int, hyper: dict) -> nn.Module:
    """The guide's flow over ``dim`` standardised coordinates, at the identity (see :class:`AutoFlowGuide`'s ``flow``)."""
    resolved = resolve_flow(flow)
    if resolved.kind == "none":
        return nn.ModuleList()
    if resolved.kind == "factory":
        parts = flow(dim)
        parts = list(parts) if isinstance(parts, (list, tuple)) else [parts]
        for p in parts:
            if not isinstance(p, torch.distributions.Transform):
                raise TypeError(
                    f"the flow callable must return a Transform (or a list of them) "
                    f"for dim={dim}, got {type(p).__name__}"
                )
        return nn.ModuleList([p for p in parts])
    hyper = dict(hyper)
    if resolved.takes_hyper:
        hyper.setdefault("hidden_features", (_hidden_size(dim),) * 2)
    else:
        hyper = {}
    return flow_transform(flow, dim, direction="sample", identity_init=True, **hyper)
