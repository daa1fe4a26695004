r"""``SplineMAF``: one autoregressive spline layer, then affine MAF layers (the guides' default family)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._zuko import zuko

__all__ = ["SplineMAF"]


class SplineMAF(zuko.flows.Flow):
    r"""One autoregressive spline layer, then affine MAF layers (the guides' default).

    Zuko's normalising map (data to base) is one NSF transform (monotonic
    rational-quadratic splines on :math:`[-5, 5]` with ``bins`` bins, identity
    outside) followed by ``transforms`` MAF transforms, as Zuko's ``NSF`` and
    ``MAF`` build them: the spline and the first MAF transform take the
    features in their natural order and the MAF transforms alternate it. As a
    guide (``direction="sample"``) the draws therefore pass the spline first:
    it can split the base noise into modes in one pass, which affine layers
    alone can only approximate, and the MAF layers then shear and scale what
    it made.

    Arguments:
        features: The number of features.
        context: The number of context features.
        transforms: The number of affine MAF transforms after the spline.
        bins: The number of spline bins.
        randperm: Random feature orders instead of natural and alternated ones.
        kwargs: Passed to every layer (``hidden_features``, ``activation``, ...).

    Example:
        >>> flow = SplineMAF(2, transforms=1, hidden_features=(8,))
        >>> flow().sample((3,)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        transforms: int = 3,
        bins: int = 8,
        randperm: bool = False,
        **kwargs: Any,
    ) -> None:
        layer = zuko.flows.MaskedAutoregressiveTransform
        ordered = torch.arange(features)

        def order(i: int) -> torch.Tensor:
            return torch.randperm(features) if randperm else (ordered if i % 2 == 0 else ordered.flip(0))

        # Built in the order Zuko's MAF and NSF would build them (the MAF part
        # first), so a seed gives the same initial weights.
        affine = [layer(features, context, order=order(i), **kwargs) for i in range(transforms)]
        spline = layer(
            features,
            context,
            order=order(0),
            univariate=functools.partial(zuko.transforms.MonotonicRQSTransform, slope=1e-3),
            shapes=[(bins,), (bins,), (bins - 1,)],
            **kwargs,
        )
        base = zuko.flows.UnconditionalDistribution(
            zuko.distributions.DiagNormal,
            loc=torch.zeros(features),
            scale=torch.ones(features),
            buffer=True,
        )
        super().__init__([spline, *affine], base)
