"""Deprecated alias of :mod:`pyro_flowguide.train.lightning`; it goes in the next release."""

from ._deprecated import alias_module

alias_module(__name__)
