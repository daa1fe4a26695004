"""Module names of the previous release, kept as aliases for one release."""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["MOVED", "alias_module"]

#: Old module (under ``pyro_flowguide``) -> the module that now holds its public names.
MOVED = {
    "amortized": "pyro_flowguide.guides.amortized",
    "arviz": "pyro_flowguide.diagnostics.inference_data",
    "density": "pyro_flowguide.train.density",
    "distributed": "pyro_flowguide.train.lightning",
    "elbo": "pyro_flowguide.train.losses",
    "infer": "pyro_flowguide.train",
    "plots": "pyro_flowguide.diagnostics.plots",
}


def alias_module(old: str) -> None:
    """Makes the module ``old`` (a full name) an alias of its new home, with a ``DeprecationWarning``."""
    new = MOVED[old.rpartition(".")[2]]
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import from {new} "
        "(or from pyro_flowguide) instead",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
