"""Deprecated alias of :mod:`pyro_flowguide.diagnostics.plots`; it goes in the next release."""

from ._deprecated import alias_module

alias_module(__name__)
