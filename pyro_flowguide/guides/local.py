"""The amortized guide's local pieces: the encoder MLP, the per-site layer and posterior, and the set-up checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import sum_rightmost
from torch import Tensor, nn
from torch.distributions import biject_to

from ..flows.registry import resolve_flow
from ..transforms import flow_transform
from .sites import GuideSetupError, bijection

__all__ = [
    "LocalLayer",
    "LocalPosterior",
    "MLP",
    "build_layer",
    "check_amortized_sites",
    "check_context",
    "check_contexts",
    "check_list_plates",
    "check_plate_members",
    "draw_plates",
    "enter_plates",
    "init_unconstrained",
    "local_frames",
    "make_encoder",
    "read_plates",
    "subsample_indices",
]


def subsample_indices(size: int, subsample_size: int | None, device=None) -> Tensor | None:
    r"""A uniformly random subset of ``subsample_size`` distinct indices of ``range(size)``.

    The same distribution as Pyro's plate subsampling, at O(B log B) instead of
    O(N) when ``B (B - 1) / 2 <= N``: draw B indices with ``torch.randint`` and
    redraw if any repeats (at most :math:`e` tries on average). Smaller
    populations use ``torch.randperm``. Returns ``None`` for the full range.

    Example:
        >>> idx = subsample_indices(10**6, 256)
        >>> idx.shape, idx.unique().numel()
        (torch.Size([256]), 256)
    """
    if subsample_size is None or subsample_size >= size:
        return None
    if subsample_size * (subsample_size - 1) <= 2 * size:
        while True:
            idx = torch.randint(size, (subsample_size,), device=device)
            if subsample_size < 2 or not bool((idx.sort().values.diff() == 0).any()):
                return idx
    return torch.randperm(size, device=device)[:subsample_size]


class MLP(nn.Sequential):
    """The default encoder: linear layers with ELU activations."""

    def __init__(self, in_features: int, hidden: Sequence[int]) -> None:
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ELU()]
            in_features = width
        super().__init__(*layers)


class LocalPosterior(dist.TorchDistribution):
    r"""q(z_i | context) for every datum of a subsample, as one Pyro distribution.

    ``batch_shape`` is the site's: the subsample size at each of its plates'
    dims (1 between them), ``event_shape`` the site's. The data of all the
    site's plates are one flat batch of rows here (the rows of the layer's
    context, in the same order). A draw and its log-density come from one
    pass; scoring one's own draw reuses it, any other value is inverted.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self,
        layer: LocalLayer,
        flow_t: Any,
        loc: Tensor,
        scale: Tensor,
        batch_shape: torch.Size,
        event_shape: torch.Size,
    ) -> None:
        self.layer = layer
        self.flow_t = flow_t
        self.loc = loc
        self.scale = scale
        self._last: tuple[Tensor, Tensor] | None = None
        super().__init__(batch_shape, event_shape, validate_args=False)

    @property
    def support(self):
        return self.layer.support

    def expand(self, batch_shape, _instance=None):
        return LocalPosterior(
            self.layer, self.flow_t, self.loc, self.scale, torch.Size(batch_shape), self.event_shape
        )

    def _lead(self, shape: torch.Size) -> torch.Size:
        # Everything left of the outermost local plate's dim: sample shape and particle plates.
        return shape[: len(shape) - self.layer.plate_nesting]

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        layer = self.layer
        shape = torch.Size(sample_shape) + self.batch_shape
        region = shape[len(shape) - layer.plate_nesting :]
        rows = (math.prod(region), layer.dim)
        eps = torch.randn(self._lead(shape) + rows, dtype=self.loc.dtype, device=self.loc.device)
        log_q = -0.5 * eps.pow(2).sum(-1) - 0.5 * layer.dim * math.log(2 * math.pi)
        if self.flow_t is not None:
            y, ladj = self.flow_t.call_and_ladj(eps)
            log_q = log_q - ladj
        else:
            y = eps
        u = self.loc + self.scale * y
        log_q = log_q - self.scale.log().sum(-1)
        value, ladj = layer.to_site(u, region)
        log_q = log_q - ladj
        log_q = log_q.reshape(log_q.shape[:-1] + region)
        self._last = (value, log_q)
        return value

    def log_prob(self, value: Tensor) -> Tensor:
        last = self._last
        if last is not None and last[0] is value:
            return last[1]
        layer = self.layer
        u, ladj_site, region = layer.from_site(value)
        y = (u - self.loc) / self.scale
        log_q = -ladj_site - self.scale.log().sum(-1)
        if self.flow_t is not None:
            eps = self.flow_t.inv(y)
            log_q = log_q - self.flow_t.log_abs_det_jacobian(eps, y)
        else:
            eps = y
        log_q = log_q - 0.5 * eps.pow(2).sum(-1) - 0.5 * layer.dim * math.log(2 * math.pi)
        return log_q.reshape(log_q.shape[:-1] + region)


class LocalLayer(nn.Module):
    """Encoder, affine heads and conditional flow of one amortized site.

    ``plate_dim`` is the dim of the site's outermost plate: every batch dim
    from there to the right holds the site's data (one row each, flattened).
    """

    def __init__(
        self,
        site: dict,
        plate_dim: int,
        encoder: nn.Module,
        features: int,
        context_loc: Tensor,
        context_scale: Tensor,
        global_dim: int,
        init_loc: Tensor,
        init_scale: float,
        flow: Any,
        hyper: dict,
        global_head: int | None = None,
    ) -> None:
        super().__init__()
        fn = site["fn"]
        self.site_name = site["name"]
        self.support = fn.support
        self.event_dim = fn.event_dim
        self.event_shape = fn.event_shape
        self.plate_nesting = -plate_dim
        self.transform = biject_to(fn.support)
        self.unconstrained_event_shape = self.transform.inv.forward_shape(fn.event_shape)
        self.dim = max(1, math.prod(self.unconstrained_event_shape))
        self.features = features
        self.global_dim = global_dim
        self.encoder = encoder
        # Networks see unit-scale inputs: each context column is standardised with
        # the mean and sd of the rows seen at set-up (kept in the state dict).
        self.register_buffer("context_loc", context_loc)
        self.register_buffer("context_scale", context_scale)
        width = features + global_dim
        # Zero weights: at the start every datum gets the init loc and scale,
        # while gradients still reach the weights (and the encoder) at once.
        last = nn.Linear(width if global_head is None else global_head, 2 * self.dim)
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias[: self.dim] = init_loc
            last.bias[self.dim :] = math.log(math.expm1(init_scale))
        if global_head is None:
            self.head = last
        else:
            # With globals, loc and scale are nonlinear in them (a random effect's sd
            # is a sigmoid-like function of the log population scale).
            self.head = nn.Sequential(nn.Linear(width, global_head), nn.ELU(), last)
        if flow is None:
            self.flow = None
        else:
            hyper = dict(hyper)
            if resolve_flow(flow).takes_hyper:
                hyper.setdefault("hidden_features", (max(64, 4 * self.dim),) * 2)
            self.flow = flow_transform(flow, self.dim, context=width, direction="sample", identity_init=True, **hyper)

    def to_site(self, u: Tensor, region: torch.Size) -> tuple[Tensor, Tensor]:
        """Flat unconstrained ``(..., B, D)`` to the site's value and the log-Jacobian per datum.

        ``region``: the site's batch shape from its outermost plate's dim on
        (its ``B`` rows, with the size of each plate at that plate's dim).
        """
        lead = u.shape[:-1]
        uc = u.reshape(lead[:-1] + region + self.unconstrained_event_shape)
        value = self.transform(uc)
        ladj = self.transform.log_abs_det_jacobian(uc, value)
        ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + self.event_dim)
        return value, ladj.reshape(lead)

    def from_site(self, value: Tensor) -> tuple[Tensor, Tensor, torch.Size]:
        """The inverse of :meth:`to_site`: flat ``(..., B, D)``, the log-Jacobian per datum, and the region."""
        uc = self.transform.inv(value)
        ladj = self.transform.log_abs_det_jacobian(uc, value)
        ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + self.event_dim)
        batch = uc.shape[: uc.dim() - len(self.unconstrained_event_shape)]
        region = batch[len(batch) - self.plate_nesting :]
        lead = batch[: len(batch) - self.plate_nesting] + (math.prod(region),)
        return uc.reshape(lead + (self.dim,)), ladj.reshape(lead), region

    def posterior(self, context: Tensor, globals_: Tensor | None, batch_shape, event_shape) -> LocalPosterior:
        h = self.encoder((context - self.context_loc) / self.context_scale)
        if globals_ is not None:
            # Globals carry particle dims (P, 1, ..., 1, G) aligned with the site's batch
            # dims; drop those right of the outermost plate's dim to match the (..., B, H) layout.
            gb = globals_.shape[:-1]
            keep = gb[: len(gb) - self.plate_nesting + 1] if len(gb) >= self.plate_nesting else ()
            globals_ = globals_.reshape(keep + globals_.shape[-1:])
            lead = torch.broadcast_shapes(globals_.shape[:-1], h.shape[:-1])
            h = torch.cat([h.expand(lead + h.shape[-1:]), globals_.expand(lead + globals_.shape[-1:])], -1)
        loc, raw = self.head(h).split(self.dim, -1)
        scale = F.softplus(raw)
        flow_t = None if self.flow is None else self.flow.condition(h)
        return LocalPosterior(self, flow_t, loc, scale, batch_shape, event_shape)


def check_amortized_sites(sites: dict, context_fns: Mapping, model_name: str) -> None:
    """The latent sites the amortized guide serves: every local one named, continuous, in vectorised plates."""
    latent = sorted(sites)
    for name in context_fns:
        if name not in sites:
            raise GuideSetupError(
                f"amortized names site {name!r}, which is not a latent sample site of "
                f"model {model_name!r}; latent sites: {latent}"
            )
    for name, site in sites.items():
        fn = site["fn"]
        if fn.support.is_discrete:
            raise GuideSetupError(
                f"site {name!r} of model {model_name!r} is discrete "
                f"({type(fn).__name__}); AutoAmortizedFlowGuide covers continuous latents "
                "only. Enumerate it out (@config_enumerate with TraceEnum_ELBO) or guide it "
                "separately with AutoGuideList."
            )
        bijection(site)
        for frame in site["cond_indep_stack"]:
            if not frame.vectorized:
                raise GuideSetupError(
                    f"site {name!r} is inside the sequential plate {frame.name!r}; "
                    "AutoAmortizedFlowGuide needs vectorised plates (pyro.plate used as "
                    "a context manager)."
                )
            subsampled = frame.full_size is not None and frame.full_size != frame.size
            if subsampled and name not in context_fns:
                raise GuideSetupError(
                    f"latent site {name!r} is inside plate {frame.name!r}, which is "
                    f"subsampled ({frame.size} of {frame.full_size}), but it is not in "
                    "amortized: every local latent under a subsampled plate needs a "
                    f"context function, e.g. amortized={{..., {name!r}: lambda x, "
                    "batch_size=None: x} (the rows of the data it depends on)."
                )

def local_frames(site: dict) -> tuple:
    """The vectorised plates of an amortized site, outermost dim first (a site may sit in nested plates)."""
    name = site["name"]
    frames = [f for f in site["cond_indep_stack"] if f.vectorized]
    if not frames:
        raise GuideSetupError(
            f"amortized site {name!r} is not inside any pyro.plate; an amortized latent "
            "has one value per datum, so sample it inside the data plate (and remove it "
            "from amortized if it is a global latent)."
        )
    return tuple(sorted(frames, key=lambda f: f.dim))


def _plates_text(plates: Sequence[str]) -> str:
    return f"plate {plates[0]!r}" if len(plates) == 1 else f"plates {list(plates)}"


def check_plate_members(sites: dict, context_fns: Mapping, site_plates: dict) -> None:
    """Raises if a latent site is inside an amortized site's innermost plate without being amortized.

    ``site_plates``: the plate names of each amortized site, outermost dim first.
    An outer plate (schools around classes) may also hold global latents (one
    per school): the globals' flow serves those.
    """
    # The innermost plate holds the data the amortized sites are drawn per; another
    # latent in it would need the same per-datum treatment.
    inner = {}
    for name, plates in site_plates.items():
        inner.setdefault(plates[-1], []).append(name)
    for name, site in sites.items():
        if name in context_fns:
            continue
        for frame in site["cond_indep_stack"]:
            if frame.name in inner:
                raise GuideSetupError(
                    f"latent site {name!r} is inside plate {frame.name!r}, which holds "
                    f"the amortized sites {sorted(inner[frame.name])}, "
                    f"but it is not in amortized; add it: amortized={{..., {name!r}: "
                    "<context function>}."
                )


def check_context(name: str, context: Any, plate: str, full: int) -> None:
    """Raises unless a context function returned one row per datum of the plate's full size."""
    if not torch.is_tensor(context) or context.dim() == 0:
        raise GuideSetupError(
            f"the context function of site {name!r} must return a tensor with one row per "
            f"datum of plate {plate!r} (leading dimension {full}), got "
            f"{type(context).__name__ if not torch.is_tensor(context) else 'a scalar'}"
        )
    if context.shape[0] != full:
        raise GuideSetupError(
            f"the context function of site {name!r} returned shape {tuple(context.shape)}, "
            f"but plate {plate!r} has {full} data points: its leading dimension must be the "
            "plate's full size (the guide selects the subsample's rows itself); e.g. return "
            "x, not x[idx]."
        )


def check_contexts(name: str, context: Any, plates: Sequence[str], fulls: Sequence[int]) -> None:
    """Raises unless a context function returned one row per datum: leading dims the full sizes of the site's plates."""
    if len(plates) == 1:
        return check_context(name, context, plates[0], fulls[0])
    if not torch.is_tensor(context) or tuple(context.shape[: len(fulls)]) != tuple(fulls):
        got = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
        raise GuideSetupError(
            f"the context function of site {name!r} returned {got}, but {name!r} is inside "
            f"{_plates_text(plates)} with full sizes {tuple(fulls)}: its leading dimensions must "
            "be those full sizes, one per plate in the order of the plates' dims (outermost "
            "first), e.g. return y of shape (schools, classes, features), not a subsample."
        )


def read_plates(trace, context_fns: Mapping, site_plates: dict, args: tuple, kwargs: dict) -> dict:
    """Full size, subsample size and dim of each local plate for this call, with the context checks.

    ``site_plates``: the plate names of each amortized site, outermost dim first.
    """
    info = {}
    for name, site in trace.iter_stochastic_nodes():
        if name not in context_fns:
            continue
        frames = {f.name: f for f in site["cond_indep_stack"] if f.vectorized}
        missing = [p for p in site_plates[name] if p not in frames]
        if missing or len(frames) != len(site_plates[name]):
            raise GuideSetupError(
                f"amortized site {name!r} left {_plates_text(missing or site_plates[name])} (or "
                "entered another) when the model was called with new arguments; build a new "
                "guide for this model."
            )
        fulls = []
        for plate in site_plates[name]:
            frame = frames[plate]
            full = frame.full_size if frame.full_size is not None else frame.size
            info[plate] = (full, frame.size, frame.dim)
            fulls.append(full)
        check_contexts(name, context_fns[name](*args, **kwargs), site_plates[name], fulls)
    for name in context_fns:
        if name not in trace.nodes:
            raise GuideSetupError(
                f"amortized site {name!r} disappeared when the model was called with new "
                "arguments; build a new guide for this model call."
            )
    return info


def make_encoder(encoder: Any, name: str, width: int, features: Sequence[int]) -> nn.Module:
    """The encoder of site ``name``: the one given (or given for it), else an :class:`MLP`."""
    if isinstance(encoder, Mapping):
        encoder = encoder.get(name)
    if encoder is None:
        return MLP(width, features)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module (or a dict of them), got {type(encoder).__name__}")
    return encoder

def init_unconstrained(init_loc_fn: Callable, site: dict) -> Tensor:
    """A local site's initial unconstrained value: the mean over the prototype's rows (its batch elements)."""
    value = init_loc_fn(site).detach()
    u = biject_to(site["fn"].support).inv(value)
    event = u.dim() - len(site["fn"].batch_shape)
    return u.reshape(-1, math.prod(u.shape[u.dim() - event :])).mean(0)


def build_layer(
    site: dict,
    plate_dim: int,
    context: Tensor,
    encoder: nn.Module,
    global_dim: int,
    init: Tensor,
    init_scale: float,
    flow: Any,
    hyper: dict,
    global_head: int | None,
) -> LocalLayer:
    """A site's :class:`LocalLayer`, standardising with the mean and sd of ``context`` (rows seen at set-up)."""
    encoder = encoder.to(dtype=context.dtype, device=context.device)
    c_loc = context.mean(0)
    c_scale = context.std(0) if context.shape[0] > 1 else torch.ones_like(c_loc)
    # Constant columns (e.g. all-zero pixels) keep their scale.
    c_scale = torch.where(c_scale > 1e-6, c_scale, torch.ones_like(c_scale))
    with torch.no_grad():
        out = encoder(context[:2])
    if out.dim() != 2 or out.shape[0] != context[:2].shape[0]:
        raise GuideSetupError(
            f"the encoder of site {site['name']!r} must map a context batch (B, C) to features "
            f"(B, H); given shape {tuple(context[:2].shape)} it returned {tuple(out.shape)}"
        )
    layer = LocalLayer(
        site, plate_dim, encoder, out.shape[-1], c_loc, c_scale, global_dim, init, init_scale, flow, hyper, global_head
    )
    return layer.to(dtype=context.dtype, device=context.device)


def draw_plates(plate_info: dict, global_frames: dict, device=None) -> dict:
    """One call's plates by name: each local plate with subsample indices of its own draw, then the globals' plates.

    ``plate_info``: ``(full size, subsample size, dim)`` of each local plate;
    ``global_frames``: the frames of the global sites' plates.
    """
    plates = {}
    for name, (full, size, dim) in plate_info.items():
        plates[name] = pyro.plate(name, full, subsample=subsample_indices(full, size, device=device), dim=dim)
    for name, frame in sorted(global_frames.items()):
        if name not in plates:
            full = frame.full_size or frame.size
            plates[name] = pyro.plate(name, full, subsample_size=frame.size, dim=frame.dim)
    return plates


def check_list_plates(plates: dict, plate_info: dict) -> dict:
    """An ``AutoGuideList``'s plates, after checking each local plate has this call's sizes."""
    for name, (full, size, dim) in plate_info.items():
        plate = plates[name]
        drawn = plate.size, plate.subsample_size or plate.size
        if drawn != (full, size):
            raise GuideSetupError(
                f"AutoAmortizedFlowGuide in an AutoGuideList: the list drew plate {name!r} with "
                f"{drawn[1]} of {drawn[0]} data points (the sizes of its first call), but this call "
                f"has {size} of {full}. Give the list create_plates so that it draws the plate for "
                "each call, e.g. AutoGuideList(model, create_plates=lambda *args, **kwargs: "
                f"pyro.plate({name!r}, <full size>, subsample_size=<batch size>, dim={dim})), "
                "or call it as at its first call."
            )
    return plates


def enter_plates(
    stack: ExitStack, plates: dict, names: Sequence[str], plate_info: dict, nesting: int
) -> tuple[torch.Size, list]:
    """Enters a site's plates; returns its batch shape from the outermost plate's dim on, and each plate's indices.

    An index is ``None`` where the plate is not subsampled (every row).
    """
    region = [1] * nesting
    indices = []
    for name in names:
        plate = plates[name]
        ind = stack.enter_context(plate)
        region[plate_info[name][2]] = len(ind)
        subsampled = plate.subsample_size is not None and plate.subsample_size < plate.size
        indices.append(ind if subsampled else None)
    return torch.Size(region), indices
