"""The full flow's posterior: the methods of :class:`~pyro_flowguide.AutoFlowGuide` that read its flow.

:class:`FullFlowPosterior` builds the posterior over the flat latent from the
guide's flow and affine stage (views of its packed parameter), draws from it
and maps the draws to the model's sites. It reads the guide's ``packed``,
``flow``, ``_packing``, ``noncentered_sites`` and ``estimator``, which
``AutoFlowGuide._setup_prototype`` sets.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import biject_to

from ..transforms import flow_cache_clearers
from .centring import CentringTransform
from .posterior import FlowChain, FlowPosterior, affine_stage, detached_copy, holds_affine_scale, relink

__all__ = ["FullFlowPosterior"]


def _clear_caches(flow: nn.Module) -> None:
    """:func:`~pyro_flowguide.transforms.clear_flow_caches` of the guide's flow, its clearers collected once."""
    clears = flow.__dict__.get("_flow_cache_clearers")
    if clears is None:  # walking the module tree costs more than the flow's step
        clears = flow.__dict__["_flow_cache_clearers"] = flow_cache_clearers(flow)
    for clear in clears:
        clear()


def _parts_of(flow: nn.Module) -> list:
    """The flow's transforms as a list (a ``ModuleList`` of them, or one transform)."""
    if isinstance(flow, nn.ModuleList):
        return list(flow)
    return [flow]


class FullFlowPosterior:
    """The posterior over the flat latent of :class:`~pyro_flowguide.AutoFlowGuide`'s full flow, as a mixin."""

    #: Whether the affine stage's factor is read with its rows at 1/sqrt(fan-in) (a guide pickled before there was a choice: no).
    _factor_scaled = False

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._check_shapes(args, kwargs)
        if not self.noncentered_sites:
            return super().forward(*args, **kwargs)
        return self._noncentered_forward(*args, **kwargs)

    # ------------------------------------------------------------- posterior
    def get_base_dist(self) -> dist.Distribution:
        flat = self._parameters["packed"]
        key = (self.latent_dim, flat.dtype, flat.device)
        cached = self.__dict__.get("_base_dist")
        if cached is None or cached[0] != key:
            # Built once per dtype and device: it holds no parameters.
            zeros = torch.zeros(self.latent_dim, dtype=flat.dtype, device=flat.device)
            cached = self.__dict__["_base_dist"] = (key, dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
        return cached[1]

    def get_transform(self, *args: Any, **kwargs: Any) -> FlowChain:
        """The transform from base noise to the flat unconstrained latent of the model's sites.

        The flow, the affine stage and, with :attr:`noncentered_sites`, the map
        from their non-centred coordinates to the model's (one run of the model
        at the given arguments, or at the set-up call's), so that it serves
        Pyro's ``NeuTraReparam``. Its ``parts`` are these transforms.
        :meth:`get_posterior` is over the coordinates before that last map.
        """
        parts = self._transform_parts()
        if self.noncentered_sites:
            parts.append(CentringTransform(lambda x, inverse: self._centring(x, args, kwargs, inverse)))
        return FlowChain(parts)

    def _transform_parts(self) -> list:
        """The flow's transforms, then the affine stage: base noise to the guide's flat coordinates."""
        # Reading self.packed (and self.flow, if it kept parameters of its own)
        # inside the guide's context registers them with the param store.
        self._packed()  # a param store loaded after set-up wins, as for Pyro's own guides
        if self.__dict__.get("_without_flow"):
            return [affine_stage(self._packing.bind(self.packed), self._factor_scaled)]
        views = self._bind(self.packed, self._modules["flow"])
        flow = self.flow if self._flow_has_params else self._modules["flow"]
        held = self.has_learnable_flow and holds_affine_scale(views)
        return _parts_of(flow) + [affine_stage(views, self._factor_scaled, held)]

    @property
    def has_learnable_flow(self) -> bool:
        """Whether the guide's flow has parameters to train (``flow=None`` has none)."""
        return bool(self._packing.module_slots) or self._flow_has_params

    def _bind(self, flat: Tensor, flow: nn.Module) -> dict[str, Tensor]:
        # Copies with one backward pass for a training call; views otherwise.
        views = self._packing.bind_for_grad(flat, flow)
        if self._packing.module_slots:
            _clear_caches(flow)  # new parameter views: cached values belong to the old ones
        return views

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        """The posterior over the flat latent vector (event shape ``(D,)``).

        Its coordinates are each site's unconstrained values, non-centred
        (:math:`(z - m) / s`) for :attr:`noncentered_sites`.

        Its ``rsample_and_log_prob`` draws and scores in one pass; ``log_prob``
        of other values inverts the flow.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        detached = self._detached_parts if self.estimator == "stl" else None
        return FlowPosterior(self.get_base_dist(), self._transform_parts(), detached)

    def _detached_parts(self) -> list:
        """Copies of the transforms whose parameters share storage but carry no gradient."""
        flow = self._modules["flow"]
        packed = self._packed()
        flat = packed.detach()
        shadow = self.__dict__.get("_shadow_flow")
        if shadow is None:
            self.clear_cache()
            shadow = self.__dict__["_shadow_flow"] = detached_copy(flow, self._packing, packed)
        relink(shadow, flow)
        views = self._bind(flat, shadow)
        return _parts_of(shadow) + [affine_stage(views, self._factor_scaled)]

    # ------------------------------------------------------------ draws
    def clear_cache(self) -> None:
        """Drops cached flow values and the graphs they hold."""
        flow = self._modules.get("flow")
        if flow is not None:
            _clear_caches(flow)

    def _constrained(self, latent: Tensor) -> dict[str, Tensor]:
        """Maps a batch ``(N, D)`` of flat latents to constrained site values ``(N, *shape)``."""
        n = latent.shape[0]
        return {
            site["name"]: biject_to(site["fn"].support)(value).reshape(
                (n,) + site["value"].shape
            )
            for site, value in self._unpack_batch(latent)
        }

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draws ``num_samples`` posterior samples of every latent site, in constrained space.

        Returns a dict mapping site names to tensors of shape
        ``(num_samples,) + site shape``.
        """
        latent = self.get_posterior(*args, **kwargs).sample((num_samples,))
        self.clear_cache()
        return self._constrained(self._centered_latent(latent, args, kwargs))
