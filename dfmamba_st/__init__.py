"""dfmamba_st: spatial domains from spatial transcriptomics with DF-Mamba, in scanpy style.

Examples
--------
>>> import dfmamba_st as dfm
>>> sorted(m for m in ("pp", "tl", "pl", "metrics", "datasets", "ts", "pathology", "core") if hasattr(dfm, m))
['core', 'datasets', 'metrics', 'pathology', 'pl', 'pp', 'tl', 'ts']
"""

from . import core, datasets, metrics, pathology, pl, pp, tl, ts
from ._threads import set_threads
from ._version import __version__

__all__ = ["__version__", "core", "datasets", "metrics", "pathology", "pl", "pp", "set_threads", "tl", "ts"]
