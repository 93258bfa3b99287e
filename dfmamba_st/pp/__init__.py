"""Preprocessing: turn a tissue into sequences (space-filling curves) and coarsen it."""

from ._coarsen import coarsen
from ._serialize import LibraryLayout, library_layouts, serialize, spot_cells

__all__ = ["LibraryLayout", "coarsen", "library_layouts", "serialize", "spot_cells"]
