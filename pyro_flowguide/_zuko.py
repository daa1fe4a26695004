"""Import Zuko without changing the process-wide state of torch.distributions.

Importing ``zuko.distributions`` sets ``torch.distributions.Distribution._validate_args``
to ``False`` for every model in the process, which silently switches off Pyro's
argument checks, and replaces ``Distribution.arg_constraints`` by ``{}``, which
hides torch's warning about distributions that declare no constraints. Every
module of this package imports Zuko from here, so both are restored right
after Zuko's first import. (Zuko's ``Transform.call_and_ladj`` method stays:
Zuko's own transforms call it.)
"""

from torch.distributions import Distribution

_validate_before = Distribution._validate_args
_arg_constraints_before = Distribution.__dict__["arg_constraints"]

import zuko  # noqa: E402
import zuko.flows  # noqa: E402
import zuko.lazy  # noqa: E402
import zuko.nn  # noqa: E402

Distribution._validate_args = _validate_before
Distribution.arg_constraints = _arg_constraints_before

__all__ = ["zuko"]
