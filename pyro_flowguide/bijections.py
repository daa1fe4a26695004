r"""Bijections to the matrix supports that ``biject_to`` leaves out.

Torch registers only ``transform_to`` for lower-Cholesky factors and
positive-definite matrices: its transforms act on a full :math:`D \times D`
matrix and ignore the entries above the diagonal, so they are not bijections,
and a guide built on them would carry :math:`D(D-1)/2` coordinates that the
model never sees (their scale grows without bound under the ELBO). The
transforms here map the :math:`D(D+1)/2` free entries, as a vector, one to one:

* :class:`LowerCholeskyVectorTransform`: the vector fills the lower triangle
  (``torch.tril_indices`` order), with the diagonal entries exponentiated;
* :class:`PositiveDefiniteVectorTransform`: that factor :math:`L`, then
  :math:`L L^\top`. Its log-Jacobian is taken with respect to the lower
  triangle of the matrix, the measure that ``Wishart.log_prob`` uses.

Importing :mod:`pyro_flowguide` registers them with ``biject_to`` for
``constraints.lower_cholesky`` and ``constraints.positive_definite`` unless
something already has, so every autoguide (``AutoNormal`` too) can place a
posterior on such sites.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import Transform


def _side(n: int) -> int:
    """The ``D`` with ``D (D + 1) / 2 == n``."""
    d = round((math.sqrt(8 * n + 1) - 1) / 2)
    if d * (d + 1) // 2 != n:
        raise ValueError(f"a vector of {n} entries is not the lower triangle of a square matrix")
    return d


@functools.lru_cache(maxsize=32)
def _tril(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, columns and diagonal mask of the lower triangle, made once (never written to)."""
    rows, cols = torch.tril_indices(d, d, device=device)
    return rows, cols, rows == cols


class LowerCholeskyVectorTransform(Transform):
    """Vector of ``D (D + 1) / 2`` reals -> lower-triangular matrix with positive diagonal."""

    domain = constraints.real_vector
    codomain = constraints.lower_cholesky
    bijective = True

    def __eq__(self, other):
        return isinstance(other, LowerCholeskyVectorTransform)

    def _call(self, x: Tensor) -> Tensor:
        d = _side(x.shape[-1])
        rows, cols, diag = _tril(d, x.device)
        out = x.new_zeros(x.shape[:-1] + (d, d))
        out[..., rows, cols] = torch.where(diag, x.exp(), x)
        return out

    def _inverse(self, y: Tensor) -> Tensor:
        rows, cols, diag = _tril(y.shape[-1], y.device)
        v = y[..., rows, cols]
        return torch.where(diag, torch.where(diag, v, 1.0).log(), v)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        _, _, diag = _tril(_side(x.shape[-1]), x.device)
        return x[..., diag].sum(-1)

    def forward_shape(self, shape):
        if len(shape) < 1:
            raise ValueError("Too few dimensions on input")
        d = _side(shape[-1])
        return torch.Size(shape[:-1]) + (d, d)

    def inverse_shape(self, shape):
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ValueError(f"expected square matrices, got shape {tuple(shape)}")
        d = shape[-1]
        return torch.Size(shape[:-2]) + (d * (d + 1) // 2,)


class PositiveDefiniteVectorTransform(LowerCholeskyVectorTransform):
    """Vector of ``D (D + 1) / 2`` reals -> positive-definite matrix ``L L^T``."""

    codomain = constraints.positive_definite

    def __eq__(self, other):
        return isinstance(other, PositiveDefiniteVectorTransform)

    def _call(self, x: Tensor) -> Tensor:
        tril = super()._call(x)
        return tril @ tril.mT

    def _inverse(self, y: Tensor) -> Tensor:
        return super()._inverse(torch.linalg.cholesky(y))

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # L -> L L^T on the lower triangles has Jacobian 2^D prod_k L_kk^(D - k)
        # (k from 0); the exponentiated diagonal adds one more log L_kk each.
        d = _side(x.shape[-1])
        _, _, diag = _tril(d, x.device)
        weights = torch.arange(d + 1, 1, -1, dtype=x.dtype, device=x.device)
        return d * math.log(2.0) + (x[..., diag] * weights).sum(-1)


def _register(constraint, factory) -> None:
    try:
        biject_to(constraint)
    except NotImplementedError:
        biject_to.register(type(constraint), factory)


_register(constraints.lower_cholesky, lambda constraint: LowerCholeskyVectorTransform())
_register(constraints.positive_definite, lambda constraint: PositiveDefiniteVectorTransform())
