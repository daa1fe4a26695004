"""Tracing a guide and its model: the one place the package does it."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from contextlib import nullcontext

import pyro
from pyro import poutine
from pyro.poutine import runtime
from pyro.poutine.util import prune_subsample_sites

__all__ = ["max_plate_nesting", "outside_handlers", "trace_model_and_guide"]


@contextlib.contextmanager
def outside_handlers() -> Iterator[None]:
    """Runs a block as if no handler were active: as at the top level of a script.

    Within it, no handler of the caller (an ELBO's trace, a particle plate, a
    ``block`` or ``condition``) sees or changes a site, and plates allocate
    their dims afresh; on exit the caller's handlers and dims are back as
    they were. A guide that fits itself during its first call (inside an
    ELBO's trace) runs that fit here.
    """
    stack = list(runtime._PYRO_STACK)
    dims = list(runtime._DIM_ALLOCATOR._stack)
    enum = copy.copy(vars(runtime._ENUM_ALLOCATOR))
    runtime._PYRO_STACK.clear()
    runtime._DIM_ALLOCATOR._stack.clear()
    try:
        yield
    finally:
        runtime._PYRO_STACK[:] = stack
        runtime._DIM_ALLOCATOR._stack[:] = dims
        vars(runtime._ENUM_ALLOCATOR).clear()
        vars(runtime._ENUM_ALLOCATOR).update(enum)


def trace_model_and_guide(model, guide, args, kwargs, draws: tuple[str, int, int] | None = None):
    """Traces the guide and the model replayed on it, once, hidden from outer handlers.

    Arguments:
        model, guide: A Pyro model and guide.
        args, kwargs: Their arguments.
        draws: ``(name, size, dim)`` of a plate of vectorised draws to run both
            under, or ``None`` for one draw.
    """
    plate = nullcontext() if draws is None else pyro.plate(draws[0], draws[1], dim=draws[2])
    with poutine.block(), plate:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def max_plate_nesting(*traces) -> int:
    """How many batch dimensions the vectorised plates of ``traces`` use (0 without plates).

    Example:
        >>> import pyro, torch, pyro.distributions as dist
        >>> def model():
        ...     with pyro.plate("a", 3), pyro.plate("b", 2):
        ...         pyro.sample("x", dist.Normal(torch.zeros(2, 3), 1.0))
        >>> max_plate_nesting(*trace_model_and_guide(model, lambda: None, (), {}))
        2
    """
    dims = [
        frame.dim
        for trace in traces
        for site in prune_subsample_sites(trace).nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0
