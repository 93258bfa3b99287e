"""Preprocessing: turn a tissue into sequences (space-filling curves) and coarsen it."""

from ._coarsen import coarsen
from ._serialize import serialize, spot_cells

__all__ = ["coarsen", "serialize", "spot_cells"]
