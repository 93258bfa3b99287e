"""Model core shared by every domain of dfmamba_st: selective scan, Mamba, DF-Mamba, curves and training.

Nothing here knows about genes, images or calendars.
"""

from . import curves
from .fractal import DFMamba, FractalAux
from .mamba import Mamba
from .scan import available_backends, resolve_backend, selective_scan, selective_scan_reference
from .training import (
    TrainResult,
    cosine_with_warmup,
    count_parameters,
    distributed_context,
    fingerprint,
    fit,
    isolated_global_state,
    resolve_device,
    seed_everything,
)

__all__ = [
    "DFMamba",
    "FractalAux",
    "Mamba",
    "TrainResult",
    "available_backends",
    "cosine_with_warmup",
    "count_parameters",
    "curves",
    "distributed_context",
    "fingerprint",
    "fit",
    "isolated_global_state",
    "resolve_backend",
    "resolve_device",
    "seed_everything",
    "selective_scan",
    "selective_scan_reference",
]
