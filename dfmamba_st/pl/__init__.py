"""Plotting: fractal gates, spatial domains, training curves.

Every function takes ``ax=``, ``show=`` and ``return_fig=``.
"""

from ._plots import domains, gates, training

__all__ = ["domains", "gates", "training"]
