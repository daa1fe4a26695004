"""Which posterior :class:`~pyro_flowguide.AutoFlowGuide` builds: its full flow, or the structured one.

``structure="auto"`` (the default) gives a model with at least
:data:`STRUCTURED_MIN_DIM` unconstrained latent coordinates the posterior of
:class:`~pyro_flowguide.AutoStructuredFlowGuide`, whose parameters and cost
per step grow linearly with the latents, unless one of the full flow's own
options (:data:`FULL_FLOW_OPTIONS`) was given; ``"full"`` always builds the
full flow, ``"sites"`` always the structured posterior. The guide then routes
its calls (draws, summaries, ``forward``) to that posterior, held as
:attr:`StructureDispatch.structured`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .contract import checked_num_samples
from .sites import GuideSetupError

__all__ = ["FULL_FLOW_OPTIONS", "STRUCTURED_MIN_DIM", "STRUCTURES", "StructureDispatch", "check_structure"]

#: The values of ``AutoFlowGuide(structure=...)``.
STRUCTURES = ("auto", "full", "sites")

#: The latent size from which ``structure="auto"`` builds the structured posterior.
STRUCTURED_MIN_DIM = 100

#: Options that configure the full flow only; giving one makes ``structure="auto"`` build it.
FULL_FLOW_OPTIONS = ("flow", "covariance", "hidden_features", "transforms", "estimator", "noncentered", "network_scale")


def check_structure(structure: Any, given: Sequence[str]) -> None:
    """Checks ``structure`` against the full-flow options ``given`` (their names)."""
    if structure not in STRUCTURES:
        raise ValueError(
            f"structure must be 'auto', 'full' (one flow over every latent) or 'sites' (the structured "
            f"posterior of AutoStructuredFlowGuide), got {structure!r}"
        )
    if structure == "sites" and given:
        raise ValueError(
            f"option(s) {', '.join(sorted(given))} configure the full flow, which structure='sites' does "
            "not build. Drop them, or use AutoStructuredFlowGuide(model, hidden=..., global_flow=...) "
            "to configure the structured posterior."
        )


class StructureDispatch:
    """Routes :class:`~pyro_flowguide.AutoFlowGuide`'s calls to its structured posterior when it has one.

    Reads the guide's ``_structure``, ``_full_options_given``, ``_init_loc_fn_arg``,
    ``_init_scale_given`` and ``_bare_model``.
    """

    @property
    def structured(self):
        """The :class:`~pyro_flowguide.AutoStructuredFlowGuide` this guide uses (after set-up), or ``None``."""
        return self._modules.get("structured_posterior")

    def _wants_structured(self, dim: int) -> bool:
        if self._structure == "auto":
            return not self._full_options_given and dim >= STRUCTURED_MIN_DIM
        return self._structure == "sites"

    def _setup_structured(self, args: tuple, kwargs: dict) -> None:
        from .structured import AutoStructuredFlowGuide  # it builds AutoFlowGuides itself

        scale = self._init_scale if self._init_scale_given else None
        inner = AutoStructuredFlowGuide(self._bare_model[0], init_loc_fn=self._init_loc_fn_arg[0], init_scale=scale)
        self.structured_posterior = inner  # a child first: its parameters are named under this guide
        try:
            with self._pyro_context:  # names are defined within a call of the guide
                inner._setup_prototype(*args, **kwargs)
        except GuideSetupError as e:
            del self._modules["structured_posterior"]
            self.prototype_trace = None  # the next call sets up again and says the same
            if self._structure != "auto":
                raise
            raise GuideSetupError(
                f"{e} (AutoFlowGuide builds the structured posterior for {self.latent_dim} latent "
                f"coordinates; AutoFlowGuide(model, structure='full') builds one flow over all of "
                "them instead, at a cost that grows with the square of their number.)"
            ) from None
        self.estimator = "reparam"
        self.noncentered_sites = ()
        self._setup_call = ((), {})

    def _check_prototype(self, part_trace) -> None:
        """Called by :attr:`structured` on its set-up (this guide is its master, as an ``AutoGuideList`` is)."""

    def _set_up(self, args: tuple, kwargs: dict):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        inner = self.structured
        if inner is not None:
            if inner.master is None or inner.master() is not self:  # pickling drops the link, on the live guide too
                inner._update_master(weakref.ref(self))
            self._create_plates(*args, **kwargs)  # the structured posterior uses its master's plates
        return inner

    def _no_flat_posterior(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{what}: the AutoFlowGuide of model {self._model_name!r} uses the structured posterior for its "
            f"{self.latent_dim} latent coordinates (structure='auto' picks it from {STRUCTURED_MIN_DIM}); "
            "it has no single flow over the flat latent. Build AutoFlowGuide(model, structure='full') "
            "for get_posterior, get_transform and NeuTraReparam."
        )

    # ------------------------------------------------------------ routing
    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        inner = self._set_up(args, kwargs)
        return super().forward(*args, **kwargs) if inner is None else inner(*args, **kwargs)

    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draws ``num_samples`` posterior samples of every latent site, ``(num_samples,) + site shape``."""
        num_samples = checked_num_samples(num_samples, self)
        inner = self._set_up(args, kwargs)
        if inner is None:
            return super().sample_posterior(num_samples, *args, **kwargs)
        return inner.sample_posterior(num_samples, *args, **kwargs)

    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior quantiles of each latent site, ``(len(quantiles),) + site shape``, the same on every call."""
        inner = self._set_up(args, kwargs)
        return super().quantiles(quantiles, *args, **kwargs) if inner is None else inner.quantiles(quantiles, *args, **kwargs)

    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The posterior median of each latent site: ``quantiles([0.5])``."""
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        inner = self._set_up(args, kwargs)
        return super()._loc_scale(*args, **kwargs) if inner is None else inner._loc_scale(*args, **kwargs)

    def get_posterior(self, *args: Any, **kwargs: Any):
        """The full flow's posterior over the flat latent (see :class:`~pyro_flowguide.guides.full_flow.FullFlowPosterior`)."""
        if self._set_up(args, kwargs) is not None:
            raise self._no_flat_posterior("get_posterior")
        return super().get_posterior(*args, **kwargs)

    def get_transform(self, *args: Any, **kwargs: Any):
        """The full flow's map from base noise to the flat latent (what ``NeuTraReparam`` uses)."""
        if self._set_up(args, kwargs) is not None:
            raise self._no_flat_posterior("get_transform")
        return super().get_transform(*args, **kwargs)

    def get_base_dist(self):
        """The full flow's base distribution, a standard normal over the flat latent."""
        if self.structured is not None:
            raise self._no_flat_posterior("get_base_dist")
        return super().get_base_dist()

    def _packed(self) -> Tensor:
        if self.structured is not None:
            raise self._no_flat_posterior("the packed parameter and the affine stage")
        return super()._packed()

    def clear_cache(self) -> None:
        """Drops cached flow values and the graphs they hold."""
        inner = self.structured
        return super().clear_cache() if inner is None else inner.clear_cache()
