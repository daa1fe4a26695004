"""Checks of a model's sites shared by :class:`~pyro_flowguide.AutoFlowGuide` and the amortized guide."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Transform, biject_to

from ..flows.registry import FlowSpec

__all__ = [
    "GuideSetupError",
    "check_continuous_unsubsampled",
    "checked_arg_shapes",
    "TraceSignature",
    "bijection",
    "check_finite_at_init",
    "check_flow_sites",
    "check_init_value",
    "check_latent_names",
    "check_model_call",
    "check_options",
    "check_setup_trace",
    "check_stable_sites",
    "find_bad_data",
    "flat_layout",
    "named_setup_errors",
    "shapes_of",
    "with_feasible_fallback",
]


class GuideSetupError(ValueError):
    """A model that this guide cannot serve, with the site and the fix in the message."""


def bijection(site: dict) -> Transform:
    """``biject_to(site support)``, or an error that names the site and the fix."""
    try:
        return biject_to(site["fn"].support)
    except NotImplementedError:
        support, name = site["fn"].support, site["name"]
        fix = (
            f"reparametrise it with poutine.reparam(model, config={{{name!r}: ProjectedNormalReparam()}})"
            if support is constraints.sphere
            else "reparametrise it (e.g. a covariance matrix as scales times an LKJCholesky factor)"
        )
        raise GuideSetupError(
            f"site {name!r} has support {support}, which has no bijection to "
            f"unconstrained space; {fix} or guide it separately."
        ) from None


def check_continuous_unsubsampled(name: str, site: dict, model_name: str, guide: str) -> None:
    """Raises :class:`GuideSetupError` for a discrete latent site or one inside a subsampled plate."""
    fn = site["fn"]
    if fn.support.is_discrete:
        raise GuideSetupError(
            f"site {name!r} of model {model_name!r} is discrete ({type(fn).__name__}); {guide} "
            "covers continuous latents only. Enumerate it out (@config_enumerate with TraceEnum_ELBO; "
            f"see https://pyro.ai/examples/enumeration.html) or use AutoGuideList with {guide} on "
            "poutine.block(model, hide=[...]) and a discrete guide such as AutoDiscreteParallel for this site."
        )
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.full_size != frame.size:
            raise GuideSetupError(
                f"site {name!r} of model {model_name!r} is inside plate {frame.name!r}, which is "
                f"subsampled ({frame.size} of {frame.full_size}); {guide} keeps its parameters "
                "over the whole plate and cannot follow a changing subset of it. Use "
                f"AutoAmortizedFlowGuide(model, amortized={{{name!r}: ...}}) for local latents, "
                "or do not subsample."
            )


def checked_arg_shapes(held: Any, signature: TraceSignature, guide, model_name: str, args: tuple, kwargs: dict) -> Any:
    """The shapes of ``args`` and ``kwargs``; when they differ from ``held``, after checking that the latent shapes did not change.

    See :func:`check_model_call`, which raises if they did; ``guide.model`` is
    read only then (a guide loaded from a pickle has none).
    """
    shapes = shapes_of(args, kwargs)
    if shapes != held:
        check_model_call(signature, guide.model, model_name, args, kwargs)
    return shapes


def with_feasible_fallback(init_loc_fn: Callable) -> Callable:
    """Falls back to a feasible point for sites that cannot be sampled (ImproperUniform).

    A discrete site gets a draw: it is enumerated, or refused with its fix once the trace is read.
    """

    def init(site: dict) -> Tensor:
        try:
            value = init_loc_fn(site)
        except NotImplementedError:
            if site["fn"].support.is_discrete:  # init_to_feasible has no point of a discrete support
                return site["fn"].sample()
            to_support = bijection(site)
            return to_support(torch.zeros(to_support.inverse_shape(site["fn"].shape())))
        return check_init_value(site, value)

    return init


def _count(bad: Tensor, what: str) -> str:
    n = int(bad.sum())
    return f"{n} {what} value{'s' if n != 1 else ''} of {bad.numel()}"


def _nonfinite(value: Tensor) -> str:
    """``"3 NaN values of 50"`` (or infinite ones), for a tensor known to hold some."""
    nan, inf = torch.isnan(value), torch.isinf(value)
    parts = [_count(nan, "NaN")] if nan.any() else []
    parts += [_count(inf, "infinite")] if inf.any() else []
    return " and ".join(parts)


def check_init_value(site: dict, value: Any) -> Any:
    """Raises unless an initial value suits its latent site: its shape, finite, inside the support.

    A value that broadcasts to the site's shape is expanded to it; a Python
    number or array becomes a tensor of the default dtype. Called by
    :func:`with_feasible_fallback` for every value the init strategy returns.
    """
    if isinstance(value, (int, float, list, tuple)) or type(value).__module__ == "numpy":
        try:
            value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError):
            pass  # not numeric: refused below, or by Pyro
    if not torch.is_tensor(value):
        return value
    name, fn = site["name"], site["fn"]
    shape = fn.shape()
    fix = "pass init_loc_fn=init_to_value(values={...}) with a value of that shape inside the support, or init_to_median"
    if value.shape != shape:
        try:
            broadcast = torch.broadcast_shapes(value.shape, shape) == shape
        except RuntimeError:
            broadcast = False
        if not broadcast:
            raise GuideSetupError(
                f"the initial value of latent site {name!r} has shape {tuple(value.shape)}, but the site "
                f"({type(fn).__name__}) has shape {tuple(shape)}; {fix}"
            )
        value = value.expand(shape)
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise GuideSetupError(f"the initial value of latent site {name!r} has {_nonfinite(value)}; {fix}")
    try:
        inside = fn.support.check(value)
    except (NotImplementedError, RuntimeError, ValueError):  # e.g. a dependent support: not checkable
        return value
    shown = value.tolist() if value.numel() <= 6 else f"of shape {tuple(value.shape)}"
    if not bool(torch.as_tensor(inside).all()):
        outside = ~torch.as_tensor(inside)
        raise GuideSetupError(
            f"the initial value of latent site {name!r} ({shown}) is outside the support {fn.support} of "
            f"its {type(fn).__name__} distribution at {int(outside.sum())} of {outside.numel()} positions; {fix}"
        )
    try:
        edge = not torch.isfinite(biject_to(fn.support).inv(value)).all()
    except NotImplementedError:
        edge = False
    if edge:
        raise GuideSetupError(
            f"the initial value of latent site {name!r} ({shown}) is on the boundary of the support "
            f"{fn.support} of its {type(fn).__name__} distribution, where the guide's unconstrained "
            f"coordinate is infinite; {fix}"
        )
    return value


def shapes_of(args: tuple, kwargs: dict) -> tuple:
    def shape(v: Any) -> Any:
        if torch.is_tensor(v):
            return tuple(v.shape)
        # Sizes are often passed as plain numbers.
        return v if isinstance(v, (int, float, str, bool)) else None

    return tuple(shape(a) for a in args), tuple(sorted((k, shape(v)) for k, v in kwargs.items()))


def check_flow_sites(prototype_trace, model_name: str, refused_support: FlowSpec | None) -> None:
    """The latent sites :class:`~pyro_flowguide.AutoFlowGuide` serves: continuous, not subsampled, real.

    Arguments:
        prototype_trace: The guide's trace of the model.
        model_name: The model's name, for the messages.
        refused_support: A registry family of non-real support given as the flow, or ``None``.
    """
    for name, site in prototype_trace.iter_stochastic_nodes():
        fn = site["fn"]
        if not fn.support.is_discrete:
            bijection(site)
        check_continuous_unsubsampled(name, site, model_name, "AutoFlowGuide")
        if refused_support is not None:
            raise GuideSetupError(
                f"flow {refused_support.name!r} models circular features in "
                f"[-pi, pi), but site {name!r} (support {fn.support}) is mapped to "
                "unbounded unconstrained space by this guide; use 'NSF' instead."
            )


def check_finite_at_init(model: Callable, model_name: str, args: tuple, kwargs: dict):
    """Raises if any site's log density is non-finite at the initial values (every gradient would be NaN).

    ``model`` is the model as the guide runs it (under its initialisation
    strategy); observed sites count too. Returns the trace (for
    :meth:`TraceSignature.of`).
    """
    with torch.no_grad(), named_setup_errors(model, model_name, args, kwargs):
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        with torch.no_grad(), named_setup_errors(model, model_name, args, kwargs):
            lp = site["fn"].log_prob(site["value"])
        if not torch.isfinite(lp).all():
            problem = _site_problem(site, _argument_names(model, args, kwargs))
            kind = "observed" if site["is_observed"] else "latent"
            raise GuideSetupError(
                f"{kind} site {name!r} of model {model_name!r} has a non-finite "
                f"log density at the initial values{f' ({problem})' if problem else ''}; check its parameters "
                "and data, or pass init_loc_fn=init_to_value(values={...}) / init_to_feasible."
            )
    return trace


def _argument_names(model: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The model's arguments by name (``"argument 0"`` where the signature does not tell)."""
    for _ in range(8):  # a model wrapped by Pyro's handlers: partial(_context_wrap, messenger, model)
        inner = getattr(getattr(model, "func", None), "args", None)
        if not inner or not callable(inner[-1]):
            break
        model = inner[-1]
    try:
        return dict(inspect.signature(model).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {**{f"argument {i}": a for i, a in enumerate(args)}, **kwargs}


def _bad_arguments(named: dict[str, Any]) -> list[str]:
    return [
        f"argument {k!r} has {_nonfinite(v)}" if not k.startswith("argument ") else f"{k} has {_nonfinite(v)}"
        for k, v in named.items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]


def _bad_parameters(fn: Any) -> list[str]:
    """``"loc has 3 NaN values of 50"`` for each non-finite parameter of a distribution (wrappers unwrapped)."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    found = []
    for key in getattr(fn, "arg_constraints", {}):
        value = fn.__dict__.get(key)  # lazy parameters (logits of probs) are not computed here
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            found.append(f"its {key} has {_nonfinite(value)}")
    return found


def _site_problem(site: dict, named: dict[str, Any]) -> str:
    """What is non-finite about a site: its observed value, its distribution's parameters, the arguments."""
    value = site["value"]
    found = []
    if site["is_observed"] and torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
        found.append(f"its observed value has {_nonfinite(value)}")
    params = _bad_parameters(site["fn"])
    found += params
    if params:
        found += _bad_arguments(named)
    return "; ".join(found)


def find_bad_data(model: Callable, args: tuple, kwargs: dict) -> str | None:
    """Names the first site whose data or distribution is not finite, or whose data do not fit it, or ``None``.

    Runs the model once, with Pyro's validation off, so that the site is reached
    rather than whichever distribution met the value first.
    """
    from .supports import not_tensors, observed_value_problem  # they import this module's error

    named = _argument_names(model, args, kwargs)
    try:
        with pyro.validation_enabled(False), torch.no_grad():
            trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    except Exception:  # the model fails for other reasons too: report what the arguments show
        bad = _bad_arguments(named)
        return f"{'; '.join(bad)}; pass finite data (drop or impute those values)" if bad else not_tensors(named)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        kind = "factor" if type(site["fn"]).__name__ == "Unit" else "observed" if site["is_observed"] else "latent"
        problem = _site_problem(site, named)
        if problem:
            fix = (
                "drop or impute the non-finite data, or leave them out of the likelihood with obs_mask= or poutine.mask"
                if site["is_observed"]
                else "pass finite covariates and parameters"
            )
            return f"{kind} site {name!r}: {problem}; {fix}"
        misfit = kind == "observed" and observed_value_problem(site)
        if misfit:  # it says what to do
            return f"observed site {name!r}: {misfit}"
    return None


@contextmanager
def named_setup_errors(model: Callable, model_name: str, args: tuple, kwargs: dict) -> Iterator[None]:
    """Turns an error from deep inside the set-up trace into a :class:`GuideSetupError` naming the site.

    Where the model's data or covariates are not finite (see :func:`find_bad_data`);
    other errors pass unchanged.
    """
    try:
        yield
    except GuideSetupError:
        raise
    except (ValueError, RuntimeError, TypeError, AttributeError, IndexError) as error:
        problem = find_bad_data(model, args, kwargs)
        if problem is None:
            raise
        raise GuideSetupError(f"model {model_name!r}, {problem}") from error


def _latents(trace) -> dict[str, dict]:
    nodes = trace.nodes.items()
    return {n: s for n, s in nodes if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}


_NEW_GUIDE = "build a new guide for this model call, or make the latent shapes not depend on the arguments"


@dataclass(frozen=True)
class TraceSignature:
    """The sample sites of one model trace: each latent's shape and support, and the observed sites' names.

    Taken at set-up; :meth:`check` compares a later trace in one pass over its sites.
    """

    latents: tuple[tuple[str, tuple[int, ...], str], ...]
    observed: frozenset[str]

    @classmethod
    def of(cls, trace) -> TraceSignature:
        """The signature of a full trace of the model (observed sites included)."""
        latents = tuple((n, tuple(s["value"].shape), str(s["fn"].support)) for n, s in _latents(trace).items())
        observed = frozenset(
            n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"] and not site_is_subsample(s)
        )
        return cls(latents, observed)

    def check(self, trace, model_name: str) -> None:
        """Raises unless ``trace`` has the same latents with the same shapes and supports.

        A site observed at set-up may be latent now (``y=None`` for predictions):
        the model draws it, the guide does not.
        """
        new = _latents(trace)
        for name, shape, support in self.latents:
            site = new.get(name)
            if site is None:
                raise GuideSetupError(
                    f"latent site {name!r} of model {model_name!r} is not drawn in this call, but was when the "
                    f"guide was set up; {_NEW_GUIDE}"
                )
            if tuple(site["value"].shape) != shape:
                raise GuideSetupError(
                    f"latent site {name!r} changed shape between calls of model {model_name!r}: {shape} when the "
                    f"guide was set up, {tuple(site['value'].shape)} now; the guide would serve the old shape. "
                    f"{_NEW_GUIDE[0].upper()}{_NEW_GUIDE[1:]} (AutoAmortizedFlowGuide for per-datum latents)."
                )
            if str(site["fn"].support) != support:
                raise GuideSetupError(
                    f"latent site {name!r} of model {model_name!r} changed support: {support} when the guide was "
                    f"set up, {site['fn'].support} now; {_NEW_GUIDE}"
                )
        known = {n for n, _, _ in self.latents} | self.observed
        for name, site in new.items():
            if name not in known:
                raise GuideSetupError(
                    f"latent site {name!r} of model {model_name!r} (shape {tuple(site['value'].shape)}) was not "
                    "in the model when the guide was set up, so the guide would leave it to its prior; "
                    f"{_NEW_GUIDE}"
                )


def check_latent_names(names, trace, model_name: str) -> None:
    """Raises at the first trace whose latent sites are not ``names``: stochastic control flow.

    Arguments:
        names: The guide's latent site names.
        trace: A trace of the model (observed sites are ignored).
        model_name: The model's name, for the message.
    """
    drawn = set(_latents(trace))
    missing, extra = sorted(set(names) - drawn), sorted(drawn - set(names))
    if missing or extra:
        what = f"site {extra[0]!r} is drawn now but was not" if extra else f"site {missing[0]!r} is not drawn now but was"
        raise GuideSetupError(
            f"the latent sites of model {model_name!r} differ between runs: {what} when the guide was set up, "
            "with the same arguments. The set of sample sites depends on a random draw (stochastic control "
            "flow), which a guide over one fixed latent vector cannot follow: draw every site in every run "
            "(poutine.mask the branch not taken), or marginalise the branch out (a discrete choice with "
            "@config_enumerate)."
        )


def check_stable_sites(model: Callable, prototype_trace, model_name: str, args: tuple, kwargs: dict, runs: int = 3) -> None:
    """Runs the model ``runs`` times from its prior and checks each run's latents and their supports.

    See :func:`check_latent_names` and :func:`~pyro_flowguide.guides.supports.check_same_supports`.
    Best effort: a model that cannot run from its prior (an ``ImproperUniform``
    site) is not checked.
    """
    from .supports import check_same_supports  # it imports this module's error

    names = [name for name, _ in prototype_trace.iter_stochastic_nodes()]
    for _ in range(runs):
        try:
            with torch.no_grad():
                trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        except Exception:
            return
        check_latent_names(names, trace, model_name)
        check_same_supports(prototype_trace, trace, model_name)


def check_setup_trace(
    model: Callable, bare_model: Callable, model_name: str, prototype_trace, args: tuple, kwargs: dict
) -> TraceSignature:
    """The set-up checks on fresh traces; returns the signature that later calls are checked against.

    :func:`check_finite_at_init` on ``model`` (the model under the guide's
    initialisation strategy), then :func:`check_stable_sites` on ``bare_model``
    with the prototype's latent sites.
    """
    signature = TraceSignature.of(check_finite_at_init(model, model_name, args, kwargs))
    with torch.random.fork_rng():  # the extra runs leave the caller's random stream as it was
        check_stable_sites(bare_model, prototype_trace, model_name, args, kwargs)
    return signature


def check_model_call(signature: TraceSignature, model: Callable, model_name: str, args: tuple, kwargs: dict) -> None:
    """Traces the model with new arguments, on a copy of the random state, and checks it against ``signature``."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        signature.check(poutine.block(poutine.trace(model).get_trace)(*args, **kwargs), model_name)


def check_options(noncentered: Any, init_scale: Any, estimator: Any, covariance: Any) -> bool | str | tuple:
    """Checks :class:`~pyro_flowguide.AutoFlowGuide`'s options; returns ``noncentered`` normalised.

    ``True`` becomes ``"auto"`` and a list of names a tuple.
    """
    if isinstance(noncentered, str) and noncentered != "auto":
        raise ValueError(
            f"noncentered must be 'auto', True, False or a list of site names, got {noncentered!r}"
        )
    if noncentered is True:
        noncentered = "auto"
    if not (isinstance(init_scale, (int, float)) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
    if estimator not in ("auto", "reparam", "stl"):
        raise ValueError(
            f"estimator must be 'auto', 'reparam' (plain reparameterisation gradient) "
            f"or 'stl' (sticking the landing), got {estimator!r}"
        )
    if covariance not in (None, "full", "diagonal"):
        raise ValueError(f"covariance must be 'full' or 'diagonal', got {covariance!r}")
    return noncentered if isinstance(noncentered, (bool, str)) else tuple(noncentered)


def flat_layout(prototype_trace, model_name: str) -> tuple[dict, dict]:
    """Each latent site's unconstrained shape and plate stack; raises if there is no latent site."""
    shapes, stacks = {}, {}
    for name, site in prototype_trace.iter_stochastic_nodes():
        shapes[name] = biject_to(site["fn"].support).inv(site["value"]).shape
        stacks[name] = site["cond_indep_stack"]
    if sum(math.prod(shape) for shape in shapes.values()) == 0:
        raise GuideSetupError(
            f"model {model_name!r} has no latent sample sites: every "
            "pyro.sample is observed, so there is no posterior to fit. "
            "Use an empty guide instead."
        )
    return shapes, stacks
