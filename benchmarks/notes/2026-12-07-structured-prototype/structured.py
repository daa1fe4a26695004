"""A structured flow guide for models with many latents (project issue 30).

``AutoStructuredFlowGuide`` reads the model's structure from its prototype
trace and splits the latent sites in three groups:

* globals: sites outside every plate, together at most ``global_max_dim``
  unconstrained coordinates. They get the full flow of
  :class:`pyro_flowguide.AutoFlowGuide` (the guide is delegated to it, on the
  model with every other site blocked).
* plate-locals: sites inside one or more (vectorised, not subsampled) plates.
  Every member ``i`` of a site (a position in its plates' batch shape) with
  event size ``E`` (unconstrained) is drawn as::

      z_i = eps_i * exp(s_i) + t_i                 # shared conditional affine
      u_i = loc_i + B_i g + scale_i * (L_i z_i)    # per-member affine + coupling

  where ``eps_i ~ N(0, I_E)``, ``g`` is the vector of the globals' standardised
  unconstrained draws, ``(t_i, s_i) = MLP([g, c_i])`` is ONE small network
  per site shared by all its members (its input ``c_i`` is the member's own
  standardised loc and log-scale, so the network can scale and shift
  members differently, e.g. the funnel-like shrinkage of a group's mean towards
  a global mean as a global scale varies), ``B_i`` an ``E x D_g`` coupling to the
  globals, and ``L_i`` a unit lower-triangular ``E x E`` matrix (``1 < E <= 16``).
* chains: a site outside every plate with more than ``global_max_dim``
  coordinates (a latent per time step, one big vector site). Its ``T``
  coordinates are drawn with the same shared conditional affine per element,
  then a first-order Gauss-Markov (ARMA(1,1)) filter along the site's flattened
  order, then a per-element affine + coupling::

      z_t = eps_t * exp(s_t) + t_t
      x_t = a_t x_{t-1} + z_t          # AR(1) filter, a_t = tanh(.)
      y_t = x_t + b_t x_{t-1}          # MA(1) term
      u_t = loc_t + B_t g + scale_t y_t

  A Gaussian with a tridiagonal precision (the posterior of a Markov chain in
  centred coordinates) is exactly the AR(1) part; the MA(1) term lets the same
  guide fit the chain's innovations (non-centred coordinates), whose posterior
  is a bidiagonal map of a Markov chain. The filter is evaluated as a parallel
  prefix scan, ``ceil(log2 T)`` vectorised passes, so a step is O(T log T).

Every transform starts at the identity (zeroed output layer, zero coupling,
``a = b = 0``), so at initialisation the guide over locals and chains is
exactly AutoNormal's mean-field Gaussian with scale ``init_scale``.

A model with globals only is handed whole to :class:`AutoFlowGuide`, so its
behaviour is that guide's.

Parameter count: ``P_flow(D_g) + sum over local/chain sites of
N (E (2 + D_g) + E (E - 1) / 2) + 2 T (chains) + P_mlp`` with
``P_mlp = (D_g + 2 E) H + H H + H 2 E + 2 H + 2 E`` per site (``H = hidden``),
``P_flow`` the parameter count of AutoFlowGuide over the ``D_g <= 32`` globals.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributions import biject_to
from torch.nn import functional as F

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import to_pyro_module_

from pyro_flowguide.guides import DEFAULT_FLOW, AutoFlowGuide, GuideSetupError

__all__ = ["AutoStructuredFlowGuide"]

_LOG_SCALE_BOUND = 3.0  # the shared network changes a scale by at most exp(+-3)


def _soft_bound(x: Tensor, bound: float = _LOG_SCALE_BOUND) -> Tensor:
    return bound * torch.tanh(x / bound)


def ar1_scan(a: Tensor, z: Tensor) -> Tensor:
    """``x_t = a_t x_{t-1} + z_t`` along the last dim (``x_0 = z_0``), by a parallel prefix scan.

    ``a`` broadcasts against ``z``; ``a[..., 0]`` is ignored. ``ceil(log2 T)``
    vectorised passes, differentiable.
    """
    T = z.shape[-1]
    a = a.expand(z.shape[-1:]) if a.dim() == 1 else a
    A = F.pad(a[..., 1:], (1, 0))  # a_0 -> 0: nothing before the first element
    x = z
    k = 1
    while k < T:
        x = x + A * F.pad(x[..., :-k], (k, 0))
        A = A * F.pad(A[..., :-k], (k, 0))
        k *= 2
    return x


class _SharedAffine(PyroModule):
    """``(t, s) = MLP(context)``: one conditional affine map shared by a site's members.

    Zero output layer: the identity at initialisation.
    """

    def __init__(self, context: int, event: int, hidden: int) -> None:
        super().__init__()
        net = nn.Sequential(
            nn.Linear(context, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * event)
        )
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        to_pyro_module_(net)
        self.net = net
        self.event = event

    def forward(self, eps: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(context)
        t, s = out[..., : self.event], _soft_bound(out[..., self.event :])
        return eps * s.exp() + t, s


class _GlobalFlow(PyroModule):
    """The globals' posterior, as AutoFlowGuide builds it, without its per-call overhead:
    ``u = loc + scale * (L f(eps))`` with ``L`` unit lower-triangular and ``f`` a flow in
    sampling direction (identity at initialisation), plain reparameterisation gradient."""

    def __init__(self, init_u: Tensor, init_scale: float, flow: Any, hidden: int | None,
                 transforms: int | None = None) -> None:
        super().__init__()
        D = init_u.numel()
        self.D = D
        self.loc = nn.Parameter(init_u.clone())
        self.log_scale = nn.Parameter(torch.full_like(init_u, math.log(init_scale)))
        if D > 1:
            self.tril = nn.Parameter(init_u.new_zeros(D * (D - 1) // 2))
            self._tril_index = torch.tril_indices(D, D, -1)
        self.has_flow = flow is not None
        if self.has_flow:
            from pyro_flowguide.transforms import flow_transform

            H = hidden or max(64, 4 * D)
            hyper = {} if transforms is None else {"transforms": int(transforms)}
            ft = flow_transform(flow, D, direction="sample", identity_init=True, hidden_features=(H, H), **hyper)
            self.flow = ft  # a plain torch module: registered with the param store on each call
            self.__dict__["_flow_params"] = list(ft.named_parameters())

    def forward(self, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``eps (R, D)`` -> ``u``, standardised ``z = L f(eps)`` (the locals' context), ``log|du/deps| (R,)``."""
        z, ladj = eps, eps.new_zeros(eps.shape[:-1])
        if self.has_flow:
            # Register the flow's parameters with the param store (cheaper than pyro.module).
            for name, p in self.__dict__["_flow_params"]:
                pyro.param(f"{self._pyro_name}.flow.{name}", p)
            z, l = self.flow.call_and_ladj(eps)
            ladj = ladj + (l.sum(-1) if l.dim() == z.dim() else l)
        if self.D > 1:
            L = z.new_zeros(self.D, self.D)
            L[self._tril_index[0], self._tril_index[1]] = self.tril
            z = z + z @ L.T
        log_scale = self.log_scale
        return self.loc + log_scale.exp() * z, z, ladj + log_scale.sum()


class _SiteGuide(PyroModule):
    """Per-site parameters and the shared network of one plate-local or chain site."""

    def __init__(
        self,
        kind: str,
        init_u: Tensor,  # (N, E) initial unconstrained values
        init_scale: float,
        d_glob: int,
        hidden: int,
        conditional: bool,
        coupling: bool,
        member_features: bool = True,
    ) -> None:
        super().__init__()
        self.use_features = member_features
        N, E = init_u.shape
        self.kind, self.N, self.E, self.d_glob = kind, N, E, d_glob
        self.loc = nn.Parameter(init_u.clone())
        self.log_scale = nn.Parameter(torch.full_like(init_u, math.log(init_scale)))
        self.coupling = coupling and d_glob > 0
        if self.coupling:
            self.coupling_weight = nn.Parameter(init_u.new_zeros(N, E, d_glob))
        self.tril_size = E * (E - 1) // 2 if 1 < E <= 16 else 0
        if self.tril_size:
            self.tril = nn.Parameter(init_u.new_zeros(N, self.tril_size))
            self._tril_index = torch.tril_indices(E, E, -1)
        if kind == "chain":
            self.ar_raw = nn.Parameter(init_u.new_zeros(N * E))
            self.ma = nn.Parameter(init_u.new_zeros(N * E))
        self.conditional = conditional
        if conditional:
            self.shared = _SharedAffine(d_glob + (2 * E if member_features else 0), E, hidden)

    def member_features(self, loc: Tensor, log_scale: Tensor) -> Tensor:
        # Not detached (a detached input would bias the gradient).
        if self.N > 1:
            loc = (loc - loc.mean(0)) / (loc.std(0) + 1e-6)
        else:
            loc = torch.zeros_like(loc)
        return torch.cat([loc, log_scale], -1)  # (N, 2E)

    def forward(self, eps: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor]:
        """``eps (R, N, E)``, ``g (R or 1, D_g)`` -> ``u (R, N, E)``, ``log|du/deps| (R, N)``."""
        loc, log_scale = self.loc, self.log_scale
        R = eps.shape[0]
        ladj = log_scale.sum(-1).expand(R, self.N)
        z = eps
        if self.conditional:
            if self.use_features:
                feats = self.member_features(loc, log_scale).expand(R, self.N, 2 * self.E)
            else:
                feats = loc.new_zeros(R, self.N, 0)
            if g is not None and self.d_glob:
                ctx = torch.cat([g.unsqueeze(-2).expand(R, self.N, self.d_glob), feats], -1)
            else:
                ctx = feats
            z, s = self.shared(eps, ctx)
            ladj = ladj + s.sum(-1)
        if self.tril_size:
            Lfull = z.new_zeros(self.N, self.E, self.E)
            Lfull[:, self._tril_index[0], self._tril_index[1]] = self.tril
            z = z + (Lfull @ z.unsqueeze(-1)).squeeze(-1)
        if self.kind == "chain":
            flat = z.reshape(R, self.N * self.E)
            x = ar1_scan(torch.tanh(self.ar_raw), flat)
            x = x + self.ma * F.pad(x[..., :-1], (1, 0))
            z = x.reshape(R, self.N, self.E)
        u = loc + log_scale.exp() * z
        if self.coupling and g is not None:
            u = u + torch.einsum("neg,rg->rne", self.coupling_weight, g.expand(R, self.d_glob))
        return u, ladj


class AutoStructuredFlowGuide(AutoGuide):
    """A guide for models with many latents: a full flow over the few globals,
    shared conditional flows over plate-local sites and Gauss-Markov flows over chains.

    Arguments:
        model: A Pyro model with continuous latents; plates vectorised, not subsampled.
        flow: The flow of AutoFlowGuide for a model with globals only (default ``DEFAULT_FLOW``).
        global_flow: The flow over the globals when the model also has locals or chains.
            Default ``None``: a full-rank Gaussian (unit lower-triangular ``L``), which was
            more accurate and faster than ``"SplineMAF"`` in ``bench_scale.py`` (hierarchical
            D=100: worst sd ratio 0.67 vs 0.30, k-hat 0.37 vs 0.72; stochastic volatility
            D=100: worst standardised mean error 0.99 vs 1.14); any registry name works.
        global_guide: ``"lean"`` (the globals' flow built in this guide) or ``"autoflow"``
            (an AutoFlowGuide on the model with the other sites blocked: slower, but with
            its non-centring of hierarchical globals and its STL estimator).
        global_max_dim: Sites outside every plate go to the full global flow while
            they total at most this many unconstrained coordinates; larger ones
            (biggest first) become chains.
        init_loc_fn: Initialisation strategy for every site.
        init_scale: Initial scale of locals, chains (and globals, when the model has
            locals or chains).
        hidden: Width of each site's shared conditioner network.
        conditional: Use the shared conditional affine (else: per-member affine +
            coupling only).
        coupling: Linear coupling of every local coordinate to the globals.
        global_kwargs: Further keyword arguments of the globals' AutoFlowGuide.
    """

    def __init__(
        self,
        model: Callable,
        flow: Any = DEFAULT_FLOW,
        *,
        global_max_dim: int = 32,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        hidden: int = 16,
        conditional: bool = True,
        coupling: bool = True,
        member_features: bool = True,
        global_kwargs: dict | None = None,
        global_flow: Any = None,
        global_guide: str = "lean",
    ) -> None:
        if global_guide not in ("lean", "autoflow"):
            raise ValueError(f"global_guide must be 'lean' or 'autoflow', got {global_guide!r}")
        self._global_mode = global_guide
        self._global_flow_arg = (global_flow,)
        self._orig_model = (model,)
        self._flow = (flow,)
        self.global_max_dim = int(global_max_dim)
        self.init_loc_fn = init_loc_fn
        self._init_scale = float(init_scale)
        self._hidden = int(hidden)
        self._conditional = bool(conditional)
        self._coupling = bool(coupling)
        self._member_features = bool(member_features)
        self._global_kwargs = dict(global_kwargs or {})
        self._model_name = getattr(model, "__name__", type(model).__name__)
        super().__init__(InitMessenger(init_loc_fn)(model))
        self.delegate = None
        self.global_guide = None

    # ---------------------------------------------------------------- set-up
    def _check_prototype(self, part_trace) -> None:
        # Called by the globals' AutoFlowGuide (a child guide) on its set-up.
        pass

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        rng = torch.get_rng_state()  # a globals-only model's delegate starts from the same state
        try:
            super()._setup_prototype(*args, **kwargs)
        except NotImplementedError as e:
            raise GuideSetupError(f"model {self._model_name!r}: {e}") from None
        (model,) = self._orig_model
        self.max_plate_nesting = max((-f.dim for f in self._prototype_frames.values()), default=0)
        globals_, locals_, free = [], [], []
        self._info = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            if fn.support.is_discrete:
                raise GuideSetupError(
                    f"site {name!r} of model {self._model_name!r} is discrete; "
                    "AutoStructuredFlowGuide covers continuous latents only."
                )
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            for f in site["cond_indep_stack"]:
                if not f.vectorized:
                    raise GuideSetupError(
                        f"site {name!r} is inside the sequential plate {f.name!r}; "
                        "AutoStructuredFlowGuide needs vectorised plates (pyro.plate with a dim)."
                    )
                if f.full_size is not None and f.full_size != f.size:
                    raise GuideSetupError(
                        f"site {name!r} is inside plate {f.name!r}, which is subsampled "
                        f"({f.size} of {f.full_size}); use AutoAmortizedFlowGuide for it."
                    )
            bij = biject_to(fn.support)
            u = bij.inv(site["value"]).detach()
            batch_shape = fn.batch_shape
            if tuple(u.shape[: len(batch_shape)]) != tuple(batch_shape):
                raise GuideSetupError(
                    f"site {name!r}: value shape {tuple(site['value'].shape)} does not start "
                    f"with its batch shape {tuple(batch_shape)}; expand the distribution to "
                    "its plates' sizes (dist.expand or the plates' broadcasting)."
                )
            info = dict(shape=tuple(u.shape), batch=tuple(batch_shape), frames=frames, bij=bij, init=u,
                        event_dim=fn.event_dim)
            self._info[name] = info
            if frames:
                locals_.append(name)
            else:
                free.append((name, u.numel()))
        # Non-plated sites: globals while they fit in global_max_dim, chains otherwise.
        total = sum(n for _, n in free)
        chains = []
        for name, n in sorted(free, key=lambda x: -x[1]):
            if total <= self.global_max_dim:
                break
            chains.append(name)
            total -= n
        globals_ = [name for name, _ in free if name not in chains]
        self.global_sites, self.local_sites, self.chain_sites = tuple(globals_), tuple(locals_), tuple(chains)

        if not locals_ and not chains:
            # Small model: today's AutoFlowGuide over every site.
            self.delegate = AutoFlowGuide(model, self._flow[0], init_loc_fn=self.init_loc_fn, **self._global_kwargs)
            torch.set_rng_state(rng)
            self.delegate._setup_prototype(*args, **kwargs)
            return
        self.global_flow = None
        if globals_ and self._global_mode == "lean":
            init = torch.cat([self._info[n]["init"].reshape(-1) for n in globals_])
            self._glob_order = list(globals_)
            self.d_glob = init.numel()
            kw = dict(self._global_kwargs)
            self.global_flow = _GlobalFlow(init, kw.pop("init_scale", self._init_scale), kw.pop("flow", self._global_flow_arg[0]),
                                           kw.pop("hidden", None), kw.pop("transforms", None))
        elif globals_:
            kw = dict(init_scale=self._init_scale)
            kw.update(self._global_kwargs)
            blocked = poutine.block(model, expose=list(globals_))
            self.global_guide = AutoFlowGuide(blocked, self._flow[0], init_loc_fn=self.init_loc_fn, **kw)
            self.global_guide._setup_prototype(*args, **kwargs)
            gg = self.global_guide
            self._glob_order = list(gg._unconstrained_shapes)
            self.d_glob = gg.latent_dim
            self._std_by_affine = not gg.noncentered_sites
            init = torch.cat([self._info[n]["init"].reshape(-1) for n in self._glob_order])
            self.register_buffer("_g_center", init.clone())
        else:
            self.d_glob = 0
        for name in locals_ + chains:
            info = self._info[name]
            u = info["init"]
            nb = len(info["batch"]) if name in locals_ else 0
            N = math.prod(info["shape"][:nb])
            E = math.prod(info["shape"][nb:])
            if name in chains:
                N, E = u.numel(), 1
            info["N"], info["E"], info["nb"] = N, E, nb
            module = _SiteGuide(
                "chain" if name in chains else "local",
                u.reshape(N, E),
                self._init_scale,
                self.d_glob,
                self._hidden,
                self._conditional,
                self._coupling,
                self._member_features,
            )
            setattr(self, "site_" + _safe(name), module)

    # ---------------------------------------------------------------- draws
    def _globals_context(self, values: dict[str, Tensor]) -> Tensor:
        """Standardised unconstrained globals, ``(R, D_g)``."""
        gg = self.global_guide
        parts = []
        for name in self._glob_order:
            info = self._info[name]
            u = info["bij"].inv(values[name])
            k = len(info["shape"])
            lead = u.shape[: u.dim() - k]
            parts.append(u.reshape((math.prod(lead), -1)))
        g = torch.cat(parts, -1)
        if self._std_by_affine:
            # Not detached: a detached standardisation would drop terms of the gradient.
            return (g - gg.loc) / gg.scale
        return g - self._g_center

    def _lean_globals(self, result: dict, eps: Tensor | None = None) -> Tensor:
        gf = self.global_flow
        if eps is None:
            zeros = gf.loc.new_zeros(gf.D)
            eps = pyro.sample(f"_{self._pyro_name}_globals_eps", dist.Normal(zeros, 1.0).to_event(1),
                              infer={"is_auxiliary": True})
        lead = eps.shape[:-1]
        u, z, ladj = gf(eps.reshape(-1, gf.D))
        masked = poutine.get_mask() is False
        pos = 0
        for name in self._glob_order:
            info = self._info[name]
            n = info["init"].numel()
            ui = u[:, pos : pos + n].reshape(lead + info["shape"])
            pos += n
            value = info["bij"](ui)
            if masked:
                log_density = 0.0
            else:
                lc = info["bij"].log_abs_det_jacobian(ui, value)
                lc = sum_rightmost(lc, lc.dim() - value.dim() + info["event_dim"])
                log_density = -lc
                if name == self._glob_order[0]:
                    log_density = log_density - ladj.reshape(lead + (1,) * (lc.dim() - len(lead)))
            result[name] = pyro.sample(name, dist.Delta(value, log_density=log_density, event_dim=info["event_dim"]))
        return z

    def _local_site(self, name: str, g: Tensor | None, plates: dict, eps: Tensor | None = None) -> Tensor:
        info = self._info[name]
        module = getattr(self, "site_" + _safe(name))
        shape, nb = info["shape"], info["nb"]
        with ExitStack() as stack:
            for frame in info["frames"]:
                stack.enter_context(plates[frame.name])
            if eps is None:
                zeros = torch.zeros(shape, dtype=module.loc.dtype, device=module.loc.device)
                base = dist.Normal(zeros, 1.0).to_event(len(shape) - nb)
                eps = pyro.sample(f"_{self._pyro_name}_{name}_eps", base, infer={"is_auxiliary": True})
            lead = eps.shape[: eps.dim() - len(shape)]
            R = math.prod(lead)
            u, ladj = module(eps.reshape(R, info["N"], info["E"]), g)
            u = u.reshape(lead + shape)
            value = info["bij"](u)
            if poutine.get_mask() is False:
                log_density = 0.0
            else:
                # log q(value) = log N(eps) - log|du/deps| - log|dvalue/du|; log N(eps) is the aux site's.
                ladj_c = info["bij"].log_abs_det_jacobian(u, value)
                ladj_c = sum_rightmost(ladj_c, ladj_c.dim() - value.dim() + info["event_dim"])
                if name in self.chain_sites:
                    ladj = ladj.sum(-1)
                ladj = ladj.reshape(lead + info["batch"])
                log_density = -(ladj + ladj_c)
            return pyro.sample(name, dist.Delta(value, log_density=log_density, event_dim=info["event_dim"]))

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.delegate is not None:
            self._create_plates(*args, **kwargs)  # the child guide uses this guide's plates
            return self.delegate(*args, **kwargs)
        result = {}
        g = None
        plates = self._create_plates(*args, **kwargs)  # before the child guide: it uses these
        if self.global_flow is not None:
            g = self._lean_globals(result)
        elif self.global_guide is not None:
            result.update(self.global_guide(*args, **kwargs))
            g = self._globals_context(result)
        for name in self.local_sites + self.chain_sites:
            result[name] = self._local_site(name, g, plates)
        return result

    # ------------------------------------------------------------ summaries
    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """``num_samples`` joint draws of every latent site (constrained), shapes ``(num_samples,) + site shape``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.delegate is not None:
            return self.delegate.sample_posterior(num_samples, *args, **kwargs)
        with poutine.block():
            with pyro.plate("_num_posterior_samples", num_samples, dim=-(self.max_plate_nesting + 1)):
                draws = self(*args, **kwargs)
        return {
            name: value.reshape((num_samples,) + tuple(self.prototype_trace.nodes[name]["value"].shape))
            for name, value in draws.items()
        }

    @torch.no_grad()
    def median(self, *args: Any, num_samples: int = 4000, **kwargs: Any) -> dict[str, Tensor]:
        """Median of the globals (Monte Carlo, AutoFlowGuide's) and, for locals and chains,
        the value at base noise 0 given the globals' median (the conditional median)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.delegate is not None:
            return self.delegate.median(*args, num_samples=num_samples, **kwargs)
        result, g = {}, None
        if self.global_flow is not None:
            gf = self.global_flow
            u, g, _ = gf(gf.loc.new_zeros(1, gf.D))
            pos = 0
            for name in self._glob_order:
                info = self._info[name]
                n = info["init"].numel()
                result[name] = info["bij"](u[0, pos : pos + n].reshape(info["shape"]))
                pos += n
        elif self.global_guide is not None:
            result.update(self.global_guide.median(*args, num_samples=num_samples, **kwargs))
            g = self._globals_context(result)
        for name in self.local_sites + self.chain_sites:
            info = self._info[name]
            module = getattr(self, "site_" + _safe(name))
            eps = torch.zeros(1, info["N"], info["E"], dtype=module.loc.dtype, device=module.loc.device)
            u, _ = module(eps, g)
            result[name] = info["bij"](u.reshape(info["shape"]))
        return result

    def quantiles(self, quantiles, *args: Any, num_samples: int = 1000, **kwargs: Any) -> dict[str, Tensor]:
        """Monte Carlo quantiles per coordinate (constrained space)."""
        draws = self.sample_posterior(num_samples, *args, **kwargs)
        q = torch.as_tensor(quantiles, dtype=torch.get_default_dtype())
        return {name: torch.quantile(v.reshape(num_samples, -1), q, dim=0).reshape((-1,) + v.shape[1:])
                for name, v in draws.items()}

    def global_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        """The globals' flow posterior (AutoFlowGuide.get_posterior: the flat unconstrained globals)."""
        guide = self.delegate if self.delegate is not None else self.global_guide
        if guide is None:
            raise GuideSetupError("this model has no global sites")
        return guide.get_posterior(*args, **kwargs)

    get_posterior = global_posterior

    def local_loc_scale(self, name: str) -> tuple[Tensor, Tensor]:
        """The per-member affine stage ``(loc, scale)`` of a local or chain site, shape ``(N, E)``."""
        module = getattr(self, "site_" + _safe(name))
        return module.loc.detach(), module.log_scale.detach().exp()

    def structure(self) -> dict[str, tuple[str, ...]]:
        """How the sites were split: ``{"global": ..., "local": ..., "chain": ...}``."""
        if self.delegate is not None:
            return {"global": tuple(self._info), "local": (), "chain": ()}
        return {"global": self.global_sites, "local": self.local_sites, "chain": self.chain_sites}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)
