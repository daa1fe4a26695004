r"""``AutoStructuredFlowGuide``: a flow guide whose cost grows linearly with the number of latents.

It reads the model's structure from one trace and splits the latent sites:

* globals: sites outside every plate, together at most ``global_max_dim``
  unconstrained coordinates; a full-rank Gaussian over them (optionally a flow).
* plated sites: per member :math:`i` (a position in the site's plates),
  :math:`u_i = \mu_i + \sigma_i \odot L_i (\varepsilon_i \odot e^{s_i}) + t_i + B_i g`,
  where :math:`(t_i, s_i)` come from one small network per site, shared by its
  members, that reads the globals' standardised draw :math:`g` and a learned
  embedding of the member; :math:`L_i` is unit lower-triangular, :math:`B_i` linear.
* chains: sites outside every plate beyond ``global_max_dim`` (a latent per
  time step in one vector site): the same per element, with an AR(1) + MA(1)
  filter along the site applied to :math:`\varepsilon \odot e^{s}` (a parallel prefix scan);
  short chains share one stage, whose dense factor couples them (``chain_groups``).

Every part starts at the identity (an untrained guide is ``AutoNormal``'s
mean-field Gaussian at the initial values); the parts are in
:mod:`~pyro_flowguide.guides.structured_parts`. A model with globals only is
handed whole to :class:`~pyro_flowguide.AutoFlowGuide`.

Example:
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    ...     with pyro.plate("groups", y.shape[0]):
    ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=y)
    >>> guide = AutoStructuredFlowGuide(model)
    >>> guide(torch.zeros(5))["theta"].shape
    torch.Size([5])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from torch import Tensor
from torch.distributions import Transform

from ..flows.registry import resolve_flow
from ..transforms import clear_flow_caches
from .contract import checked_num_samples, checked_quantiles, rng_devices, store_sync
from .flow_guide import DEFAULT_FLOW, AutoFlowGuide
from .sites import (
    GuideSetupError,
    bijection,
    check_continuous_unsubsampled,
    checked_arg_shapes,
    check_setup_trace,
    named_setup_errors,
    shapes_of,
    with_feasible_fallback,
)
from .structured_parts import GlobalStage, site_stages

__all__ = ["DEFAULT_INIT_SCALE", "AutoStructuredFlowGuide", "SiteInfo", "read_sites", "split_sites"]

#: The scale of plated and chain sites (and of the globals beside them) when ``init_scale`` is not given.
DEFAULT_INIT_SCALE = 0.1


@dataclass
class SiteInfo:
    """One latent site as the guide sees it.

    ``shape`` is the unconstrained shape, ``value_shape`` the site's own;
    ``batch`` the plated batch shape (members) of a plated site, ``()`` for
    globals and chains; ``frames`` its vectorised plates.
    """

    name: str
    bijection: Transform
    init: Tensor
    value_shape: tuple
    batch: tuple
    frames: tuple
    kind: str = "global"

    @property
    def shape(self) -> tuple:
        return tuple(self.init.shape)

    @property
    def numel(self) -> int:
        return self.init.numel()


def read_sites(trace, model_name: str) -> dict[str, SiteInfo]:
    """The latent sites of a prototype trace, checked: continuous, plates vectorised and not subsampled.

    Raises :class:`GuideSetupError` naming the site and the fix otherwise.
    """
    sites = {}
    for name, site in trace.iter_stochastic_nodes():
        fn = site["fn"]
        check_continuous_unsubsampled(name, site, model_name, "AutoStructuredFlowGuide")
        to_site = bijection(site)
        init = to_site.inv(site["value"]).detach()
        frames = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
        batch = tuple(fn.batch_shape) if frames else ()
        if tuple(init.shape[: len(batch)]) != batch:
            raise GuideSetupError(
                f"site {name!r} of model {model_name!r} has value shape {tuple(site['value'].shape)}, which "
                f"does not start with its batch shape {batch}; expand its distribution to the sizes of "
                "its plates (.expand([...]) or broadcasting parameters of those sizes)."
            )
        sites[name] = SiteInfo(name, to_site, init, tuple(site["value"].shape), batch, frames,
                               "local" if frames else "global")
    if not sites or sum(info.numel for info in sites.values()) == 0:
        raise GuideSetupError(
            f"model {model_name!r} has no latent sample sites: every pyro.sample is observed, so "
            "there is no posterior to fit. Use an empty guide instead."
        )
    return sites


def split_sites(sites: dict[str, SiteInfo], global_max_dim: int) -> None:
    """Marks sites outside every plate as chains, largest first, until the rest fit in ``global_max_dim``."""
    free = sorted((info for info in sites.values() if info.kind == "global"), key=lambda i: -i.numel)
    total = sum(info.numel for info in free)
    for info in free:
        if total <= global_max_dim:
            break
        info.kind = "chain"
        total -= info.numel


def _column_quantiles(x: Tensor, q: Tensor, max_numel: int = 1 << 23) -> Tensor:
    """``torch.quantile(x, q, dim=0)`` in column blocks (torch refuses inputs above 2**24 elements)."""
    width = max(1, max_numel // max(1, x.shape[0]))
    return torch.cat([torch.quantile(x[:, i : i + width], q, dim=0) for i in range(0, x.shape[1], width)], -1)


class AutoStructuredFlowGuide(AutoGuide):
    r"""A flow guide for models with many latents: cost and parameters linear in their number.

    Globals (sites outside every plate, at most ``global_max_dim`` coordinates)
    get a full-rank Gaussian, or a flow; each plated site gets a per-member
    affine stage, a linear coupling to the globals and one small network,
    shared by its members, that shifts and scales each member given the
    globals; each large site outside every plate (a chain) gets the same per
    element and an AR(1) + MA(1) filter along it (see the module page). Its
    parameters and its cost per step grow linearly with the number of latents.
    A model with globals only is handed to :class:`~pyro_flowguide.AutoFlowGuide`
    (:attr:`delegate`). Use it as Pyro's autoguides: train it with SVI or
    :func:`pyro_flowguide.fit`, draw with ``Predictive`` or :meth:`sample_posterior`.

    Arguments:
        model: A Pyro model. Every latent site must be continuous; plates must
            be vectorised and not subsampled.
        init_loc_fn: Per-site initialisation strategy (as for Pyro's autoguides).
        init_scale: Initial standard deviation of each unconstrained coordinate;
            default ``0.1`` (``AutoNormal``'s), or ``AutoFlowGuide``'s own default
            for a model handed to it.
        hidden: Width of each site's shared network.
        global_max_dim: Sites outside every plate are globals while they total
            at most this many unconstrained coordinates; the largest of the rest
            become chains.
        global_flow: The flow over the globals of a model with plated or chain
            sites: ``None`` (the default; a full-rank Gaussian) or anything
            :class:`~pyro_flowguide.AutoFlowGuide` accepts as ``flow``.
        flow: The ``flow`` of the ``AutoFlowGuide`` that a model with globals
            only is handed to. Default ``DEFAULT_FLOW``.
        flow_options: Further keyword arguments of that ``AutoFlowGuide``
            (``hidden_features``, ``transforms``, ``covariance``, ...).

    Example:
        >>> def model(y):
        ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
        ...     with pyro.plate("groups", y.shape[0]):
        ...         theta = pyro.sample("theta", dist.Normal(0.0, tau))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=y)
        >>> guide = AutoStructuredFlowGuide(model)
        >>> draws = guide.sample_posterior(100, torch.zeros(5))
        >>> draws["theta"].shape, guide.site_groups()["local"]
        (torch.Size([100, 5]), ('theta',))
    """

    #: Posterior draws behind :meth:`median` and :meth:`quantiles`.
    summary_draws: int = 1000
    #: The seed of those draws (taken on a fork of the random state).
    summary_seed: int = 0
    _joint: dict = {}  # stage name -> the chains that share it (set by _build; read-only here)
    #: The most draws times coordinates drawn at once by :meth:`sample_posterior` and the summaries.
    draw_chunk: int = 4_000_000

    def __init__(
        self,
        model: Callable,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float | None = None,
        hidden: int = 16,
        global_max_dim: int = 32,
        global_flow: Any = None,
        flow: Any = DEFAULT_FLOW,
        **flow_options: Any,
    ) -> None:
        if init_scale is not None and not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        if not (isinstance(global_max_dim, int) and global_max_dim >= 0):
            raise ValueError(f"global_max_dim must be a non-negative integer, got {global_max_dim!r}")
        if global_flow is not None:
            resolve_flow(global_flow)  # unknown names fail here, before any tracing
        # Built now so that bad options fail here; used only for a model with globals only.
        scale = {} if init_scale is None else {"init_scale": init_scale}
        flow_options.setdefault("structure", "full")
        flow_options.setdefault("warm_start", False)  # the structured guide starts at its initial values
        self._delegate_arg = (AutoFlowGuide(model, flow, init_loc_fn=init_loc_fn, **scale, **flow_options),)
        self._init_scale = DEFAULT_INIT_SCALE if init_scale is None else float(init_scale)
        self._hidden = hidden
        self.global_max_dim = global_max_dim
        self._global_flow_arg = (global_flow,)  # in a tuple: a module given here is not registered twice
        self._bare_model = (model,)
        self._model_name = getattr(model, "__name__", type(model).__name__)
        super().__init__(InitMessenger(with_feasible_fallback(init_loc_fn))(model))
        self.delegate = None
        self._sites: dict[str, SiteInfo] = {}

    # ---------------------------------------------------------------- set-up
    def _check_prototype(self, part_trace) -> None:
        """Called by :attr:`delegate` on its set-up; nothing to check."""

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        rng = torch.get_rng_state()  # a delegate starts from the caller's random state
        try:
            with named_setup_errors(self.model, self._model_name, args, kwargs):
                super()._setup_prototype(*args, **kwargs)
        except NotImplementedError as e:
            raise GuideSetupError(
                f"model {self._model_name!r}: {e}. AutoStructuredFlowGuide needs vectorised plates "
                "(pyro.plate with a dim, used as a context manager)."
            ) from None
        sites = read_sites(self.prototype_trace, self._model_name)
        split_sites(sites, self.global_max_dim)
        self._sites = sites
        self.max_plate_nesting = max((-f.dim for f in self._prototype_frames.values()), default=0)
        self._arg_shapes = shapes_of(args, kwargs)
        if all(info.kind == "global" for info in sites.values()):
            self.delegate = self._delegate_arg[0]
            torch.set_rng_state(rng)
            self.delegate._setup_prototype(*args, **kwargs)
            return
        self._signature = check_setup_trace(
            self.model, self._bare_model[0], self._model_name, self.prototype_trace, args, kwargs
        )
        self._build(sites)

    def _build(self, sites: dict[str, SiteInfo]) -> None:
        globals_ = [info for info in sites.values() if info.kind == "global"]
        glob = sum(info.numel for info in globals_)
        if globals_:
            init = torch.cat([info.init.reshape(-1) for info in globals_])
            self.globals = GlobalStage(init, self._init_scale, self._global_flow_arg[0])
        self.stages, self._stage_keys, self._joint = site_stages(sites, self._init_scale, glob, self._hidden)
        store_sync(self).tree(self, strict=True)  # a guide of the same names shares the store's tensors

    @property
    def _owner(self) -> str:
        return f"the AutoStructuredFlowGuide of model {self._model_name!r}"

    def _check_shapes(self, args: tuple, kwargs: dict) -> None:
        # New argument shapes are fine if the latent shapes do not change.
        self._arg_shapes = checked_arg_shapes(self._arg_shapes, self._signature, self, self._model_name, args, kwargs)

    # ---------------------------------------------------------------- draws
    def _aux(self, what: str) -> str:
        return f"_{self._pyro_name}_{what}_eps"

    def _sample_site(self, info: SiteInfo, u: Tensor, ladj: Tensor | None, lead: tuple, keep: dict | None) -> Tensor:
        """Samples site ``info`` at unconstrained ``u`` (shape ``lead + info.shape``) with ``log|du/deps|``."""
        value = info.bijection(u)
        members = len(info.batch)
        if keep is not None:
            keep[info.name] = u.reshape(math.prod(lead), -1)
        if poutine.get_mask() is False:
            log_density = 0.0
        else:
            # log q(value) = log N(eps) - log|du/deps| - log|dvalue/du|; log N(eps) is the auxiliary site's.
            to_value = info.bijection.log_abs_det_jacobian(u, value)
            log_density = -sum_rightmost(to_value, to_value.dim() - len(lead) - members)
            if ladj is not None:
                log_density = log_density - ladj.reshape(lead + info.batch)
        event_dim = len(info.value_shape) - members
        return pyro.sample(info.name, dist.Delta(value, log_density=log_density, event_dim=event_dim))

    def _draw_globals(self, result: dict, keep: dict | None) -> Tensor:
        stage = self.globals
        init = next(iter(self._sites.values())).init
        base = dist.Normal(torch.zeros(stage.dim, dtype=init.dtype, device=init.device), 1.0).to_event(1)
        eps = pyro.sample(self._aux("globals"), base, infer={"is_auxiliary": True})
        lead = tuple(eps.shape[:-1])
        u, glob, ladj = stage(eps.reshape(-1, stage.dim))
        start, first = 0, True
        for info in self._sites.values():
            if info.kind != "global":
                continue
            part = u[:, start : start + info.numel].reshape(lead + info.shape)
            start += info.numel
            result[info.name] = self._sample_site(info, part, ladj if first else None, lead, keep)
            first = False
        return glob

    def _draw_site(self, info: SiteInfo, glob: Tensor | None, plates: dict, keep: dict | None) -> Tensor:
        stage = getattr(self.stages, self._stage_keys[info.name])
        with ExitStack() as stack:
            for frame in info.frames:
                stack.enter_context(plates[frame.name])
            zeros = torch.zeros(info.shape, dtype=info.init.dtype, device=info.init.device)
            base = dist.Normal(zeros, 1.0).to_event(len(info.shape) - len(info.batch))
            eps = pyro.sample(self._aux(info.name), base, infer={"is_auxiliary": True})
            lead = tuple(eps.shape[: eps.dim() - len(info.shape)])
            u, ladj = stage(eps.reshape(math.prod(lead), stage.members, stage.event), glob)
            if info.kind == "chain":
                ladj = ladj.sum(-1)
            return self._sample_site(info, u.reshape(lead + info.shape), ladj, lead, keep)

    def _draw(self, plates: dict, keep: dict | None = None) -> dict[str, Tensor]:
        result: dict[str, Tensor] = {}
        glob = self._draw_globals(result, keep) if "globals" in self._modules else None
        for info in self._sites.values():
            key = self._stage_keys.get(info.name)
            if info.name in result or key is None:
                continue
            if key in self._joint:
                result.update(draw_joint_chain(self, key, glob, keep))
            else:
                result[info.name] = self._draw_site(info, glob, plates, keep)
        return {name: result[name] for name in self._sites}

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draws every latent site (a joint draw); returns them by name."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)  # before the delegate's call: it uses these
        if self.delegate is not None:
            return self.delegate(*args, **kwargs)
        self._check_shapes(args, kwargs)
        store_sync(self).tree(self, strict=True)  # e.g. a param store loaded after set-up
        return self._draw(plates)

    # ------------------------------------------------------------ summaries
    @torch.no_grad()
    def _draws(self, num_samples: int, args: tuple, kwargs: dict, keep: dict | None = None) -> dict[str, Tensor]:
        """``num_samples`` joint draws per site, ``(num_samples,) + site shape``, drawn in chunks of :attr:`draw_chunk`."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        store_sync(self).tree(self, strict=True)
        dim = sum(info.numel for info in self._sites.values())
        chunk = max(1, min(num_samples, self.draw_chunk // max(1, dim)))
        parts: list[dict] = []
        kept: list[dict] = []
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            part_keep: dict | None = {} if keep is not None else None
            with poutine.block():
                plates = self._create_plates(*args, **kwargs)
                with pyro.plate("_num_posterior_samples", n, dim=-(self.max_plate_nesting + 1)):
                    values = self._draw(plates, part_keep)
            parts.append({k: v.reshape((n,) + self._sites[k].value_shape) for k, v in values.items()})
            kept.append(part_keep or {})
        self.clear_cache()
        if keep is not None:
            keep.update({k: torch.cat([p[k] for p in kept]) for k in self._sites})
        return {k: torch.cat([p[k] for p in parts]) for k in self._sites}

    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """``num_samples`` joint posterior draws of every latent site, ``(num_samples,) + site shape``."""
        num_samples = checked_num_samples(num_samples, self)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.delegate is not None:
            return self.delegate.sample_posterior(num_samples, *args, **kwargs)
        return self._draws(num_samples, args, kwargs)

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior quantiles of each latent site, shape ``(len(quantiles),) + site shape``.

        Taken per coordinate of ``summary_draws`` unconstrained draws and mapped
        through each site's bijection (exact for monotone per-coordinate
        constraints, a consistent summary otherwise). The draws use
        ``summary_seed`` on a fork of the random state: every call gives the
        same answer and the caller's random stream is left alone.
        """
        checked = checked_quantiles(quantiles)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.delegate is not None:
            return self.delegate.quantiles(quantiles, *args, **kwargs)
        unconstrained = summary_unconstrained(self, args, kwargs)
        out = {}
        for name, info in self._sites.items():
            flat = unconstrained[name]
            q = checked.to(dtype=flat.dtype, device=flat.device)
            out[name] = info.bijection(_column_quantiles(flat, q).reshape((len(q),) + info.shape))
        return out

    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The posterior median of each latent site: ``quantiles([0.5])``."""
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}

    @torch.no_grad()
    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The posterior mean and sd of each unconstrained coordinate (sites in model order), from the summary draws."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.delegate is not None:
            return self.delegate._loc_scale(*args, **kwargs)
        flat = torch.cat(list(summary_unconstrained(self, args, kwargs).values()), -1)
        return flat.mean(0), flat.std(0)

    def site_groups(self) -> dict[str, tuple[str, ...]]:
        """How the latent sites were split (after set-up): ``{"global": ..., "local": ..., "chain": ...}``."""
        return {kind: tuple(n for n, i in self._sites.items() if i.kind == kind) for kind in ("global", "local", "chain")}

    def clear_cache(self) -> None:
        """Drops cached flow values and the graphs they hold (a flow over the globals only)."""
        clear_flow_caches(self)

    def __getstate__(self) -> dict:
        # Pyro's __getstate__ drops the model and master links from the guide
        # itself, not only from the copy: the copy leaves them out, the guide keeps them.
        links = self._model, self.master
        try:
            return dict(super().__getstate__())
        finally:
            self._model, self.master = links


def summary_unconstrained(guide: AutoStructuredFlowGuide, args: tuple, kwargs: dict) -> dict[str, Tensor]:
    """``summary_draws`` unconstrained draws per site (model order), ``(n, numel)``, seeded on a fork of the random state."""
    unconstrained: dict = {}
    with torch.random.fork_rng(devices=rng_devices()):
        torch.manual_seed(guide.summary_seed)
        guide._draws(guide.summary_draws, args, kwargs, keep=unconstrained)
    return {name: unconstrained[name] for name in guide._sites}


def draw_joint_chain(guide: AutoStructuredFlowGuide, key: str, glob: Tensor | None, keep: dict | None) -> dict[str, Tensor]:
    """Draws the chains that share stage ``key``: one auxiliary draw, split into their sites."""
    stage = getattr(guide.stages, key)
    infos = [guide._sites[name] for name in guide._joint[key]]
    zeros = infos[0].init.new_zeros(stage.members)
    eps = pyro.sample(guide._aux(key), dist.Normal(zeros, 1.0).to_event(1), infer={"is_auxiliary": True})
    lead = tuple(eps.shape[:-1])
    u, ladj = stage(eps.reshape(math.prod(lead), stage.members, 1), glob)
    out, start = {}, 0
    for i, info in enumerate(infos):
        part = u[:, start : start + info.numel].reshape(lead + info.shape)
        start += info.numel
        out[info.name] = guide._sample_site(info, part, ladj.sum(-1) if i == 0 else None, lead, keep)
    return out
