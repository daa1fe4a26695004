"""Import Zuko without changing the process-wide state of torch.distributions.

Importing ``zuko.distributions`` sets ``torch.distributions.Distribution._validate_args``
to ``False`` for every model in the process, which silently switches off Pyro's
argument checks. Every module of this package imports Zuko from here, so the
user's setting is restored right after Zuko's first import.
"""

from torch.distributions import Distribution

_validate_before = Distribution._validate_args

import zuko  # noqa: E402
import zuko.flows  # noqa: E402
import zuko.lazy  # noqa: E402
import zuko.nn  # noqa: E402

Distribution._validate_args = _validate_before

__all__ = ["zuko"]
