"""The non-centred coordinates of :class:`~pyro_flowguide.AutoFlowGuide`, as a mixin of its methods."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from torch import Tensor
from torch.distributions import Transform, biject_to, constraints

from .noncentered import auto_noncentered_sites, normal_of, run_noncentered
from .posterior import RemembersLogDet
from .sites import GuideSetupError

__all__ = ["CentringTransform", "NoncenteredMixin"]


class CentringTransform(RemembersLogDet, Transform):
    r"""The map from the flow's flat coordinates to the model's flat unconstrained latent.

    Non-centred sites go from :math:`v` to :math:`z = m + s\,v`, with the
    model's own :math:`m, s` from one run of the model; the other coordinates
    are unchanged. ``centring(x, inverse)`` is the owning guide's map, returning
    the values and :math:`\sum \log s`; the last call's log-determinant is kept.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, centring: Callable[[Tensor, bool], tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.centring = centring

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.centring(x, False)

    def _call(self, x: Tensor) -> Tensor:
        y, ladj = self.call_and_ladj(x)
        self.remember(x, y, ladj)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, ladj = self.centring(y, True)
        self.remember(x, y, ladj)
        return x


class NoncenteredMixin:
    """Chooses the non-centred sites, maps the guide's coordinates to the model's and runs the model.

    Mixed into :class:`~pyro_flowguide.AutoFlowGuide` (an ``AutoContinuous``),
    whose ``_noncentered_arg``, ``_bare_model``, ``_setup_call`` and
    ``noncentered_sites`` it reads.
    """

    #: The sites given to the flow in non-centred coordinates (set on set-up).
    noncentered_sites: tuple[str, ...] = ()

    def _centring_model(self) -> Callable:
        """The model that maps non-centred coordinates to sites; raises if a pickle left it behind."""
        bare = self.__dict__.get("_bare_model")
        if bare is None:
            raise GuideSetupError(
                f"this guide of model {self._model_name!r} was pickled without its model (a lambda "
                "or closure cannot be pickled), and its non-centred sites "
                f"{list(self.noncentered_sites)} need the model to map draws to sites. Save "
                "torch.save(guide.state_dict(), path) instead, and load it into a new "
                "AutoFlowGuide(model, ...) after one call guide(*args)."
            )
        return bare[0]

    def _choose_noncentered(self, args: tuple, kwargs: dict) -> tuple[str, ...]:
        choice = self._noncentered_arg
        if choice is False:
            return ()
        if choice == "auto":
            return auto_noncentered_sites(self.model, self.prototype_trace, args, kwargs)
        latent = dict(self.prototype_trace.iter_stochastic_nodes())
        for name in choice:
            if name not in latent:
                raise GuideSetupError(
                    f"noncentered names site {name!r}, which is not a latent site of model "
                    f"{self._model_name!r}; its latent sites are {sorted(latent)}."
                )
            if normal_of(latent[name]["fn"]) is None:
                raise GuideSetupError(
                    f"noncentered names site {name!r}, a {type(latent[name]['fn']).__name__}; "
                    "only Normal sites (possibly .to_event / .mask) have non-centred "
                    "coordinates. Leave it out of the list."
                )
        return tuple(name for name in latent if name in choice)

    def _check_noncentered(self, init: Tensor, args: tuple, kwargs: dict) -> None:
        # The guide's density is right only if the model's location and scale are
        # functions of this guide's latents: a latent hidden from the guide (a
        # blocked site, another guide's site) would be drawn from its prior here.
        runs = []
        for seed in (0, 1):
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                runs.append(self._centered_latent(init, args, kwargs))
        if not torch.equal(runs[0], runs[1]):
            message = (
                f"model {self._model_name!r}: the location or scale of the non-centred "
                f"sites {list(self.noncentered_sites)} changed between two runs of the model "
                "at the same latent values, so they depend on randomness this guide does "
                "not see (a blocked site, or another guide's site)."
            )
            if self._noncentered_arg == "auto":
                warnings.warn(
                    message + " Keeping every site centred; pass noncentered=False to say so.",
                    stacklevel=4,
                )
                self.noncentered_sites = ()
                return
            raise GuideSetupError(message + " Pass noncentered=False.")

    def _centered_latent(self, latent: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """Maps the guide's coordinates ``(D,)`` or ``(N, D)`` to the flat unconstrained latent."""
        if not self.noncentered_sites:
            return latent
        return self._centring(latent, args, kwargs)[0]

    def _centring(self, latent: Tensor, args: tuple, kwargs: dict, inverse: bool = False) -> tuple[Tensor, Tensor]:
        r"""Flat non-centred coordinates ``(..., D)`` to the flat unconstrained latent (``inverse``: back).

        Returns the mapped values and :math:`\log|\det \partial z / \partial v|
        = \sum \log s` over the non-centred sites' elements, of shape ``(...)``.
        """
        if not (args or kwargs):
            args, kwargs = self._setup_call
        if latent.dim() <= 2:
            flat = latent
        else:
            flat = latent.reshape(-1, latent.shape[-1])
        try:
            out, ladj = self._centring_rows(flat, args, kwargs, inverse)
        except (ValueError, RuntimeError):
            if flat.dim() == 1:
                raise
            # A model that does not broadcast over a batch of draws: one run per draw.
            rows = [self._centring_rows(row, args, kwargs, inverse) for row in flat]
            out, ladj = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        return out.reshape(latent.shape), ladj.reshape(latent.shape[:-1])

    def _unpack_batch(self, latent: Tensor):
        """``_unpack_latent`` of ``(D,)`` or ``(N, D)``, a batch going left of every plate."""
        # Unpacking broadcasts batch dims against plate dims, so the batch goes
        # to the left of every plate, as a particle plate would put it.
        if latent.dim() > 1:
            nesting = max((-f.dim for f in self._prototype_frames.values()), default=0)
            latent = latent.reshape(latent.shape[:1] + (1,) * nesting + latent.shape[-1:])
        return self._unpack_latent(latent)

    def _centring_rows(self, latent: Tensor, args: tuple, kwargs: dict, inverse: bool) -> tuple[Tensor, Tensor]:
        lead = latent.shape[:-1]
        pieces = {site["name"]: value for site, value in self._unpack_batch(latent)}
        values, log_scales = run_noncentered(
            self._centring_model(), pieces, self.noncentered_sites, args, kwargs, centred=inverse
        )
        parts = [
            (values[name] if name in self.noncentered_sites else pieces[name]).reshape(lead + (-1,))
            for name in pieces
        ]
        ladj = latent.new_zeros(lead)
        for log_scale in log_scales.values():
            ladj = ladj + log_scale.reshape(lead + (-1,)).sum(-1)
        return torch.cat(parts, dim=-1), ladj

    def _init_loc(self) -> Tensor:
        latent = super()._init_loc()
        if not self.noncentered_sites:
            return latent
        parts, pos = [], 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            size = math.prod(self._unconstrained_shapes[name])
            part = latent[pos : pos + size]
            if name in self.noncentered_sites:
                normal = normal_of(site["fn"])
                value = site["value"].detach()
                part = ((value - normal.loc.detach()) / normal.scale.detach()).expand(value.shape)
            parts.append(part.reshape(-1))
            pos += size
        return torch.cat(parts)

    def _noncentered_forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        # As AutoContinuous.forward, with the values (and, for non-centred
        # sites, the log-Jacobian -log s) from one run of the model.
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        pieces = {site["name"]: value for site, value in self._unpack_latent(latent)}
        values, log_scales = run_noncentered(self._centring_model(), pieces, self.noncentered_sites, args, kwargs)
        masked = poutine.get_mask() is False
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            value, event_dim = values[name], site["fn"].event_dim
            if masked:
                log_density = 0.0
            elif name in log_scales:
                log_density = -log_scales[name]
            else:
                log_density = biject_to(site["fn"].support).inv.log_abs_det_jacobian(value, pieces[name])
                log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(
                    name, dist.Delta(value, log_density=log_density, event_dim=event_dim)
                )
        return result
