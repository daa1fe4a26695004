r"""``AutoFlowGuide``: a normalizing-flow posterior over every continuous latent of a model.

The guide traces the model once, maps each latent site to unconstrained space
with ``biject_to(site support)``, flattens all of them into one vector
:math:`u \in \mathbb{R}^D` and gives that vector the posterior

.. math:: u = \mu + L \, f_\theta(\varepsilon), \qquad \varepsilon \sim \mathcal{N}(0, I_D),

where :math:`f_\theta` is a flow that starts at the identity and
:math:`\mu + L\,\cdot` is a learnable affine stage (full-rank lower-triangular
:math:`L` by default). At initialisation the guide is therefore exactly a
Gaussian centred at the model's init values (``init_loc_fn``) with scale
``init_scale``, as ``AutoNormal`` / ``AutoMultivariateNormal`` start; the flow
then only has to learn what a Gaussian cannot. Lower-Cholesky and
positive-definite sites (``Wishart``, say), for which torch has no
``biject_to``, get the bijections of :mod:`pyro_flowguide._bijections`, from
their :math:`D(D+1)/2` free entries.

Why this shape (measured on the benchmark targets, ``benchmarks/posteriors.py``):

* the flow runs in *standardised* coordinates, where its splines' domain covers
  the draws and its networks see inputs of unit scale;
* the affine stage makes the guide at least as good as a full-rank Gaussian on
  near-Gaussian posteriors, where flows alone are slow to learn correlations;
* the flow is applied in its one-pass direction (``direction="sample"``), so a
  draw and its log-density come from a single network pass;
* the affine stage and the flow's networks are views of one flat parameter,
  ``packed`` (for the registry families whose code allows it,
  :attr:`~pyro_flowguide.flows.FlowSpec.packable`). Pyro runs one
  ``torch.optim`` optimiser and one ``pyro.param`` statement per tensor, and at
  these sizes those per-tensor calls cost more than the arithmetic: one
  ``ClippedAdam`` call over the 21 tensors of a 10-D guide took 2.9 ms against
  0.2 ms for one tensor of the same size (``benchmarks/step_time.py
  --optimizer-only``). Adam and element-wise clipping act on each entry alone,
  so training is bit-identical to separate tensors.

The defaults were chosen on the five targets of ``benchmarks/posteriors.py``
(protocol A: 3000 steps, 4 vectorised particles, lr 1e-2 -> 1e-3, seed 0 unless
stated; w1 is the per-coordinate Wasserstein-1 distance to the truth over its sd).
The figures below were measured while STL's score still came from inverting
the flow; the batched-backward score gives the same gradients to about 1e-6,
and a rerun of protocol A moved only by rounding and seed noise (mean w1 over
seeds 0-2: banana 0.047 -> 0.044, mixture 0.058 -> 0.051, funnel 0.054 ->
0.052, eight schools 0.054 -> 0.050, logistic regression 0.038 -> 0.040, the
last now with one autoregressive pass per coordinate, as every other target).
Taking the score through the flow alone, with the affine stage in closed form,
changed the rounding once more: banana 0.044, funnel 0.056, and the mixture
0.051 -> 0.085, whose seeds went from 0.050 / 0.047 / 0.055 to 0.026 / 0.086 /
0.143 (over seeds 0-5: 0.063 before, 0.083 after): with 4 particles and affine
layers only, how the two modes shared the mass was decided by rounding-level
differences. The default family's spline layer (below) fits both modes; their
shares of the mass still vary with the seed and with rounding. The
closed-form score (below) changed rounding again: the mixture's seeds 0-5
went from 0.030 / 0.036 / 0.026 / 0.022 / 0.033 / 0.027 to 0.037 / 0.100 /
0.021 / 0.030 / 0.055 / 0.025, so about one run in six still settles on
uneven shares under protocol A (through :func:`~pyro_flowguide.fit`, 32
particles: 0.019 / 0.034 / 0.022); eight schools went 0.046 / 0.52 -> 0.045 /
0.48 (k-hat 0.57 / 0.47 / 0.40), and the banana, the funnel and the logistic
regression did not move (0.027, 0.037, 0.041).

* **Non-centred coordinates** (``noncentered="auto"``) for Normal sites whose
  prior follows other latents and is not swamped by the data (see
  :mod:`pyro_flowguide._noncentered`): the flow sees
  :math:`(z - m) / s`, where hierarchies and funnels are near-Gaussian. On
  eight schools (centred model) the guide had reached no further than
  :math:`\log\tau \approx -1.6` at its 1% quantile, against -3.2 for NUTS,
  whatever its depth, width or loss (PSIS k-hat 0.60-0.79); non-centred,
  protocol A with plain MAF gives w1 0.053 -> 0.033 and k-hat 0.79 -> 0.35,
  and the banana and funnel become Gaussian (w1 0.044 -> 0.026, 0.056 -> 0.038). Where the
  data pin each site (eight schools with standard errors 20x smaller) the
  centred coordinates are the good ones (k-hat 0.57-0.75 against 0.88), so
  ``"auto"`` compares the prior's precision with the curvature of the rest
  of the joint at the initial values.
* **Sticking the landing** (``estimator="stl"``) is the largest gain: MAF on
  the banana 0.10-0.51 -> 0.04 (two seeds of the plain gradient disagreed that
  much), funnel 0.084 -> 0.051, mixture 0.052 -> 0.031. It needs the score
  :math:`\nabla_u \log q(u)` of each draw, which the guide gets from one
  backward pass through the flow batched over the latent's coordinates and a
  small solve, not from inverting the flow (one network pass per coordinate
  for MAF): a step costs 1.05-1.4x the plain gradient's on the five targets
  (D = 2 to 25), against 1.5-2.6x when the score came from an inverse pass
  (``benchmarks/step_time.py``). With the packed parameter (above) a MAF
  guide's step is 0.95-1.1x the hand-written Zuko MAF guide's of the same
  size. The default family's spline layer made that backward pass dearer:
  Zuko's spline runs about 200 small operations per call (2 ms against MAF's
  0.65 ms for a 2-D layer of 4 draws), and the batched backward went through
  each of them, so the default guide's step was 1.14-1.31x the hand-written
  Zuko guide's with the same flow. For Zuko's masked autoregressive layers
  (SplineMAF, MAF, NSF) the score is now written out instead
  (:mod:`pyro_flowguide._made_score`): a layer's Jacobian is its network's
  masked weights times the element-wise derivatives of the affine or spline
  map, with no pass through autograd, and it agrees with the batched
  backward to rounding (relative 1e-6 in float32 over 3000 steps of the
  mixture). The default guide's step is then 0.99-1.09x the hand-written
  guide's on the five targets (12 interleaved blocks; 0.86-1.00x with
  ``estimator="reparam"``). It is the default up to ``STL_MAX_DIM`` latents.
  On a later machine (2-core Xeon, AVX-512) the same code measured 1.08 /
  1.04 / 1.16 / 1.18 / 1.27x (banana, mixture, funnel, eight schools,
  logistic regression). Two costs outside the arithmetic made most of the
  excess: each slice of the packed parameter sent back a gradient the size
  of the whole vector (:meth:`~pyro_flowguide._packed.Packing.bind_for_grad`
  now joins them in one pass), and the model run for non-centred sites
  computed ``init_loc_fn`` for every site at every step. Without them: 1.06 /
  1.02 / 1.07 / 1.09 / 1.17x (0.87-0.94x with ``estimator="reparam"``). The
  rest, on the 25-D regression, was the score's spline derivatives and
  solves; with triangular solves and the spline layer as one autograd node
  whose gradients are those derivatives (see :mod:`pyro_flowguide._made_score`):
  0.94 / 0.91 / 0.97 / 0.99 / 1.05x (0.87-0.94x with ``"reparam"``; 1.06x
  on the regression in a second run).
* **One spline layer, then three affine MAF layers**
  (:class:`~pyro_flowguide.flows.SplineMAF`, the default family). Affine
  layers can only approximate two modes, so sticking the landing's gradient
  never vanishes on a mixture: plain MAF's mixture w1 was 0.026 / 0.086 /
  0.143 on seeds 0-2, k-hat 0.38. A monotonic spline acting on the base noise
  splits it into modes itself: 0.030 / 0.036 / 0.026 (0.022-0.033 on seeds
  3-5; with the batched-backward score, see above for the closed-form one),
  k-hat -0.01, IS-ESS 99%. In the set-up of
  ``tests/test_guide_accuracy.py`` (seeds 0-3) KL(q || p) went from
  0.031-0.062 to 0.003-0.006; each mode's share of the mass still varies with
  the seed (0.47-0.53; MAF 0.45-0.53). Elsewhere it costs little: w1 banana
  0.026 -> 0.027, funnel 0.038 -> 0.037, logistic regression 0.041 -> 0.041; the
  banana's k-hat went 0.23 -> 0.44, but its weights are flat either way
  (IS-ESS 100%, where k-hat's tail fit means nothing). Eight schools is the
  one target where it did worse: w1 0.034 -> 0.040 and k-hat 0.41 -> 0.51
  (seeds 0-5). Through :func:`~pyro_flowguide.fit` (32 particles) it did not
  (eight schools 0.033 / 0.35 -> 0.032 / 0.35; mixture 0.033 / 0.47 -> 0.028 /
  0.27; banana k-hat 0.29 -> 0.08). The spline first rather than last: mixture
  0.031 vs 0.034, banana k-hat 0.44 vs 0.56; element-wise splines instead of
  an autoregressive one left the mixture at 0.08; 4 bins or hidden (32, 32) in
  the spline made eight schools worse (k-hat 0.61, 0.60), and so did a slower
  spline (``spline_scale=0.3``: k-hat 0.61, though the mixture's w1 over
  seeds 0-2 fell from 0.053 to 0.041); 16 bins left the mixture as it was
  (0.041 over six seeds). Before the
  non-centred coordinates below, a spline layer had cost the banana its curved
  tail (0.047 -> 0.065), since the splines act on [-5, 5] only; non-centred,
  the banana reaches the flow as a Gaussian.
* **MAF's affine layers** over RealNVP's: with STL, banana 0.042 vs 0.087
  (RealNVP), and NSF alone cannot shift mass beyond its splines' [-5, 5].
  Wider (hidden 128) or deeper (4 transforms) MAFs did worse on the banana
  too (0.062 over seeds 0-2, 0.081 over 0-1).
* **Log-scale affine stage starting at ``init_scale=1``**: Adam's steps on a
  log-scale are relative, so a posterior ten times wider or narrower than the
  start is reached in a few hundred steps (banana z1 has sd 10).
* **Gaussian tails.** A Student-t base with 5 degrees of freedom made every
  target worse (banana 0.25, funnel 0.13 over seeds 0-1); with learnable
  degrees of freedom started at 30, training raised them to 30-50 (it wants
  Gaussian tails) and changed nothing measurable, at twice the step time.
* **What decides k-hat.** Under protocol A the bulk of a guide's log
  weights ends up nearly flat (standard deviation 0.005-0.04 on the banana
  and on a conjugate Gaussian), so PSIS k-hat, a scale-free fit to the
  largest weights, is decided by the few draws beyond
  :math:`|\varepsilon| \approx 4`, where hardly any training draw has
  landed and the flow's networks extrapolate. A retraining that differed
  from the default only by rounding moved the banana's k-hat from 0.59 to
  0.15 at the same w1 (0.021, seed 0), and one trained guide of the
  conjugate model gave 0.17-0.47 over four sets of 4000 draws. Bounded
  network inputs (:class:`~pyro_flowguide.flows.SplineMAF`'s
  ``input_bound``, off by default) steady the banana's tails but cost the
  mixture. Starting the affine stage at the inverse Hessian of the log joint
  at the initial point (a Laplace start, each eigen-direction's sd capped at
  ``init_scale``) was tried as well: over seeds 0-5 it left w1 where it was
  (logistic regression 0.042 vs 0.041, eight schools 0.037 vs 0.037;
  eight schools' k-hat 0.48 vs 0.56, within seed noise), and on the
  conjugate model it made the bulk near-exact, so that the tails decided
  k-hat alone (0.34-0.76 against 0.21-0.26 over three sets of draws, both
  with bounded network inputs), so the guide starts at ``init_scale``.
  Eight schools' k-hat comes from the
  posterior itself: a half-Cauchy scale's posterior density is finite at
  :math:`\tau = 0`, so :math:`\log \tau` has an exponential left tail
  (density :math:`\propto \tau`), and an exponential right tail as well;
  the weights of any guide with Gaussian tails in :math:`\log \tau` grow
  without bound there. The largest weights of a protocol-A guide sit at
  :math:`\log \tau < -3.7` and :math:`> 2.8`, and its k-hat is 0.49-0.65
  over three sets of 2000 draws, 0.61-0.76 at 20,000 and 0.62 at 200,000. A
  flow whose tails can grow faster than Gaussian ones could fix it, if the
  loss asked for them; the ELBO hardly does. An element-wise layer before the
  flow, :math:`x + a\,\mathrm{sign}(x)\,\mathrm{softplus}(|x| - 2)^2 / 2`
  (exponential tails for :math:`a > 0`), started at :math:`a = 0.007`, ended
  protocol A at :math:`a = 0.004-0.009` in every coordinate (seeds 0 and 2),
  with k-hat 0.82 and 0.62: the few training draws that reach the tails do
  not pull them open; the same layer with :math:`a` fixed at 0.1, 0.3 or
  0.6 did not lower k-hat either. On the conjugate model, training
  the affine stage alone for 1000 steps first made the bulk of the log
  weights flatter (standard deviation 0.009-0.025) but left k-hat a lottery
  of the tails (0.47 / 0.20 / 0.28 on seeds 0-2), as bounded network inputs
  did (0.27 / 0.22 / 0.41 at bound 8 over 20,000 draws). On a machine of
  another make the same code gave eight schools 0.035 / 0.055 / 0.045 and
  k-hat 0.52 / 0.43 / 0.69 on seeds
  0-2, against 0.036 / 0.053 / 0.039 and 0.48 / 0.42 / 0.61: a k-hat near
  0.5 goes either side of it with rounding.
* **No iterate averaging.** Averaging the iterates of the last third of
  training made the banana worse (0.095): the networks do not stay in one
  basin.
* **The logistic regression's last 0.001-0.002 of w1.** Its excess over the
  noise floor is location error (recentred draws score 0.025; std ratios
  0.99-1.00): the final iterate's mean jitters by about 0.03 sd at the last
  learning rate. Antithetic base draws within the particle plate (which
  cancel the part of the location gradient linear in the noise) left seeds
  0-2 at 0.037 but made seeds 3-8 worse (0.045 against 0.040); the affine
  MAF layers' output weights taking steps 0.3x or 0.1x as large gave 0.042
  and 0.048 on seeds 0-2 (0.041 as built); 16 particles instead of 4 gave
  0.034. Training the affine stage alone for the first 1000 steps (the
  flow held at the identity) did help here: 0.032 / 0.034 / 0.034 on seeds
  0-2 and 0.029 / 0.035 / 0.030 on seeds 3-5, against 0.036 / 0.042 / 0.042,
  but it cost the mixture (0.064 / 0.043 / 0.052) and eight schools (0.035 /
  0.081 / 0.055, k-hat 0.66 / 0.48 / 0.61); after 300 steps the mixture was
  still worse (0.082 / 0.037 / 0.029). Holding only the spline layer, or only
  the affine MAF layers, for those steps did not help the regression (0.041,
  0.044 over seeds 0-2); neither did detaching the MAF layers' output biases
  for good (0.044), a slower spline (``spline_scale=0.3``: 0.040) or a
  location parameterised in the affine stage's whitened coordinates. What
  would take the regression below 0.040 is such an affine-first schedule
  with a signal for when to use it that does not cost mixtures, or more
  particles.
* **More particles** are the cheapest gain left; see
  :attr:`AutoFlowGuide.default_num_particles`, the count that
  :func:`pyro_flowguide.fit` uses.
* **A mass-covering loss under** :func:`pyro_flowguide.fit` when every site is
  centred: the Rényi bound
  of order 1/2 with a doubly-reparameterised gradient
  (:meth:`AutoFlowGuide.default_loss`, :mod:`pyro_flowguide.elbo`), which
  keeps sticking the landing's zero variance at the posterior and lowers
  PSIS k-hat where the ELBO leaves the guide's tails thin.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from contextlib import ExitStack
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.distributions.util import sum_rightmost
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from pyro.distributions import constraints
from torch.distributions import Transform, biject_to

from .noncentered import auto_noncentered_sites, normal_of, run_noncentered
from .._zuko import zuko
from .packing import Packing
from ..flows.registry import FlowSpec, get_flow
from .stl import draw_and_score, made_layers
from ..transforms import FlowTransform, _param_tuple, flow_transform

__all__ = [
    "AutoFlowGuide",
    "DEFAULT_FLOW",
    "GuideSetupError",
    "STL_MAX_DIM",
]

#: The family used when ``flow`` is not given; chosen on the benchmark targets.
DEFAULT_FLOW = "SplineMAF"

#: Largest latent size for which ``estimator="auto"`` picks sticking the landing.
STL_MAX_DIM = 64


class GuideSetupError(ValueError):
    """A model that this guide cannot serve, with the site and the fix in the message."""


def _hidden_size(dim: int) -> int:
    return max(64, 4 * dim)


class _TrilAffine(Transform):
    r"""The affine stage :math:`x \mapsto \mu + L x`, ``L = diag(scale) @ unit_tril``.

    The owning guide passes its current parameters in per call, so this object
    holds none and is cheap to build each step.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, loc: Tensor, scale: Tensor, unit_tril: Tensor | None) -> None:
        super().__init__()
        self.loc = loc
        self.scale = scale
        self.unit_tril = unit_tril

    def _call(self, x: Tensor) -> Tensor:
        if self.unit_tril is not None:
            x = (self.unit_tril @ x.unsqueeze(-1)).squeeze(-1)
        return self.loc + self.scale * x

    def _inverse(self, y: Tensor) -> Tensor:
        x = (y - self.loc) / self.scale
        if self.unit_tril is not None:
            x = torch.linalg.solve_triangular(
                self.unit_tril, x.unsqueeze(-1), upper=False, unitriangular=True
            ).squeeze(-1)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.scale.log().sum(-1).expand(x.shape[:-1])

    def inverse_transpose(self, v: Tensor) -> Tensor:
        r""":math:`(\mathrm{diag}(scale)\, L)^{-\top} v`: maps a score in ``x`` to one in ``y``."""
        v = v.detach()
        if self.unit_tril is not None:
            v = torch.linalg.solve_triangular(
                self.unit_tril.detach().mT, v.unsqueeze(-1), upper=True, unitriangular=True
            ).squeeze(-1)
        return v / self.scale.detach()


def _forward_with_ladj(parts: Sequence[Transform], x: Tensor) -> tuple[Tensor, Tensor]:
    total = 0.0
    for t in parts:
        if hasattr(t, "call_and_ladj"):
            y, ladj = t.call_and_ladj(x)
        else:
            y = t(x)
            ladj = t.log_abs_det_jacobian(x, y)
        total = total + _event_sum(ladj, t)
        x = y
    return x, total


def _inverse_with_ladj(parts: Sequence[Transform], y: Tensor) -> tuple[Tensor, Tensor]:
    """Maps ``y`` back to the base space; returns ``(x, log|det J|)`` of the forward map at x."""
    total = 0.0
    for t in reversed(parts):
        x = t.inv(y)
        total = total + _event_sum(t.log_abs_det_jacobian(x, y), t)
        y = x
    return y, total


def _draw_with_score(
    parts: Sequence[Transform], base: dist.Distribution, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""A draw ``u = A(f(eps))``, its log-density and the score :math:`\nabla_u \log q(u)`.

    ``parts`` are the flow's transforms ``f`` followed by the guide's affine
    stage ``A`` (``u = loc + diag(scale) L y``); ``base`` is the standard normal.
    The score is what sticking the landing needs, and it needs no inverse pass:
    with :math:`h(\varepsilon) = \log p(\varepsilon) - \log|\det J_f(\varepsilon)|`
    and :math:`J_f = \partial y / \partial \varepsilon`, the score in ``y`` is
    :math:`J_f^{-\top} \nabla_\varepsilon h` and in ``u`` it is
    :math:`A^{-\top}` times that. :math:`\nabla_\varepsilon \log p(\varepsilon) =
    -\varepsilon`, and ``A`` is applied in closed form (a triangular solve). For
    a flow of Zuko's masked autoregressive layers (MAF, NSF, SplineMAF) the
    layers' Jacobians and log-determinant gradients are written out as well
    (:mod:`pyro_flowguide._made_score`); for any other flow ``J_f`` and
    :math:`\nabla_\varepsilon \log|\det J_f|` come from one backward pass
    through the flow's part of the draw's graph, batched over the ``D + 1``
    output directions (:func:`_draw_with_batched_score`). An autoregressive
    inverse instead takes one network pass per coordinate.
    """
    *flow, affine = parts
    layers = _made_layers(flow)
    if layers is not None:  # Zuko's masked autoregressive layers: the score in closed form
        y, ladj, score = draw_and_score(layers, eps)
        flow[0].remember(eps, y, ladj)
        return _through_affine(affine, base, eps, y, ladj, score)
    return _draw_with_batched_score(parts, base, eps)


def _draw_with_batched_score(
    parts: Sequence[Transform], base: dist.Distribution, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_draw_with_score` for any flow: ``J_f`` from autograd, batched over directions."""
    *flow, affine = parts
    eps = eps.detach().requires_grad_(True)
    y, ladj = _forward_with_ladj(flow, eps)
    d = eps.shape[-1]
    if flow:
        # Direction k < d picks y_k (row k of J_f); direction d picks ladj.
        eye = _eye(d + 1, eps)
        lead = (1,) * (eps.dim() - 1)
        grad_y = eye[:, :d].reshape((d + 1,) + lead + (d,)).expand((d + 1,) + y.shape)
        grad_l = eye[:, d].reshape((d + 1,) + lead).expand((d + 1,) + ladj.shape)
        (rows,) = torch.autograd.grad(
            (y, ladj), (eps,), (grad_y, grad_l), retain_graph=True, is_grads_batched=True
        )
        jac_t = rows[:d].movedim(0, -1)  # J_f^T: [..., i, k] = d y_k / d eps_i
        # A singular J (a collapsed scale) gives a non-finite score, hence a
        # non-finite gradient that fit's guard skips, rather than an exception.
        score = torch.linalg.solve_ex(jac_t, (-eps - rows[d]).unsqueeze(-1))[0].squeeze(-1)
    else:  # no flow: y is eps
        score = -eps.detach()
    return _through_affine(affine, base, eps, y, ladj, score)


def _through_affine(
    affine: Transform, base: dist.Distribution, eps: Tensor, y: Tensor, ladj: Tensor, score: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, log q(u), score in u)`` from the flow's ``y = f(eps)``, ``log|det J_f|`` and score in ``y``."""
    u = affine(y)
    log_q = base.log_prob(eps) - ladj - _event_sum(affine.log_abs_det_jacobian(y, u), affine)
    return u, log_q, affine.inverse_transpose(score)


def _made_layers(flow: Sequence[Transform]) -> tuple | None:
    """The layers of a flow whose score :mod:`pyro_flowguide._made_score` writes out, or None."""
    if len(flow) != 1 or type(flow[0]) is not FlowTransform or flow[0].direction != "sample":
        return None
    t = flow[0]
    hit = t.__dict__.get("_made_layers")
    if hit is None or hit[0] is not t.lazy:  # checked once per flow (and per copy of it)
        hit = t.__dict__["_made_layers"] = (t.lazy, made_layers(t.lazy))
    return hit[1]


def _event_sum(ladj: Tensor, t: Transform) -> Tensor:
    # Element-wise transforms (event_dim 0) report one term per coordinate.
    return ladj.sum(-1) if t.domain.event_dim == 0 else ladj


class _FlowPosterior(dist.TorchDistribution):
    r"""The guide's distribution over the flat unconstrained latent vector.

    A draw and its log-density come from one forward pass and the log-density
    is kept for the draw, so scoring one's own samples inverts nothing. With
    ``detached_parts`` (sticking the landing: a function that returns
    parameter-detached copies of the transforms, called only when needed) the
    log-density carries gradient only along the sampling path, whose variance
    vanishes as the guide approaches the posterior: for its own draws through
    the score :math:`\nabla_u \log q(u)` (see :func:`_draw_with_score`), for
    any other value through an inverse pass of the detached copies.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        base: dist.Distribution,
        parts: Sequence[Transform],
        detached_parts: Callable[[], Sequence[Transform]] | None = None,
        batch_shape: torch.Size = torch.Size(),
    ) -> None:
        self.base = base
        self.parts = list(parts)
        self.detached_parts = detached_parts
        self._last: tuple[Tensor, Tensor, Tensor | None] | None = None
        super().__init__(batch_shape, base.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _FlowPosterior(self.base, self.parts, self.detached_parts, torch.Size(batch_shape))

    def rsample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[Tensor, Tensor]:
        eps = self.base.rsample(torch.Size(sample_shape) + self.batch_shape)
        if self.detached_parts is not None and torch.is_grad_enabled():
            u, log_q, score = _draw_with_score(self.parts, self.base, eps)
        else:
            u, ladj = _forward_with_ladj(self.parts, eps)
            log_q, score = self.base.log_prob(eps) - ladj, None
        self._last = (u, log_q, score)
        return u, log_q

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def log_prob(self, value: Tensor) -> Tensor:
        last = self._last
        if last is not None and last[0] is value:
            u, log_q, score = last
            if score is None:
                return log_q
            # The value of log q(u); the gradient of log q with its parameters
            # held fixed, taken along the path u(theta) only.
            return log_q.detach() + ((u - u.detach()) * score).sum(-1)
        parts = self.parts if self.detached_parts is None else self.detached_parts()
        eps, ladj = _inverse_with_ladj(parts, value)
        return self.base.log_prob(eps) - ladj


def _unit_tril(raw: Tensor) -> Tensor:
    # What transform_to(constraints.unit_lower_cholesky) computes.
    return raw.tril(-1) + _eye(raw.shape[-1], raw)


@functools.lru_cache(maxsize=32)
def _eye_of(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=dtype, device=device)


def _eye(n: int, like: Tensor) -> Tensor:
    """An identity matrix of ``like``'s dtype and device, made once (never written to)."""
    return _eye_of(n, like.dtype, like.device)


def _affine_stage(views: dict[str, Tensor]) -> _TrilAffine:
    raw = views.get("scale_tril")
    return _TrilAffine(views["loc"], views["log_scale"].exp(), None if raw is None else _unit_tril(raw))


def _is_pyro_transform_factory(flow: Any) -> bool:
    return callable(flow) and not isinstance(flow, (str, type, nn.Module))


class AutoFlowGuide(AutoContinuous):
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
        init_scale: Initial standard deviation of each unconstrained coordinate.
        covariance: ``"full"`` (lower-triangular affine stage) or ``"diagonal"``.
            Default: full when the latent dimension is at most 200.
        hidden_features: Hidden layer sizes of the flow's networks; default
            ``(H, H)`` with ``H = max(64, 4 D)``.
        transforms: Number of flow layers (registry families only).
        estimator: ``"stl"`` ("sticking the landing": a draw's log-density
            is differentiated along the sampling path only, with the flow's
            parameters held fixed, so the gradient's variance vanishes as the
            guide approaches the posterior; works with every flow, inverse or
            not; the draw's score is written out for Zuko's masked
            autoregressive families and costs one extra backward pass batched
            over the latent's coordinates for the others; with spline layers
            the draws are differentiable once, as every ELBO needs),
            ``"reparam"`` (the plain reparameterisation
            gradient), or ``"auto"`` (the default): STL for the families it was
            measured to help (registry families SplineMAF, MAF, NSF, NICE,
            RealNVP, or no flow) when the latent has at most ``STL_MAX_DIM``
            coordinates, the plain gradient otherwise.
        noncentered: Latent Normal sites that the flow sees in non-centred
            coordinates :math:`v = (z - m) / s`, with the model's own location
            :math:`m` and scale :math:`s` evaluated at the parents just drawn
            (see :mod:`pyro_flowguide._noncentered`). ``"auto"`` (the default)
            or ``True``: every latent Normal site whose location or scale
            depends on another latent site (hierarchies, funnels); ``False``:
            none; or a list of site names. The sites chosen are in
            :attr:`noncentered_sites` once the guide is set up. The model is
            run once per guide call to evaluate :math:`m` and :math:`s`.
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
        init_scale: float = 1.0,
        covariance: str | None = None,
        hidden_features: Sequence[int] | None = None,
        transforms: int | None = None,
        estimator: str = "auto",
        noncentered: bool | str | Sequence[str] = "auto",
        **hyper: Any,
    ) -> None:
        if isinstance(noncentered, str) and noncentered != "auto":
            raise ValueError(
                f"noncentered must be 'auto', True, False or a list of site names, got {noncentered!r}"
            )
        if noncentered is True:
            noncentered = "auto"
        self._noncentered_arg = noncentered if isinstance(noncentered, (bool, str)) else tuple(noncentered)
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if estimator not in ("auto", "reparam", "stl"):
            raise ValueError(
                f"estimator must be 'auto', 'reparam' (plain reparameterisation gradient) "
                f"or 'stl' (sticking the landing), got {estimator!r}"
            )
        self.estimator = estimator  # "auto" is resolved once the latent size is known
        if covariance not in (None, "full", "diagonal"):
            raise ValueError(f"covariance must be 'full' or 'diagonal', got {covariance!r}")
        if isinstance(flow, str):
            spec = get_flow(flow)  # unknown names fail here, before any tracing
            if spec.support != "real":
                self._refused_support = spec
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
        super().__init__(model, init_loc_fn=_with_feasible_fallback(init_loc_fn))
        # Pyro's self.model runs the model under init_loc_fn's InitMessenger,
        # which computes an initial value for every site it meets (init_to_median
        # draws 15 prior samples per site). The model that maps non-centred
        # draws to sites gets every value from the guide, so it runs bare.
        self._bare_model = (model,)

    _refused_support = None
    #: The sites given to the flow in non-centred coordinates (set on set-up).
    noncentered_sites: tuple[str, ...] = ()
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
            AutoGuide._setup_prototype(self, *args, **kwargs)
        except NotImplementedError as e:
            raise GuideSetupError(
                f"model {self._model_name!r}: {e}. AutoFlowGuide needs vectorised "
                "plates (pyro.plate with a dim, used as a context manager)."
            ) from None
        self._check_sites(args, kwargs)
        # AutoContinuous's part: the flat unconstrained layout.
        self._unconstrained_shapes = {}
        self._cond_indep_stacks = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            self._unconstrained_shapes[name] = (
                biject_to(site["fn"].support).inv(site["value"]).shape
            )
            self._cond_indep_stacks[name] = site["cond_indep_stack"]
        self.latent_dim = sum(math.prod(shape) for shape in self._unconstrained_shapes.values())
        if self.latent_dim == 0:
            raise GuideSetupError(
                f"model {self._model_name!r} has no latent sample sites: every "
                "pyro.sample is observed, so there is no posterior to fit. "
                "Use an empty guide instead."
            )
        self._arg_shapes = _shapes_of(args, kwargs)
        self.noncentered_sites = self._choose_noncentered(args, kwargs)
        # Non-centred sites need the model's arguments to map draws to sites;
        # summaries called without them use these.
        self._setup_call = (args, kwargs) if self.noncentered_sites else ((), {})
        init = self._init_loc()
        if self.noncentered_sites:
            self._check_noncentered(init, args, kwargs)
        dtype, device = init.dtype, init.device
        dim = self.latent_dim

        # The affine stage, unconstrained. Scales are learned on the log scale:
        # Adam's steps are then relative, so a posterior 100x wider or narrower
        # than init_scale is reached quickly. L's strictly lower triangle is
        # that of the matrix.
        named = [
            ("loc", init),
            ("log_scale", torch.full((dim,), math.log(self._init_scale), dtype=dtype, device=device)),
        ]
        full = self._covariance == "full" or (self._covariance is None and dim <= 200)
        if full and dim > 1:
            named.append(("scale_tril", torch.eye(dim, dtype=dtype, device=device)))
        if self.estimator == "auto":
            # The STL score costs a D x D solve per draw and layer (and, for
            # flows other than Zuko's masked autoregressive ones, a backward
            # pass batched over the latent's coordinates), so it is worth it
            # only while the latent is small.
            stl = _stl_by_default(self._flow_arg[0]) and dim <= STL_MAX_DIM
            self.estimator = "stl" if stl else "reparam"
        flow = self._build_flow(dim).to(dtype=dtype, device=device)
        # One flat parameter for the affine stage and (where the family allows
        # it) the flow: a step then costs one optimiser call and one param
        # statement instead of one per tensor (see pyro_flowguide._packed).
        self._packing = Packing(named, flow if _packable(self._flow_arg[0]) else None)
        self._flow_has_params = any(True for _ in flow.parameters())
        self.flow = flow
        self.packed = nn.Parameter(self._packing.initial)

    def _check_sites(self, args: tuple, kwargs: dict) -> None:
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            if not fn.support.is_discrete:
                _bijection(site)
            if fn.support.is_discrete:
                raise GuideSetupError(
                    f"site {name!r} of model {self._model_name!r} is discrete "
                    f"({type(fn).__name__}); AutoFlowGuide covers continuous latents only. "
                    "Enumerate it out (@config_enumerate with TraceEnum_ELBO) or use "
                    "AutoGuideList with AutoFlowGuide on poutine.block(model, hide=[...]) "
                    "and a discrete guide such as AutoDiscreteParallel for this site."
                )
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise GuideSetupError(
                        f"site {name!r} is inside plate {frame.name!r}, which is "
                        f"subsampled ({frame.size} of {frame.full_size}); a global flow "
                        "cannot follow a changing subset of local latents. Use "
                        f"AutoAmortizedFlowGuide(model, amortized={{{name!r}: ...}}) for "
                        "local latents, or do not subsample."
                    )
            if self._refused_support is not None:
                raise GuideSetupError(
                    f"flow {self._refused_support.name!r} models circular features in "
                    f"[-pi, pi), but site {name!r} (support {fn.support}) is mapped to "
                    "unbounded unconstrained space by this guide; use 'NSF' instead."
                )
        # A non-finite log density at the initial values makes every gradient NaN.
        # The prototype trace hides observed sites, so trace the model once more.
        with torch.no_grad():
            trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            with torch.no_grad():
                lp = site["fn"].log_prob(site["value"])
            if not torch.isfinite(lp).all():
                kind = "observed" if site["is_observed"] else "latent"
                raise GuideSetupError(
                    f"{kind} site {name!r} of model {self._model_name!r} has a non-finite "
                    "log density at the initial values; check its parameters or pass "
                    "init_loc_fn=init_to_value(values={...}) / init_to_feasible."
                )

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
        if not (args or kwargs):
            args, kwargs = self._setup_call
        if latent.dim() == 1:
            return self._centered_rows(latent, args, kwargs)
        try:
            return self._centered_rows(latent, args, kwargs)
        except (ValueError, RuntimeError):
            # A model that does not broadcast over a batch of draws: one run per draw.
            return torch.stack([self._centered_rows(row, args, kwargs) for row in latent])

    def _unpack_batch(self, latent: Tensor):
        """``_unpack_latent`` of ``(D,)`` or ``(N, D)``, a batch going left of every plate."""
        # Unpacking broadcasts batch dims against plate dims, so the batch goes
        # to the left of every plate, as a particle plate would put it.
        if latent.dim() > 1:
            nesting = max((-f.dim for f in self._prototype_frames.values()), default=0)
            latent = latent.reshape(latent.shape[:1] + (1,) * nesting + latent.shape[-1:])
        return self._unpack_latent(latent)

    def _centered_rows(self, latent: Tensor, args: tuple, kwargs: dict) -> Tensor:
        lead = latent.shape[:-1]
        pieces = {site["name"]: value for site, value in self._unpack_batch(latent)}
        values, _ = run_noncentered(self._bare_model[0], pieces, self.noncentered_sites, args, kwargs)
        parts = [
            (values[name] if name in self.noncentered_sites else pieces[name]).reshape(lead + (-1,))
            for name in pieces
        ]
        return torch.cat(parts, dim=-1)

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

    def _build_flow(self, dim: int) -> nn.Module:
        (flow,) = self._flow_arg
        if flow is None:
            return nn.ModuleList()
        if _is_pyro_transform_factory(flow):
            parts = flow(dim)
            parts = list(parts) if isinstance(parts, (list, tuple)) else [parts]
            for p in parts:
                if not isinstance(p, torch.distributions.Transform):
                    raise TypeError(
                        f"the flow callable must return a Transform (or a list of them) "
                        f"for dim={dim}, got {type(p).__name__}"
                    )
            return nn.ModuleList([p for p in parts])
        hyper = dict(self._hyper)
        if isinstance(flow, str) or (isinstance(flow, type) and issubclass(flow, zuko.lazy.Flow)):
            hyper.setdefault("hidden_features", (_hidden_size(dim),) * 2)
        else:
            hyper = {}
        return flow_transform(flow, dim, direction="sample", identity_init=True, **hyper)

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

    def get_transform(self, *args: Any, **kwargs: Any):
        """The transforms from base noise to the flat latent: the flow, then the affine stage."""
        # Reading self.packed (and self.flow, if it kept parameters of its own)
        # inside the guide's context registers them with the param store.
        views = self._bind(self.packed, self._modules["flow"])
        flow = self.flow if self._flow_has_params else self._modules["flow"]
        return _parts_of(flow) + [_affine_stage(views)]

    def _bind(self, flat: Tensor, flow: nn.Module) -> dict[str, Tensor]:
        # Copies with one backward pass for a training call; views otherwise.
        views = self._packing.bind_for_grad(flat, flow)
        if self._packing.module_slots:
            _clear_part_caches(flow)  # new parameter views: cached values belong to the old ones
        return views

    def _view(self, name: str) -> Tensor | None:
        return self._packing.bind(self._parameters["packed"]).get(name)

    @property
    def loc(self) -> Tensor:
        """The shift of the affine stage (a view of the packed parameter)."""
        return self._view("loc")

    @property
    def scale(self) -> Tensor:
        """The per-coordinate scale of the affine stage; assign to set it."""
        return self._view("log_scale").exp()

    @scale.setter
    def scale(self, value: Tensor) -> None:
        with torch.no_grad():
            self._view("log_scale").copy_(torch.as_tensor(value).log())

    @property
    def scale_tril(self) -> Tensor | None:
        """The unit lower-triangular factor of the affine stage, or ``None`` (diagonal)."""
        raw = self._view("scale_tril")
        return None if raw is None else _unit_tril(raw)

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
        return _FlowPosterior(self.get_base_dist(), self.get_transform(), detached)

    def _detached_parts(self) -> list:
        """Copies of the transforms whose parameters share storage but carry no gradient."""
        flow = self._modules["flow"]
        flat = self._parameters["packed"].detach()
        shadow = self.__dict__.get("_shadow_flow")
        if shadow is None:
            self.clear_cache()
            self._packing.unbind(flow)  # bound views hold a graph: deepcopy refuses them
            shadow = copy.deepcopy(flow)
            self._packing.bind(self._parameters["packed"], flow)
            shadow.__dict__.pop("_param_tuple", None)
            for p in shadow.parameters():
                p.requires_grad_(False)
            self.__dict__["_shadow_flow"] = shadow
        # Optimisers update parameters in place, so sharing storage keeps the
        # copy current; relink only if a parameter was replaced (load, .to()).
        for mirror, live in zip(_param_tuple(shadow), _param_tuple(flow)):
            if mirror.data_ptr() != live.data_ptr() or mirror.shape != live.shape:
                mirror.data = live.data
        views = self._bind(flat, shadow)
        return _parts_of(shadow) + [_affine_stage(views)]

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._check_shapes(args, kwargs)
        if not self.noncentered_sites:
            return super().forward(*args, **kwargs)
        # As AutoContinuous.forward, with the values (and, for non-centred
        # sites, the log-Jacobian -log s) from one run of the model.
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        pieces = {site["name"]: value for site, value in self._unpack_latent(latent)}
        values, log_scales = run_noncentered(self._bare_model[0], pieces, self.noncentered_sites, args, kwargs)
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

    def _check_shapes(self, args: tuple, kwargs: dict) -> None:
        shapes = _shapes_of(args, kwargs)
        if shapes == self._arg_shapes:
            return
        # The arguments changed shape: fine if the latent shapes do not.
        trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            new = trace.nodes.get(name)
            if new is None:
                raise GuideSetupError(
                    f"latent site {name!r} of model {self._model_name!r} disappeared "
                    "when the model was called with new arguments; the guide was set up "
                    "for a fixed set of latents: build a new guide for this model call."
                )
            if new["value"].shape != site["value"].shape:
                raise GuideSetupError(
                    f"latent site {name!r} changed shape between calls: "
                    f"{tuple(site['value'].shape)} when the guide was set up, "
                    f"{tuple(new['value'].shape)} now. A global guide has one fixed "
                    "latent vector; build a new guide, or use AutoAmortizedFlowGuide "
                    "for per-datum latents."
                )
        self._arg_shapes = shapes

    # ------------------------------------------------------------ summaries
    def clear_cache(self) -> None:
        """Drops cached flow values and the graphs they hold."""
        flow = self._modules.get("flow")
        if flow is not None:
            _clear_part_caches(flow)

    def __getstate__(self) -> dict:
        # After a training call the flow holds views of the packed parameter
        # and cached values that carry a graph, which copy.deepcopy and pickle
        # refuse. Both are rebuilt on the next use, so they are dropped here;
        # Pyro's own state (it drops the link to the model) follows.
        self.clear_cache()
        flow = self._modules.get("flow")
        if flow is not None and getattr(self, "_packing", None) is not None:
            self._packing.unbind(flow)
        # Pyro's __getstate__ drops the links to the model (and to an outer
        # AutoGuideList) from the guide itself, not only from the copy it
        # returns; a guide that was saved or copied then could no longer run
        # its model. The copy leaves them out; the guide keeps them.
        links = self._model, self._bare_model, self.master
        try:
            self._bare_model = None
            state = dict(super().__getstate__())
        finally:
            self._model, self._bare_model, self.master = links
        return state

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

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: Any, num_samples: int = 4000, **kwargs
    ) -> dict[str, Tensor]:
        """Monte Carlo posterior quantiles of each latent site (constrained space).

        Quantiles are taken per coordinate of the unconstrained draws and mapped
        through each site's bijection, so they are exact for every monotone
        per-coordinate constraint and a consistent summary otherwise.
        """
        latent = self.get_posterior(*args, **kwargs).sample((num_samples,))
        self.clear_cache()
        latent = self._centered_latent(latent, args, kwargs)
        q = torch.as_tensor(quantiles, dtype=latent.dtype, device=latent.device)
        return self._constrained(torch.quantile(latent, q, dim=0))

    def median(self, *args: Any, num_samples: int = 4000, **kwargs: Any) -> dict[str, Tensor]:
        """Monte Carlo posterior median of each latent site (constrained space)."""
        q = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {name: value[0] for name, value in q.items()}

    def _loc_scale(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "AutoFlowGuide has no closed-form loc/scale; use quantiles() or sample_posterior()"
        )


def _stl_by_default(flow: Any) -> bool:
    """Whether ``estimator="auto"`` picks STL for this flow (at small latent sizes).

    The families measured with both estimators (see the module docstring),
    which are the registry's families with a closed-form inverse, and the
    flowless Gaussian. Mean w1 over seeds 0-1 of protocol A, plain gradient
    -> STL: RealNVP banana 0.219 -> 0.116, mixture 0.064 -> 0.064; NSF banana
    0.207 -> 0.346, mixture 0.071 -> 0.047; NAF banana 0.103 -> 0.086,
    mixture 0.092 -> 0.087 (NAF keeps the plain gradient by default, as do
    Pyro's transforms, which were not measured; ``estimator="stl"`` works with
    all of them).
    """
    if flow is None:
        return True
    spec = _registry_spec(flow)
    return spec is not None and spec.analytic_inverse


def _packable(flow: Any) -> bool:
    """Whether the guide may hold this flow's parameters in its flat parameter.

    Registry families that say so, and no flow; flows built elsewhere keep
    their own parameters, since their code may iterate ``parameters()``.
    """
    if flow is None:
        return True
    spec = _registry_spec(flow)
    return spec is not None and spec.packable


def _registry_spec(flow: Any) -> FlowSpec | None:
    """The registry entry of a family given by name or Zuko class, else ``None``."""
    if isinstance(flow, str):
        return get_flow(flow)
    if isinstance(flow, type) and issubclass(flow, zuko.lazy.Flow):
        try:
            return get_flow(flow.__name__)
        except ValueError:
            return None
    return None


def _bijection(site: dict) -> Transform:
    """``biject_to(site support)``, or an error that names the site and the fix."""
    try:
        return biject_to(site["fn"].support)
    except NotImplementedError:
        raise GuideSetupError(
            f"site {site['name']!r} has support {site['fn'].support}, which has no "
            "bijection to unconstrained space; reparametrise it (e.g. a covariance "
            "matrix as scales times an LKJCholesky factor) or guide it separately."
        ) from None


def _with_feasible_fallback(init_loc_fn: Callable) -> Callable:
    """Falls back to a feasible point for sites that cannot be sampled (ImproperUniform)."""

    def init(site: dict) -> Tensor:
        try:
            return init_loc_fn(site)
        except NotImplementedError:
            to_support = _bijection(site)
            return to_support(torch.zeros(to_support.inverse_shape(site["fn"].shape())))

    return init


def _clear_part_caches(flow: nn.Module) -> None:
    for part in _parts_of(flow):
        if hasattr(part, "clear_cache"):
            part.clear_cache()


def _parts_of(flow: nn.Module) -> list:
    if isinstance(flow, nn.ModuleList):
        return list(flow)
    return [flow]


def _shapes_of(args: tuple, kwargs: dict) -> tuple:
    def shape(v: Any) -> Any:
        if torch.is_tensor(v):
            return tuple(v.shape)
        # Sizes are often passed as plain numbers.
        return v if isinstance(v, (int, float, str, bool)) else None

    return tuple(shape(a) for a in args), tuple(sorted((k, shape(v)) for k, v in kwargs.items()))
