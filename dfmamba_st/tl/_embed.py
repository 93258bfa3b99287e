"""tl.embed: self-supervised DF-Mamba over the serialized tissue → a per-spot embedding."""

from __future__ import annotations

import inspect
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg
from tqdm.auto import tqdm

from .._utils import (
    check_adata,
    check_key_added,
    check_library_key,
    check_outputs,
    embed_record_key,
    h5ad_safe,
    resolve_library_key,
    seed_number,
    serialized_rows,
    user_stacklevel,
    versions,
    warn_pooled_slices,
    whole_number,
    written_by,
)
from ..core import (
    curves,
    distributed_context,
    fingerprint,
    fit,
    isolated_global_state,
    resolve_device,
    seed_everything,
)
from ..pp._serialize import identical_positions, library_layouts, serialized_orders
from ._features import (
    COUNTS_TARGET,
    FeatureTransform,
    expression_matrix,
    expression_name,
    input_kind,
    naming_hint,
    smooth,
)
from ._model import SpatialConfig, SpatialDFMamba, load_model, model_file_read, model_fingerprint

__all__ = ["PRESETS", "embed"]

#: Named settings. "cpu" is the default on machines without a GPU; "paper" is the paper's ST model configuration
#: (3,000 HVGs, d_model 3,000, K 3, N 16), meant for a GPU. Its tokens are the package's, as for "cpu": a spot's
#: 3,000 standardised genes next to their neighbourhood mean (6,000 values, projected to d_model), and its training
#: budget (30 × 10 steps of 4 windows of 1,024 spots) is the package's, not the paper's 200 epochs.
PRESETS: dict[str, dict] = {
    "cpu": dict(
        n_top_genes=3000,
        n_pcs=50,
        d_model=64,
        depth=3,
        d_state=16,
        # 20 × 10 steps: 30.3-31.0 s per DLPFC slice (serialize + embed + cluster of the bundled 151673, one CPU
        # thread, alone on the machine; docs/spatial.md, "Current defaults")
        epochs=20,
        steps_per_epoch=10,
        lr=3e-3,
        window=512,
        batch_windows=4,
        # the model kept is a moving average of the weights, time constant half the steps (docs/spatial_log.md)
        ema_fraction=0.5,
    ),
    "paper": dict(
        n_top_genes=3000,
        n_pcs=None,
        d_model=3000,
        depth=3,
        d_state=16,
        epochs=30,
        steps_per_epoch=10,
        lr=1e-4,
        window=1024,
        batch_windows=4,
        ema_fraction=None,  # the average is measured on the CPU preset only (this preset: docs/spatial.md, "On a GPU")
    ),
}
MASK_RATIO = 0.3
#: at most this many tokens × d_model values go through the model at once during inference
INFER_BUDGET = 2**20


def _library_sequences(
    adata: AnnData, library_key: str | None, spatial_key: str, curve_names: tuple[str, ...]
) -> list[tuple[np.ndarray, np.ndarray, sp.csr_matrix]]:
    """Spot indices, orders along each curve and sparse neighbour graph of every library.

    Returns a list of ``(idx, orders, graph)``; ``orders`` is (n_curves, n_spots) over positions in ``idx``. Warns,
    as :func:`~dfmamba_st.pp.serialize` does, when spots share a position (slices pooled without a library key).
    """
    layouts = library_layouts(adata, library_key=library_key, spatial_key=spatial_key)
    warn_pooled_slices(
        adata,
        identical_positions(layouts),
        library_key,
        caller="dfm.tl.embed",
        shared="they are embedded as one tissue, their neighbourhoods mixed",
        unnamed="their spots averaged as neighbours",
    )
    return [(layout.idx, np.stack([layout.order(c) for c in curve_names]), layout.graph()) for layout in layouts]


def _tokens(features: np.ndarray, libraries, hops: int) -> np.ndarray:
    """Token of a spot: its features next to the mean over its neighbourhood (``hops`` rings), per library."""
    wide = np.empty_like(features)
    for idx, _, graph in libraries:
        wide[idx] = smooth(features[idx], graph, hops)
    return np.concatenate([features, wide], axis=1)


def _warn_empty_spots(X: sp.csr_matrix, layer: str | None) -> None:
    """Warn when spots have no expression at all (in any gene of ``X``): their embedding comes from their neighbours."""
    empty = int(np.sum(np.asarray(X.sum(axis=1)).ravel() == 0))  # (no negative values: checked)
    if empty:
        warnings.warn(
            f"{empty} of {X.shape[0]} spots have no expression in {expression_name(layer)}: their embedding comes "
            "from their neighbours alone, and tl.cluster will give them a domain. To leave them out, filter them "
            "first: sc.pp.filter_cells(adata, min_counts=1).",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _sample_windows(tokens: torch.Tensor, libraries, window: int, n_windows: int, gen: torch.Generator) -> torch.Tensor:
    """``n_windows`` random windows of ``window`` consecutive spots along a random curve of a random library.

    A fixed number of tokens per step, whatever the size of the tissue: training time does not grow with the
    number of spots. The step's first window draws its library in proportion to the libraries' spots. A library
    shorter than ``window`` gives a window of its whole sequence; the other windows of that step then have the same
    length, from libraries at least that long (so one small library does not shorten every window of every step, but
    is drawn less often than its share of spots).
    """
    sizes = np.array([lib[0].size for lib in libraries], dtype=np.float64)
    out = []
    length = None  # set by the step's first window
    for _ in range(n_windows):
        weights = sizes if length is None else np.where(sizes >= length, sizes, 0.0)
        lib = int(torch.multinomial(torch.from_numpy(weights / weights.sum()), 1, generator=gen))
        length = int(min(window, sizes[lib])) if length is None else length
        idx, orders, _ = libraries[lib]
        curve = int(torch.randint(orders.shape[0], (1,), generator=gen))
        begin = int(torch.randint(idx.size - length + 1, (1,), generator=gen))
        out.append(tokens[idx[orders[curve, begin : begin + length]]])
    return torch.stack(out)


#: The readout when neither the call nor a trained model (``model=``) sets it.
READOUT_DEFAULTS = {"readout": "concat", "readout_hops": 1}


def _unit_variance(block: np.ndarray) -> np.ndarray:
    """Centre a block of features and scale it to unit total variance (so blocks of any width weigh the same)."""
    block = block - block.mean(axis=0)
    total = float(np.sqrt((block**2).sum(axis=1).mean())) or 1.0
    return (block / total).astype(np.float32)


def _run_key(adata: AnnData, feature_tf: FeatureTransform, config: SpatialConfig, settings: dict, library_key) -> dict:
    """What identifies a training run besides ``fit``'s settings: its spots, genes, libraries and model settings."""
    return {
        "spots": fingerprint(adata.obs_names),
        "genes": fingerprint(feature_tf.genes),
        "libraries": None if library_key is None else fingerprint(adata.obs[library_key].astype(str)),
        "config": {k: v for k, v in asdict(config).items() if k != "extra"},
        "settings": settings,
    }


def _ema_decay(fraction: float | None, steps: int) -> float | None:
    """Decay of a moving average over about ``fraction`` of ``steps``; ``None`` (no average) below 2 steps."""
    if fraction is None or fraction * steps < 2:
        return None
    return 1.0 - 1.0 / (fraction * steps)


def _check_paper_on_cpu(preset: str, device: torch.device, d_model: int) -> None:
    """Warn when the paper's full-width configuration is about to train without a GPU."""
    if preset == "paper" and device.type != "cuda" and d_model == PRESETS["paper"]["d_model"]:
        warnings.warn(
            "preset='paper' (d_model 3,000 over 3,000-gene tokens) is meant for a GPU: on a 2-core CPU one of its 30 "
            "epochs and the inference over DLPFC 151673 (3,639 spots) took 451 s, at 7.7 GB (docs/spatial.md). "
            "preset='cpu' is the "
            "configuration measured on CPUs.",
            stacklevel=user_stacklevel(),
        )


def _warn_auto_paper(preset: str, preset_name: str) -> None:
    """Warn when ``preset="auto"`` chose the ``"paper"`` preset (on a GPU): its accuracy is not measured yet."""
    if preset == "auto" and preset_name == "paper":
        warnings.warn(
            "preset='auto' chose the 'paper' preset on this CUDA device; its accuracy is not measured yet "
            "(docs/spatial.md, 'On a GPU'). preset='cpu' is the measured configuration, and it runs on a GPU too.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _resolve_preset(preset: str, device: torch.device) -> str:
    if preset == "auto":
        return "paper" if device.type == "cuda" else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; use 'auto', {', '.join(repr(p) for p in PRESETS)}.")
    return preset


def _settings(
    preset_name: str,
    device: torch.device,
    world_size: int,
    *,
    n_top_genes: int | None,
    n_pcs: int | None,
    d_model: int | None,
    depth: int | None,
    epochs: int | None,
    ema_fraction: float | None,
    checkpoint_dir: str | Path | None,
) -> dict:
    """The training settings of a run: the preset's, with the options :func:`embed` was given, checked.

    ``None`` takes the preset's value, except for ``n_pcs`` and ``ema_fraction``, where ``None`` is a setting and
    ``-1`` takes the preset's value.
    """
    settings = dict(PRESETS[preset_name])
    for key, value in dict(n_top_genes=n_top_genes, d_model=d_model, depth=depth, epochs=epochs).items():
        if value is not None:
            settings[key] = value
    if n_pcs != -1:
        settings["n_pcs"] = n_pcs
    if ema_fraction != -1:
        settings["ema_fraction"] = ema_fraction
    for key in ("n_top_genes", "d_model", "depth"):
        settings[key] = whole_number(settings[key], key)
    settings["epochs"] = whole_number(settings["epochs"], "epochs", minimum=0)
    if not settings["epochs"] and checkpoint_dir is not None:
        warnings.warn(
            f"checkpoint_dir={str(checkpoint_dir)!r} is not used: epochs=0 trains nothing (the model keeps its "
            "initial weights).",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    if settings["n_pcs"] is not None:
        settings["n_pcs"] = whole_number(settings["n_pcs"], "n_pcs (None: the standardised genes themselves)")
    _check_paper_on_cpu(preset_name, device, settings["d_model"])
    if settings["ema_fraction"] is not None and not 0.0 < settings["ema_fraction"] <= 1.0:
        raise ValueError(f"ema_fraction must be None or lie in (0, 1], got {settings['ema_fraction']}.")
    if settings["batch_windows"] % world_size:
        raise ValueError(
            f"{settings['batch_windows']} windows per step cannot be shared out over {world_size} ranks; "
            "use a number of processes that divides it."
        )
    return settings


@isolated_global_state()
def embed(
    adata: AnnData,
    *,
    layer: str | None = None,
    n_top_genes: int | None = None,
    n_pcs: int | None = -1,
    d_model: int | None = None,
    depth: int | None = None,
    preset: Literal["auto", "cpu", "paper"] = "auto",
    epochs: int | None = None,
    ema_fraction: float | None = -1,
    hops: int = 2,
    readout_hops: int | None = None,
    readout: Literal["concat", "model"] | None = None,
    extra_curves: tuple[str, ...] = ("hilbert_t",),
    bidirectional: bool = False,
    library_key: str | None = None,
    order_key: str = "dfm_order",
    seed: int = 42,
    device: str = "auto",
    model: SpatialDFMamba | str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    tile_size: int = 8192,
    progress: bool = True,
    key_added: str = "X_dfm",
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | SpatialDFMamba | tuple[AnnData, SpatialDFMamba] | None:
    """Learn a per-spot embedding with DF-Mamba over the serialized tissue.

    Each spot becomes a token made of its expression features (log-normalised HVGs → PCA) and the mean over its
    spatial neighbourhood. The tissue is read as sequences along one or more space-filling curves (optionally each
    scanned in both directions); DF-Mamba is trained to reconstruct the tokens of randomly masked spots from the
    sequence, plus its auxiliary multi-scale losses. By default (``readout="concat"``) a spot's embedding is its
    neighbourhood expression next to its DF-Mamba output averaged over the curves and its ring of neighbours; see
    ``readout``.

    Parameters
    ----------
    adata
        Spots × genes, raw counts (``X`` or ``layers[layer]``) or log-normalised values, serialized by
        :func:`dfmamba_st.pp.serialize`. Log-normalised counts (``sc.pp.normalize_total`` then ``sc.pp.log1p``, any
        target) are taken back to their raw counts, exactly, so they give the embedding of the counts; other
        log-normalised values are used as they are, with a warning (see ``n_top_genes``).
    layer
        Layer holding the expression (default ``X``).
    n_top_genes
        Number of highly variable genes (scanpy's ``seurat_v3`` scores on counts, ``seurat`` on log-normalised
        values whose counts cannot be recovered, and on the log-normalised counts of a crop too small for
        ``seurat_v3``'s loess fit, with a warning; ``var['highly_variable']`` of an earlier scanpy call is not used:
        subset the AnnData to those genes to embed them;
        ties at the cut broken by gene name, so the choice is the same on every CPU); the preset's value by
        default.
    n_pcs
        Principal components per spot (``None``: the standardised genes themselves; ``-1``: the preset's value).
    d_model
        Width of the model (the preset's value by default).
    depth
        Fractal depth ``K`` (the preset's value by default).
    preset
        ``"cpu"`` (50 PCs, d_model 64; fast on a laptop), ``"paper"`` (the paper's model sizes: 3,000 genes without
        PCA, d_model 3,000; a GPU; tokens and training budget are the package's, see :data:`PRESETS`) or ``"auto"``
        (``"paper"`` on a CUDA device, else ``"cpu"``). The choice is recorded in ``uns['dfm']``.
        The ``"paper"`` preset's accuracy is not measured yet: ``"auto"`` warns when it chooses it, and at its full
        width it warns before training without a GPU (hours on a CPU); ``"cpu"`` on a GPU gave the same ARI as on a
        CPU (DLPFC 151673, seeds 0–2, 15–18 s, with the gene choice before the tie-break by name; ``docs/spatial.md``,
        "On a GPU").
    epochs
        Training epochs (each of the preset's ``steps_per_epoch`` steps). All are run: with no held-out data, the
        training loss is no model-selection criterion (its auxiliary multi-scale terms grow while the masked-spot
        error falls). ``0`` trains nothing: the model keeps the (seeded) initial weights its training would start
        from, a control for what training adds to the domains (on DLPFC, seeds 0-9 of three slices: the trained
        default 0.004 ARI higher, standard error 0.006; ``docs/spatial.md``, "Current defaults").
    ema_fraction
        The model kept is an exponential moving average of the weights, started at the first step and updated after
        every step, whose time constant is this fraction of the training steps (decay
        ``1 - 1 / (ema_fraction * steps)``; the CPU preset's 0.5 of its 200 steps is a decay of 0.99, which gives the
        last 100 steps about 63 % of the weight); ``None`` keeps the last weights; ``-1``: the preset's value (0.5 for
        ``"cpu"``, ``None`` for ``"paper"``). Measured with ``benchmarks/st_dlpfc.py``'s ``dfmamba_st`` job, seeds 0–9
        (ARI 151673 / 151674 / 151510): the average gave 0.584 / 0.583 / 0.538, the last weights 0.560 / 0.578 / 0.531,
        both with scanpy's own order of tied genes (``docs/spatial_log.md``, "A moving average of the weights").
    hops
        Rings of neighbours averaged into the neighbourhood half of a token.
    readout_hops
        The embedding of a spot is averaged over this many rings of neighbours (0: none); ``None``: 1, or with
        ``model=`` the setting the model was trained with (stored with it). Each curve passes only
        some of a spot's 2-D neighbours; the average merges what the passes through the neighbourhood saw.
        Measured on DLPFC (ARI, mean of seeds 0/1, 151673 / 151674 / 151510; both scan directions and 10 GMM restarts,
        the defaults then): 0.589 / 0.561 / 0.525 with one ring, 0.612 / 0.580 / 0.510 without; not a clear winner,
        see ``docs/spatial_log.md`` (ablations). Two rings, with the defaults of 2026-12-04 (seeds 0–9): 0.574 / 0.583 /
        0.552 against 0.584 / 0.583 / 0.538, but 0.525 against 0.522 on seeds 10–19 of 151510 and lower on the
        HER2ST sections (``docs/spatial_log.md``, "Eleven more changes for 151510").
    readout
        ``"concat"``: the embedding is the spot's neighbourhood expression (the second half of its token) next to
        the DF-Mamba state, each block scaled to unit total variance; ``"model"``: the DF-Mamba state alone;
        ``None``: ``"concat"``, or with ``model=`` the readout the model was trained with (stored with it).
        Measured as above: ``"concat"`` 0.589 / 0.561 / 0.525, ``"model"`` 0.541 / 0.598 / 0.499 (and the
        larger seed spread). The expression block alone (no model; ``--methods dfm_features`` of
        ``benchmarks/st_dlpfc.py``) scored 0.534 / 0.576 / 0.570 then, and 0.589 / 0.576 / 0.570 with 30 GMM restarts
        (seeds 0–2): on these slices the DF-Mamba block does not add ARI to its input (``docs/spatial_log.md``).
    extra_curves
        Curves read besides the one :func:`~dfmamba_st.pp.serialize` used (``"hilbert"``, ``"hilbert_t"``,
        ``"hilbert_s"``, ``"hilbert_ts"``, ``"zorder"``); that one, named here too, is read once, with a warning. A 1-D
        order breaks 2-D adjacency, a second curve restores part of it: measured as above, ``()`` (one curve) gives
        0.544 / 0.481 / 0.508. The shifted curves keep far more neighbour pairs close
        (``benchmarks/curve_adjacency.py``) but did not raise the ARI: all four Hilbert curves gave 0.566 / 0.583 /
        0.521 against 0.567 / 0.589 / 0.523 for the default of 2026-12-02, seeds 0–5 (``docs/spatial_log.md``, shifted
        curves).
    bidirectional
        Also scan every curve backwards (one set of weights, both outputs averaged), in nearly twice the time.
        Off by default: measured with ``benchmarks/st_dlpfc.py`` (2026-12-02, ``--embed bidirectional=true``, seeds
        0–2, ARI 151673 / 151674 / 151510) both directions gave 0.564 / 0.575 / 0.538 and one direction 0.561 / 0.580 /
        0.547 (``docs/spatial_log.md``). Ignored with ``model=`` (the model's own setting).
    library_key
        Column of ``obs`` naming each spot's slice; every slice is its own set of sequences. By default the one given
        to :func:`~dfmamba_st.pp.serialize` (recorded in ``uns[order_key]``).
    order_key
        Where :func:`~dfmamba_st.pp.serialize` stored the order.
    seed
        Random seed (weights, masks; a whole number from 0 to 2**32 - 1); the same seed on the same machine with the
        same number of threads gives the same embedding (one thread against two, for torch, BLAS and numba alike, moved
        values by up to 1.4e-4 on the bundled slice, seed 0, domains unchanged; ``docs/spatial_log.md``, 2026-12-06).
        The orientation of the tissue acts much like another seed: the curves, and so the sequences, follow the grid.
        The caller's random states and torch's determinism settings are put back afterwards.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``. On the CPU, every thread pool takes one thread per core unless set: next
        to other work that holds cores, fewer threads run faster; set them all with :func:`~dfmamba_st.set_threads`
        (``docs/spatial.md``, "Threads on a machine shared with other work").
    model
        A trained model (or the path of a saved one) to apply without training: genes are aligned by name and
        missing genes reported (a warning; with more than half of them missing it also asks whether the gene naming
        matches). Missing genes are set to their training mean; for a model trained on counts, each spot's total
        over the genes present is divided by their share of the training counts, so that they keep their training
        scale (model files written before that share was kept: no correction). The model's own settings apply: the
        training options (``n_top_genes``, ``n_pcs``, ``d_model``, ``depth``, ``preset``, ``epochs``,
        ``ema_fraction``, ``hops``, ``extra_curves``, ``bidirectional``, ``checkpoint_dir``) are ignored, with a
        warning when one is set to other than its default (a value equal to the default cannot be told from none;
        an unknown ``preset`` is an error, as without ``model=``). Raw counts and log-normalised input can be mixed
        between training and transfer: log-normalised counts are taken back to counts, other log-normalised values
        are converted to the model's kind, with a warning.
        A model object is moved to ``device`` first (in place, as :meth:`torch.nn.Module.to` does) and left in
        evaluation mode (``model.eval()``).
    checkpoint_dir
        Save the training state every epoch and resume from it (the same call after an interruption gives the
        embedding of an uninterrupted run). A folder holding the state of another run (other spots, genes, seed or
        settings) is refused, not resumed. Not used with ``epochs=0`` (a warning says so).
    tile_size
        Inference reads sequences longer than this in tiles of ``tile_size`` spots, each with about ``tile_size // 8``
        spots of context on both sides that are run but not kept, so memory does not grow with the tissue
        (a Visium slice, ≤ 4,992 spots, is one tile). A multiple of ``2**depth``, at least
        ``min_len * 2**(depth - 1)`` (32 with the defaults), the shortest sequence that reaches the deepest level;
        a tile shorter than that (the last one) takes more context.
    progress
        Show progress bars: the training, and the reading of a tissue large enough to take several batches of
        tiles.
    key_added
        Key of the embedding in ``obsm``. The run is recorded in ``uns['dfm']`` for the default ``"X_dfm"``, else in
        ``uns[key_added]`` (scanpy's rule for ``sc.pp.pca``), so several embeddings keep their own records
        (``"dfm"`` itself is refused: its record would replace that of ``"X_dfm"``). Entries of these names that
        :func:`embed` did not write (coordinates in ``obsm``, the images in ``uns['spatial']``, ...) are not
        overwritten: an error asks for another name. A non-empty name without ``/``.
    return_model
        Also return the trained model (for :func:`~dfmamba_st.tl.save_model` or ``model=`` on another slice).
    copy
        Work on a copy of ``adata`` and return it.

    Returns
    -------
    ``None`` (or the copy, and/or the model). Sets

    ``adata.obsm[key_added]``
        (n_obs, n_features + d_model) embedding with ``readout="concat"`` (``n_features`` is ``n_pcs``, at most the
        number of genes kept and of spots − 1; the number of genes without PCA), (n_obs, d_model) with ``"model"``.
    ``adata.obsm[key_added + '_gates']``
        (n_obs, n_depths) fractal gate of each depth at every spot (0 = local, 1 = global), for
        :func:`~dfmamba_st.pl.gates`; NaN at the depths a library's sequence is too short to reach (fewer than about
        29 spots).
    ``adata.uns['dfm']`` (``adata.uns[key_added]`` for another ``key_added``)
        ``params`` (every resolved setting, the preset, the device, the library, order and spatial keys; ``input``,
        what the expression was: ``"counts"``, ``"recovered counts"`` (log-normalised counts taken back to their raw
        counts) or ``"log-normalised"`` (used as given); with
        ``model=``, ``preset`` is ``"model"``, ``model_file`` the path of the file read when one was given, and the
        training settings ``seed`` and ``mask_ratio`` are ``"None"``, as every ``None`` is stored for
        ``write_h5ad``; ``model_fingerprint``, a SHA-256 of the model's configuration, weights and feature
        transform, names the model that made the embedding, trained here or given), ``genes``,
        ``missing_genes``, ``history`` (per-epoch losses; empty with ``model=``), ``versions``, ``key_added``,
        ``seconds`` (wall time of the call).

    Notes
    -----
    Training is on windows of the preset's length drawn along the curves, a fixed number of tokens per step: its
    time does not grow with the number of spots. Inside a ``torch.distributed`` process group (``torchrun``, gloo
    on CPUs or NCCL on GPUs) the windows of every step are shared out over the ranks and the gradients averaged
    (see :func:`dfmamba_st.core.fit`), and inference tiles are shared out too; every rank ends with the same
    embedding.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> dfm.pp.serialize(adata)
    >>> dfm.tl.embed(adata, epochs=1, progress=False)
    >>> adata.obsm["X_dfm"].shape
    (3639, 114)
    """
    start = time.time()
    check_adata(adata, min_spots=2, caller="dfm.tl.embed")
    check_key_added(key_added, "dfm.tl.embed")
    check_outputs(adata, "dfm.tl.embed", key_added, embed_record_key(key_added), obsm=(key_added, f"{key_added}_gates"))
    if order_key not in adata.obs.columns:
        others = serialized_orders(adata)
        hint = f" or pass order_key= one of {others} (written by dfm.pp.serialize)" if others else ""
        raise KeyError(f"obs[{order_key!r}] not found: run dfm.pp.serialize(adata) before dfm.tl.embed{hint}.")
    if not written_by(adata.uns.get(order_key), "dfm.pp.serialize"):  # its curve, grid and keys are unknown
        raise KeyError(
            f"obs[{order_key!r}] has no record of dfm.pp.serialize in uns[{order_key!r}] (anndata.concat keeps the "
            "column but drops the record): run dfm.pp.serialize(adata) again before dfm.tl.embed."
        )
    library_key = resolve_library_key(adata, library_key, order_key)
    check_library_key(adata, library_key)
    if isinstance(extra_curves, str):  # one curve's name, not a sequence of letters
        extra_curves = (extra_curves,)
    for name in extra_curves:
        curves.check_curve(name, "curve in extra_curves")
    seed = seed_number(seed, "seed")
    hops = whole_number(hops, "hops (rings of neighbours in the tokens)", minimum=0)
    serialized = adata.uns[order_key]["params"]  # its record, checked above
    primary = serialized["curve"]
    spatial_key = serialized.get("spatial_key", "spatial")  # not among the params a record is recognised by
    curve_names = tuple(dict.fromkeys((primary, *extra_curves)))
    if model is None and primary in extra_curves:
        advice = (
            " A second curve was the largest single gain of the ablations (docs/spatial_log.md, 'Ablations'): e.g. "
            f"extra_curves=({'hilbert' if primary != 'hilbert' else 'hilbert_t'!r},)."
            if len(curve_names) == 1
            else ""
        )
        warnings.warn(
            f"dfm.pp.serialize ordered the spots along {primary!r}, which extra_curves names too: the tissue is read "
            f"along {len(curve_names)} curve{'s' if len(curve_names) > 1 else ''} ({', '.join(curve_names)}), not "
            f"{len(extra_curves) + 1}.{advice}",
            stacklevel=user_stacklevel(),
        )
    rank, world_size = distributed_context()
    torch_device = resolve_device(device)
    if world_size > 1 and torch_device.type == "cuda" and torch_device.index is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch_device = torch.device("cuda", local_rank)
    model_file = None
    if isinstance(model, str | Path):
        model_file = str(model_file_read(model).resolve())
        model = load_model(model, device=torch_device)
    elif isinstance(model, SpatialDFMamba):
        model = model.to(torch_device)  # a model trained on another device, e.g. on a GPU then applied on the CPU
    elif model is not None:
        raise TypeError(
            f"model= takes a trained model (dfm.tl.embed(..., return_model=True) or dfm.tl.load_model) or the path of "
            f"a file dfm.tl.save_model wrote, got {type(model).__name__}."
        )

    if model is not None:
        _resolve_preset(preset, torch_device)  # an unknown name is an error here too, not an ignored option
        preset_name = "model"
        feature_tf = model.features
        config = model.config
        training_options = dict(
            n_top_genes=n_top_genes,
            n_pcs=n_pcs,
            d_model=d_model,
            depth=depth,
            preset=preset,
            epochs=epochs,
            ema_fraction=ema_fraction,
            hops=hops,
            extra_curves=tuple(extra_curves),
            bidirectional=bidirectional,
            checkpoint_dir=checkpoint_dir,
        )
        defaults = inspect.signature(embed).parameters
        ignored = {k: v for k, v in training_options.items() if v != defaults[k].default}
        if ignored:
            warnings.warn(
                f"model= applies a trained model with its own settings; ignored: {ignored}.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        settings = {}
    else:
        preset_name = _resolve_preset(preset, torch_device)
        _warn_auto_paper(preset, preset_name)
        settings = _settings(
            preset_name,
            torch_device,
            world_size,
            n_top_genes=n_top_genes,
            n_pcs=n_pcs,
            d_model=d_model,
            depth=depth,
            epochs=epochs,
            ema_fraction=ema_fraction,
            checkpoint_dir=checkpoint_dir,
        )

    # the readout: as given, else the trained model's (a model file keeps it), else the default
    trained_with = {**READOUT_DEFAULTS, **({} if model is None else model.config.extra)}
    readout = trained_with["readout"] if readout is None else readout
    readout_hops = trained_with["readout_hops"] if readout_hops is None else readout_hops
    if readout not in ("concat", "model"):
        raise ValueError(f"Unknown readout {readout!r}; use 'concat' or 'model'.")
    readout_hops = whole_number(readout_hops, "readout_hops (rings of neighbours in the readout)", minimum=0)

    # the tile against the depth and min_len the model has or will have (SpatialConfig's), before the slow work
    built = (settings["depth"], SpatialConfig.min_len) if model is None else (model.config.depth, model.config.min_len)
    tile_size = _check_tile_size(tile_size, *built)
    # the sequences and graphs first: positions the graph refuses (too many spots at one) stop the call before the
    # expression is read and the features fitted
    libraries = _library_sequences(adata, library_key, spatial_key, curve_names if model is None else config.curves)
    X, input_is_counts, recovered = expression_matrix(adata, layer)  # once, after the options are checked
    _warn_empty_spots(X, layer)
    if model is None:
        seed_everything(seed)
        feature_tf = FeatureTransform.fit_matrix(
            X,
            input_is_counts,
            adata.var_names,
            n_top_genes=settings["n_top_genes"],
            n_pcs=settings["n_pcs"],
            seed=seed,
            chosen=n_top_genes is not None,
            order=serialized_rows(adata, order_key, library_key),  # the fit subset: the same whatever the rows' order
        )
        config = SpatialConfig(
            n_features=feature_tf.n_features,
            d_model=settings["d_model"],
            depth=settings["depth"],
            d_state=settings["d_state"],
            hops=hops,
            curves=curve_names,
            bidirectional=bidirectional,
            extra={"readout": readout, "readout_hops": readout_hops},  # what model= applies again by default
        )
        if feature_tf.log_normalize:
            logg.info(f"    counts normalised to {COUNTS_TARGET:,.0f} per spot and log1p-transformed")
        else:
            logg.info("input looks log-normalised (non-integer values): used as is")
    features, missing = feature_tf.transform_matrix(X, input_is_counts, adata.var)
    del X  # the whole matrix is not needed past the features
    if missing:  # only a trained model's genes can be missing
        share = len(missing) / len(feature_tf.genes)
        naming = naming_hint(adata.var, feature_tf.genes, len(feature_tf.genes) - len(missing)) if share > 0.5 else ""
        rescaled = (
            ", and each spot's total over the genes present is divided by their share of the training counts"
            if feature_tf.rescales_totals
            else ""
        )
        warnings.warn(
            f"{len(missing)} of the model's {len(feature_tf.genes)} genes ({share:.0%}) are missing from adata "
            f"(e.g. {missing[:5]}); they are set to their training mean{rescaled}.{naming}",
            stacklevel=user_stacklevel(),
        )

    tokens = _tokens(features, libraries, config.hops)
    if model is None:
        token_scale = float(np.sqrt(np.mean(tokens**2))) or 1.0
        config.extra["token_scale"] = token_scale
    tokens /= config.extra["token_scale"]  # _tokens' own array: scaled in place, no copy
    token_t = torch.from_numpy(tokens.astype(np.float32, copy=False))

    history: list[dict] = []
    if model is None:
        seed_everything(seed)
        model = SpatialDFMamba(config, feature_tf).to(torch_device)
        if settings["epochs"]:  # epochs=0 keeps the initial weights: a control for what training adds
            history = _train(
                model,
                token_t,
                libraries,
                settings,
                seed=seed,
                device=torch_device,
                checkpoint_dir=checkpoint_dir,
                run_key=None if checkpoint_dir is None else _run_key(adata, feature_tf, config, settings, library_key),
                progress=progress,
            )

    embedding, gates = _infer(
        model, token_t, libraries, adata.n_obs, torch_device, tile_size=tile_size, progress=progress
    )
    if readout_hops:
        for idx, _, graph in libraries:
            embedding[idx] = smooth(embedding[idx], graph, readout_hops)
    if readout == "concat":
        embedding = np.hstack([_unit_variance(tokens[:, config.n_features :]), _unit_variance(embedding)])

    adata = adata.copy() if copy else adata
    record_key = embed_record_key(key_added)
    adata.obsm[key_added] = embedding
    adata.obsm[f"{key_added}_gates"] = gates
    params = {
        **{k: v for k, v in asdict(config).items() if k != "extra"},
        "token_scale": config.extra["token_scale"],
        "preset": preset_name,
        "device": str(torch_device),
        "seed": seed if preset_name != "model" else None,  # a trained model is applied: nothing is drawn
        "model_file": model_file,
        "model_fingerprint": model_fingerprint(model),
        "layer": layer,
        "library_key": library_key,
        "order_key": order_key,
        "spatial_key": spatial_key,
        "mask_ratio": MASK_RATIO if preset_name != "model" else None,
        "readout_hops": readout_hops,
        "readout": readout,
        "tile_size": tile_size,
        "world_size": world_size,
        "input": input_kind(input_is_counts, recovered),
        "n_pcs": None if feature_tf.loadings is None else int(feature_tf.loadings.shape[1]),
        **{k: v for k, v in settings.items() if k not in ("d_model", "depth", "d_state", "n_pcs")},
        "n_top_genes": len(feature_tf.genes),  # the genes used (a panel smaller than asked gives all of its own)
    }
    adata.uns[record_key] = {
        "params": h5ad_safe(params),
        "genes": np.asarray(feature_tf.genes, dtype=object),
        "missing_genes": np.asarray(missing, dtype=object),
        "history": {k: np.asarray([row.get(k, np.nan) for row in history]) for k in (history[0] if history else {})},
        "key_added": key_added,
        "versions": versions(),
        "seconds": time.time() - start,
    }
    logg.info(f"    finished dfm.tl.embed ({time.time() - start:.1f}s)")
    if return_model:
        return (adata, model) if copy else model
    return adata if copy else None


def _train(
    model: SpatialDFMamba,
    tokens: torch.Tensor,
    libraries,
    settings: dict,
    *,
    seed: int,
    device: torch.device,
    checkpoint_dir: str | Path | None,
    run_key: dict | None,
    progress: bool,
) -> list[dict]:
    """Train ``model`` in place to reconstruct masked spots in windows along the curves; the per-epoch history."""
    rank, world_size = distributed_context()

    def batches(epoch: int):
        # windows and masks depend only on (seed, epoch): a run resumed from a checkpoint sees the same data
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for _ in range(settings["steps_per_epoch"]):
            seqs = _sample_windows(tokens, libraries, settings["window"], settings["batch_windows"], gen)
            mask = torch.rand(seqs.shape[:2], generator=gen) < MASK_RATIO
            # every rank draws the same windows and keeps its share of them
            yield seqs[rank::world_size].to(device), mask[rank::world_size].to(device)

    return fit(
        model,
        lambda m, batch: m.masked_loss(*batch),
        batches,
        epochs=settings["epochs"],
        steps_per_epoch=settings["steps_per_epoch"],
        lr=settings["lr"],
        ema_decay=_ema_decay(settings["ema_fraction"], settings["epochs"] * settings["steps_per_epoch"]),
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        run_key=run_key,
        progress=progress,
        description="dfm.tl.embed",
        # a fixed self-supervised budget: no validation set, and the training loss is no model-selection criterion
        # (its auxiliary terms grow as the multi-scale features grow), so keep the last weights (or their moving
        # average)
        patience=None,
        restore_best=False,
    ).history


def _deepest_length(depth: int, min_len: int) -> int:
    """The shortest sequence DF-Mamba reads down to its deepest level.

    ``min_len`` tokens after ``depth - 1`` halvings; a shorter one leaves the deepest gates undefined.
    """
    return min_len * 2 ** max(depth - 1, 0)


def _check_tile_size(tile_size: object, depth: int, min_len: int) -> int:
    """``tile_size`` as an int, unless it is no multiple of ``2**depth`` or too short to reach the deepest level."""
    tile_size = whole_number(tile_size, "tile_size")
    align = 2**depth
    shortest = max(align, _deepest_length(depth, min_len))
    if tile_size < shortest or tile_size % align:  # a shorter tile leaves the deepest gate undefined
        raise ValueError(
            f"tile_size must be a multiple of 2**depth = {align} and at least min_len * 2**(depth - 1) = {shortest} "
            f"(a shorter tile cannot reach the deepest level), got {tile_size}."
        )
    return tile_size


def _tiles(n: int, tile_size: int, align: int, min_length: int = 1) -> list[tuple[int, int, int, int]]:
    """``(context_begin, context_end, keep_begin, keep_end)`` of the tiles that cover positions ``0..n``.

    The kept parts partition the sequence; each context adds about ``tile_size // 8`` positions on both sides (cut
    at the ends), and reaches further back (or forward) where a tile would be shorter than ``min_length`` (the last
    one). Every beginning is a multiple of ``align`` (``2**depth``), so DF-Mamba pairs the same spots in a tile as
    in the whole sequence.
    """
    if n <= tile_size:
        return [(0, n, 0, n)]
    overlap = max(align, tile_size // 8 // align * align)
    tiles = []
    for begin in range(0, n, tile_size):
        context_begin, context_end = max(0, begin - overlap), min(n, begin + tile_size + overlap)
        if context_end - context_begin < min_length:
            context_begin = max(0, (context_end - min_length) // align * align)
            context_end = min(n, max(context_end, context_begin + min_length))
        tiles.append((context_begin, context_end, begin, min(n, begin + tile_size)))
    return tiles


@torch.no_grad()
def _infer(
    model: SpatialDFMamba,
    tokens: torch.Tensor,
    libraries,
    n_obs: int,
    device: torch.device,
    *,
    tile_size: int,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Embedding and per-depth gates of every spot, averaged over the curves, streamed tile by tile.

    Tiles of the same length are batched up to ``INFER_BUDGET`` values per layer; only one batch of activations
    is alive at a time. Under ``torch.distributed`` every rank runs its share of the batches and the sums are
    all-reduced. ``progress``: a bar over the batches, when there are several (large tissue).
    """
    model.eval()
    depth = model.config.depth
    shortest = _deepest_length(depth, model.config.min_len)
    rank, world_size = distributed_context()
    jobs: dict[int, list] = {}  # context length → tiles (library, curve, tile)
    for lib, (_, orders, _) in enumerate(libraries):
        for curve in range(orders.shape[0]):
            for tile in _tiles(orders.shape[1], tile_size, 2**depth, shortest):
                jobs.setdefault(tile[1] - tile[0], []).append((lib, curve, tile))
    batches = []
    for length, tiles in sorted(jobs.items()):
        per_batch = max(1, INFER_BUDGET // (length * model.config.d_model))
        batches += [tiles[i : i + per_batch] for i in range(0, len(tiles), per_batch)]

    embedding = np.zeros((n_obs, model.config.d_model), dtype=np.float32)
    gate_sum = np.zeros((n_obs, depth), dtype=np.float32)
    gate_n = np.zeros((n_obs, depth), dtype=np.float32)
    dtype = next(model.parameters()).dtype  # a model saved in float64 or bfloat16 is applied in its precision
    mine = batches[rank::world_size]
    quiet = not progress or rank > 0 or len(mine) < 2
    for batch in tqdm(mine, desc="dfm.tl.embed: reading the tissue", disable=quiet, leave=False):
        spots = [libraries[lib][0][libraries[lib][1][curve, begin:end]] for lib, curve, (begin, end, _, _) in batch]
        out, aux = model(tokens[torch.from_numpy(np.stack(spots))].to(device, dtype))
        out = out.float().cpu().numpy()
        gate_maps = [g.float().cpu().numpy() for g in aux.gates]
        for row, (lib, _, (begin, _, keep_begin, keep_end)) in enumerate(batch):
            n_curves = libraries[lib][1].shape[0]
            kept = spots[row][keep_begin - begin : keep_end - begin]
            embedding[kept] += out[row, keep_begin - begin : keep_end - begin] / n_curves
            position = np.arange(keep_begin, keep_end) - begin
            for k, gate in enumerate(gate_maps):
                gate_sum[kept, k] += gate[row, position >> k]
                gate_n[kept, k] += 1
    if world_size > 1:
        import torch.distributed as dist

        for array in (embedding, gate_sum, gate_n):
            shared = torch.from_numpy(array).to(device)
            dist.all_reduce(shared)
            array[:] = shared.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        gates = np.where(gate_n > 0, gate_sum / gate_n, np.nan).astype(np.float32)
    return embedding, gates
