"""Plotting: fractal gates, spatial domains, training curves, the choice of the number of domains.

Every function takes ``ax=``, ``show=`` and ``return_fig=``. Figure sizes scale with ``rcParams['figure.figsize']``
and legend text with ``rcParams['font.size']``, so ``sc.set_figure_params(figsize=..., fontsize=...)`` applies to
them as to scanpy's plots.
"""

from ._plots import bic, domains, gates, training

__all__ = ["bic", "domains", "gates", "training"]
