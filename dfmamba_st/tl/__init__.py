"""Tools: learn the DF-Mamba embedding of a tissue and cluster it into spatial domains."""

from ._cluster import choose_n_clusters, cluster, library_specific_domains, refine_labels
from ._embed import PRESETS, embed
from ._model import SpatialConfig, SpatialDFMamba, load_model, save_model

__all__ = [
    "PRESETS",
    "SpatialConfig",
    "SpatialDFMamba",
    "choose_n_clusters",
    "cluster",
    "embed",
    "library_specific_domains",
    "load_model",
    "refine_labels",
    "save_model",
]
