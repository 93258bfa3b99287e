"""Plotting: fractal gates, spatial domains, training curves, the choice of the number of domains.

Every function takes ``ax=``, ``show=`` and ``return_fig=``.
"""

from ._plots import bic, domains, gates, training

__all__ = ["bic", "domains", "gates", "training"]
