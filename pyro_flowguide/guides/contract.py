"""What code written for Pyro's autoguides reads from :class:`~pyro_flowguide.AutoFlowGuide`, as a mixin.

Summaries (``median``, ``quantiles``) that are the same on every call and
leave the global random stream alone; a param-store name that differs between
guides of different layout, so that guides of several models share one store;
the affine stage's parameters under names of their own, and an error that
says what to use for the Gaussian guides' ``loc``, ``scale`` and ``scale_tril``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import numbers
import pickle
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from torch import Tensor, nn

from .posterior import affine_shift, forward_with_ladj, unit_tril, write_affine_shift
from .sites import GuideSetupError

__all__ = [
    "GuideContractMixin", "SeededSummaries", "StoreSync", "gaussian_attribute_error", "rng_devices", "store_sync",
    "packed_fingerprint", "packed_param_name", "picklable", "checked_num_samples", "checked_quantiles", "innermost", "whole_number_at_least",
]

#: The live guide that set up each packed parameter name (to refuse a second model's guide under it).
_STORE_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

#: What the Gaussian guides' attributes hold there; a flow guide has no closed form for them.
GAUSSIAN_ATTRIBUTES = {
    "loc": "the posterior mean of the flat unconstrained latent",
    "scale": "the posterior standard deviation of each coordinate of the flat unconstrained latent",
    "scale_tril": "the lower Cholesky factor of the posterior covariance of the flat unconstrained latent",
}


def gaussian_attribute_error(name: str) -> AttributeError:
    """The error for ``guide.loc`` / ``scale`` / ``scale_tril`` on a flow guide."""
    return AttributeError(
        f"AutoFlowGuide has no {name!r}. For AutoMultivariateNormal / AutoNormal-style guides "
        f"it is {GAUSSIAN_ATTRIBUTES[name]}; a flow posterior has no closed form for it. Use "
        "guide.quantiles([...]) or guide.median() for per-site summaries, "
        "guide.sample_posterior(n) for draws (their mean and spread), or "
        "guide.get_posterior() for the distribution over the flat latent. The affine "
        "stage's own parameters (not the posterior's moments) are affine_loc, "
        "affine_scale and affine_unit_tril."
    )


def _describe(obj: Any) -> str:
    """A description of a configuration value that is the same in every process (no addresses)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    if isinstance(obj, (list, tuple)):
        return "(" + ",".join(_describe(o) for o in obj) + ")"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k}:{_describe(v)}" for k, v in sorted(obj.items())) + "}"
    kind = obj if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', type(kind).__name__)}"


def packed_param_name(
    model_name: str,
    shapes: dict[str, tuple],
    noncentered: Sequence[str],
    layout: Sequence[tuple],
    flow: Any,
    hyper: dict,
) -> str:
    """``packed_<hash>``: the packed parameter's name, from the model's name, its sites and the guide's layout.

    Arguments:
        model_name: The model's name.
        shapes: Each latent site's unconstrained shape, in the model's order.
        noncentered: The sites the flow sees in non-centred coordinates.
        layout: ``(owner, name, shape)`` of each tensor packed in the parameter.
        flow: The guide's ``flow`` argument; ``hyper`` its options.
    """
    text = "|".join(
        [
            model_name,
            ";".join(f"{name}:{tuple(shape)}" for name, shape in shapes.items()),
            ",".join(noncentered),
            ";".join(f"{owner}/{name}:{tuple(shape)}" for owner, name, shape in layout),
            _describe(flow),
            _describe(hyper),
        ]
    )
    return "packed_" + hashlib.sha1(text.encode()).hexdigest()[:12]


def picklable(obj: Any) -> bool:
    """Whether ``pickle`` can save ``obj`` (a module-level function can, by name; a lambda cannot)."""
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False
    return True


def packed_fingerprint(packed: Tensor) -> tuple[float, float]:
    """A cheap summary of a parameter vector that any training step or load changes: its sum and sum of squares."""
    with torch.no_grad():
        flat = packed.detach().double()
        return float(flat.sum()), float(flat.square().sum())


class StoreSync:
    """Keeps the parameters of a ``PyroModule`` tree and the param store's tensors of their names one and the same.

    Pyro's idiom ``guide(*args); pyro.get_param_store().load(path)`` puts new
    tensors in the store after set-up. Pyro's ``PyroParam`` attributes adopt
    them on their next use; plain ``nn.Parameter`` attributes and the
    parameters of plain ``nn.Module`` children keep their own, and an
    optimiser would then update store tensors that the guide does not read.
    Each call compares the store's tensor under a parameter's name with the
    one it saw last: if the store's changed (a load), the guide adopts it; if
    only the module's changed (a module replaced after set-up), the store
    takes the module's. A pickle or copy of it starts afresh.
    """

    def __init__(self) -> None:
        self._seen: dict[str, weakref.ref] = {}

    def __reduce__(self):
        return (StoreSync, ())

    def one(self, owner: nn.Module, name: str, fullname: str, strict: bool = True) -> bool:
        """Syncs ``owner``'s parameter ``name``, stored as ``fullname``; returns whether the guide's changed.

        ``strict``: a loaded tensor of another shape raises; otherwise the
        module's parameter stays, with a warning.
        """
        store = pyro.get_param_store()
        own = owner._parameters[name]
        held = store._params.get(fullname)  # where Pyro's PyroModule reads it too
        if held is None:
            return False
        last = self._seen.get(fullname)
        if held is not own and last is not None and last() is held:
            held = None  # the store is as it was: the module's parameter is the new one
        elif held is not own and held.shape != own.shape:
            if strict:
                raise GuideSetupError(
                    f"the param store holds {fullname!r} with shape {tuple(held.shape)}, but the "
                    f"guide's parameter has shape {tuple(own.shape)} (a store saved from a guide "
                    "built another way). Build the guide as the saved one was, or call "
                    "pyro.clear_param_store()."
                )
            warnings.warn(
                f"the param store holds {fullname!r} with shape {tuple(held.shape)}, but the guide's "
                f"parameter has shape {tuple(own.shape)}: the guide keeps its own.",
                UserWarning,
                stacklevel=3,
            )
            held = None
        if held is None or held is own:
            if store._params[fullname] is not own:
                store._params[fullname] = own
                store._param_to_name[own] = fullname
            self._seen[fullname] = weakref.ref(own)
            return False
        if not isinstance(held, nn.Parameter):
            held = nn.Parameter(held.detach())
            store._params[fullname] = held
            store._param_to_name[held] = fullname
        owner._parameters[name] = held
        self._seen[fullname] = weakref.ref(held)
        return True

    def tree(self, module: nn.Module, strict: bool = False) -> bool:
        """:meth:`one` for every parameter of a ``PyroModule`` tree, under the names Pyro gives them."""
        changed = False
        for mod in module.modules():
            if not isinstance(mod, PyroModule):
                continue
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    changed |= self.one(mod, name, mod._pyro_get_fullname(name), strict)
            for child_name, child in mod._modules.items():
                if child is None or isinstance(child, PyroModule):
                    continue
                prefix = mod._pyro_get_fullname(child_name)
                for owner_name, owner in child.named_modules():
                    for name, p in list(owner._parameters.items()):
                        if p is not None:
                            path = f"{owner_name}.{name}" if owner_name else name
                            changed |= self.one(owner, name, param_with_module_name(prefix, path), strict)
        return changed


def store_sync(guide: nn.Module) -> StoreSync:
    """The guide's :class:`StoreSync` (made on first use)."""
    sync = guide.__dict__.get("_store_sync")
    if sync is None:
        sync = guide.__dict__["_store_sync"] = StoreSync()
    return sync


def innermost(fn: Any) -> Any:
    """The function inside Pyro's handlers and other wrappers (``functools.partial``, ``__wrapped__``)."""
    for _ in range(32):
        if isinstance(fn, functools.partial):  # a handler is partial(_context_wrap, messenger, fn)
            handler = getattr(fn.func, "__name__", "") == "_context_wrap" and fn.args
            fn = fn.args[-1] if handler else fn.func
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        else:
            break
    return fn


def whole_number_at_least(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (a Python or numpy one, not a bool) of at least ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def checked_num_samples(num_samples: Any, guide: Any) -> int:
    """``num_samples`` of ``sample_posterior`` as an int, refused unless it is a whole number >= 1."""
    if not whole_number_at_least(num_samples, 1):
        raise ValueError(
            f"{type(guide).__name__}.sample_posterior: num_samples must be a whole number >= 1 "
            f"(the number of joint draws), got {num_samples!r}"
        )
    return int(num_samples)


def checked_quantiles(quantiles: Any) -> Tensor:
    """``quantiles`` as a 1-D float tensor, refused unless every entry is a number in [0, 1]."""
    try:
        q = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        q = None
    if q is None or not bool(((q >= 0) & (q <= 1)).all()):
        raise ValueError(f"quantiles must be numbers in [0, 1] (e.g. [0.05, 0.5, 0.95]), got {quantiles!r}")
    return q


def rng_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


class GuideContractMixin:
    """Pyro-facing accessors of :class:`~pyro_flowguide.AutoFlowGuide`.

    Reads the guide's ``_packing``, ``_parameters["packed"]``, ``_packed_name``,
    ``get_posterior``, ``clear_cache``, ``_centered_latent`` and ``_constrained``.
    """

    #: Posterior draws behind :meth:`median` and :meth:`quantiles`.
    summary_draws: int = 4000
    #: The seed of those draws (taken on a fork of the random state).
    summary_seed: int = 0
    _packed_name: str | None = None

    def __getattr__(self, name: str) -> Any:
        if name in GAUSSIAN_ATTRIBUTES:
            raise gaussian_attribute_error(name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Set, they would read back as if they were the posterior's.
        if name in GAUSSIAN_ATTRIBUTES:
            raise gaussian_attribute_error(name)
        super().__setattr__(name, value)

    def _pyro_get_fullname(self, name: str) -> str:
        # The packed parameter goes to the param store under its layout's name.
        if name == "packed" and self._packed_name is not None:
            name = self._packed_name
        return super()._pyro_get_fullname(name)

    @property
    def packed_param_name(self) -> str:
        """The param-store name of the guide's packed parameter (set on set-up)."""
        prefix = self.__dict__.get("_pyro_name", "")
        name = self._packed_name or "packed"
        return f"{prefix}.{name}" if prefix else name

    def _check_store(self, shape: torch.Size) -> bool:
        """Whether the param store holds this guide's parameter already (loaded); refuses one of another shape."""
        fullname, store = self.packed_param_name, pyro.get_param_store()
        held = store[fullname] if fullname in store else None
        if held is not None and held.shape != shape:
            raise GuideSetupError(
                f"the param store holds {fullname!r} with shape {tuple(held.shape)}, but this guide "
                f"of model {self._model_name!r} needs shape {tuple(shape)} under that name (a guide "
                "with the same model name, sites and flow was set up differently, or a store "
                "from another version was loaded). Call pyro.clear_param_store(), or delete "
                f"that entry (del pyro.get_param_store()[{fullname!r}]), before building this guide."
            )
        owner = _STORE_OWNERS.get(fullname)
        models = getattr(owner, "_bare_model", None), self.__dict__.get("_bare_model")
        if (
            held is not None and owner is not None and owner is not self and None not in models
            and innermost(models[0][0]) is not innermost(models[1][0])
        ):
            raise GuideSetupError(
                f"the param store holds {fullname!r} for another AutoFlowGuide, of another model also named "
                f"{self._model_name!r} with the same sites: the two guides would share one parameter, and "
                "fitting one would move the other. Give the models distinct names, or call "
                "pyro.clear_param_store() before building this guide if the other one is done with."
            )
        _STORE_OWNERS[fullname] = self
        return held is not None

    def _packed(self) -> Tensor:
        """The packed parameter, after adopting a param store's tensor loaded under its name (see :class:`StoreSync`)."""
        if self._packed_name is not None and store_sync(self).one(self, "packed", self.packed_param_name):
            self.__dict__.pop("_shadow_flow", None)  # it shared the old tensor's storage
            self.clear_cache()
        return self._parameters["packed"]

    # ------------------------------------------------------ the affine stage
    def _view(self, name: str) -> Tensor | None:
        packed = self._packed()  # first: it says why a guide has no packed parameter
        return self._packing.bind(packed).get(name)

    @property
    def affine_loc(self) -> Tensor:
        """The shift of the affine stage; assign to set it. Not the posterior mean."""
        packed = self._packed()
        return affine_shift(self._packing.bind(packed))

    @affine_loc.setter
    def affine_loc(self, value: Tensor) -> None:
        views = self._packing.bind(self._packed())
        write_affine_shift(views, torch.as_tensor(value, dtype=views["loc"].dtype, device=views["loc"].device))

    @property
    def affine_scale(self) -> Tensor:
        """The per-coordinate scale of the affine stage; assign to set it. Not the posterior's spread."""
        return self._view("log_scale").exp()

    @affine_scale.setter
    def affine_scale(self, value: Tensor) -> None:
        with torch.no_grad():
            self._view("log_scale").copy_(torch.as_tensor(value).log())

    @property
    def affine_unit_tril(self) -> Tensor | None:
        """The unit lower-triangular factor of the affine stage, or ``None`` (diagonal)."""
        raw = self._view("scale_tril")
        return None if raw is None else unit_tril(raw, self._factor_scaled)

    def affine_mask(self, names: Sequence[str] = ("loc", "log_scale")) -> Tensor:
        """A boolean mask over the packed parameter: True on the affine stage's tensors ``names``."""
        packed = self._packed()
        mask = torch.zeros(packed.shape, dtype=torch.bool, device=packed.device)
        for name in names:
            slot = self._packing.named.get(name)
            if slot is not None:
                mask[slot.start : slot.stop] = True
        return mask

    @property
    def untrained(self) -> bool:
        """Whether the packed parameter still holds the values it was set up with (not trained, not loaded)."""
        held = self.__dict__.get("_initial_fingerprint")
        return held is not None and held == packed_fingerprint(self._packed())

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, with an error that says which guide a state dict fits."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            raise GuideSetupError(
                f"this state dict does not fit the AutoFlowGuide of model {self._model_name!r} "
                f"({str(error).strip().splitlines()[-1].strip()[:300]}): it was saved from a guide of another "
                "model, sites or options, or before set-up. Load it into a guide built the same way and set "
                "up by one call with the same data, or rebuild the guide for this model."
            ) from error

    @contextlib.contextmanager
    def without_flow(self) -> Iterator[Any]:
        """Within this context the guide is its affine stage alone.

        That is the Gaussian the guide starts as (the flow starts at the
        identity), at a fraction of the flow's cost; :func:`~pyro_flowguide.train.gaussian_stage`
        fits it so.
        """
        self.__dict__["_without_flow"] = True
        try:
            yield self
        finally:
            self.__dict__.pop("_without_flow", None)
            self.clear_cache()

    # ------------------------------------------------------------ summaries
    @torch.no_grad()
    def _summary_latent(self, args: tuple, kwargs: dict) -> Tensor:
        """``summary_draws`` flat latents drawn with ``summary_seed``, the global random state untouched.

        The base draws come in antithetic pairs (each draw and its negation), so
        the summaries of a posterior symmetric about its centre (the Gaussian
        the guide starts as, among others) are exact at that centre.
        """
        posterior = self.get_posterior(*args, **kwargs)
        with torch.random.fork_rng(devices=rng_devices()):
            torch.manual_seed(self.summary_seed)
            half = posterior.base.sample(((self.summary_draws + 1) // 2,))
            latent = forward_with_ladj(posterior.parts, torch.cat([half, -half]))[0]
            self.clear_cache()
            return self._centered_latent(latent, args, kwargs)

    @torch.no_grad()
    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The posterior mean and standard deviation of each flat unconstrained coordinate, from the summary draws.

        Pyro's Gaussian autoguides return their closed-form moments here; a flow
        has none, so these are estimates from the same ``summary_draws`` seeded
        draws as :meth:`quantiles` (the same on every call).
        """
        latent = self._summary_latent(args, kwargs)
        return latent.mean(0), latent.std(0)

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior quantiles of each latent site (constrained space), from ``summary_draws`` seeded draws.

        Quantiles are taken per coordinate of the unconstrained draws and mapped
        through each site's bijection, so they are exact for every monotone
        per-coordinate constraint and a consistent summary otherwise. The draws
        are the same on every call (``summary_seed``, on a fork of the random
        state), so repeated calls agree and ``median()`` is ``quantiles([0.5])``.
        """
        q = checked_quantiles(quantiles)
        latent = self._summary_latent(args, kwargs)
        q = q.to(dtype=latent.dtype, device=latent.device)
        return self._constrained(torch.quantile(latent, q, dim=0))

    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The posterior median of each latent site (constrained space): ``quantiles([0.5])``."""
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}


class SeededSummaries:
    """``quantiles`` and ``median`` from seeded draws of the guide's ``sample_posterior(num_samples, *args, **kwargs)``.

    The draws use ``summary_seed`` on a fork of the random state, so repeated
    calls agree, the global random state is left alone, and ``median()`` is
    ``quantiles([0.5])``.
    """

    #: The seed of the draws behind :meth:`median` and :meth:`quantiles`.
    summary_seed: int = 0

    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Posterior quantiles of every latent site (per datum for local sites), from ``num_samples`` seeded draws."""
        checked = checked_quantiles(quantiles)
        with torch.random.fork_rng(devices=rng_devices()):
            torch.manual_seed(self.summary_seed)
            draws = self.sample_posterior(num_samples, *args, **kwargs)
        out = {}
        for name, value in draws.items():
            q = checked.to(dtype=value.dtype, device=value.device)
            out[name] = torch.quantile(value, q, dim=0)
        return out

    def median(self, *args: Any, num_samples: int = 1000, **kwargs: Any) -> dict[str, Tensor]:
        """The posterior median of every latent site (per datum for local sites): ``quantiles([0.5])``."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, num_samples=num_samples, **kwargs).items()}
