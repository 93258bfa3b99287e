"""The spatial DF-Mamba model: spot tokens along curves → DF-Mamba → embedding; masked-spot training; model files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._version import __version__
from .._weights import check_format_version, format_header, load_state, unshared
from ..core import DFMamba, fingerprint, resolve_device
from ._features import FeatureTransform

__all__ = ["MODEL_FORMAT", "SpatialConfig", "SpatialDFMamba", "load_model", "model_fingerprint", "save_model"]

#: version of the model-file layout; files written by a newer layout are refused with a clear error
MODEL_FORMAT = 1


@dataclass
class SpatialConfig:
    """Everything that defines a spatial DF-Mamba model (stored as JSON in the model file).

    :func:`~dfmamba_st.tl.embed` fills it from its arguments and preset; ``expand``, ``d_conv``, ``min_len`` and
    ``lambdas`` keep their defaults there. A model applied with ``tl.embed(model=...)`` keeps its own settings.

    Parameters
    ----------
    n_features
        Width of a spot's feature vector: its principal components, or its standardised genes with ``n_pcs=None``. A
        token is twice as wide (the spot's features next to their mean over its neighbourhood).
    d_model
        Width of the model: tokens are projected to it before DF-Mamba.
    depth
        Fractal depth ``K`` of DF-Mamba (:class:`~dfmamba_st.core.DFMamba`).
    d_state, expand, d_conv
        Sizes of the Mamba blocks: state size ``N``, expansion ``E`` and convolution width.
    min_len
        DF-Mamba stops recursing once a sequence is shorter than this.
    lambdas
        Weights ``(λ1, λ2, λ3)`` of DF-Mamba's auxiliary losses (``L_recon``, ``L_consist``, ``L_flow``), added to
        the masked-spot reconstruction loss in training.
    bidirectional
        Also scan every curve backwards, with the same weights.
    hops
        Rings of neighbours averaged into the neighbourhood half of a token.
    curves
        The curves the spots are read along: the one :func:`~dfmamba_st.pp.serialize` used for the training data,
        then ``tl.embed``'s ``extra_curves``. A new slice is read along these same curves.
    extra
        Further settings. ``tl.embed`` stores ``'token_scale'`` here: the root mean square of the training tokens,
        by which every token is divided (on a new slice too); and ``'readout'`` and ``'readout_hops'``, the readout it
        was trained with, which ``tl.embed(model=...)`` applies unless told otherwise.

    Examples
    --------
    >>> from dfmamba_st.tl import SpatialConfig
    >>> config = SpatialConfig(n_features=30, d_model=32)
    >>> config.depth, config.curves, config.lambdas
    (3, ('hilbert', 'hilbert_t'), (1.0, 1.0, 0.1))
    """

    n_features: int
    d_model: int = 64
    depth: int = 3
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    min_len: int = 8
    lambdas: tuple[float, float, float] = (1.0, 1.0, 0.1)
    bidirectional: bool = False
    hops: int = 2
    curves: tuple[str, ...] = ("hilbert", "hilbert_t")
    extra: dict = field(default_factory=dict)


class SpatialDFMamba(nn.Module):
    """Spot tokens (features of a spot and of its neighbourhood) → DF-Mamba → per-spot embedding.

    Training reconstructs the tokens of masked spots from the rest of the sequence.

    Parameters
    ----------
    config
        The model sizes and settings.
    features
        The fitted feature transform (kept with the model so a new slice gets the same features). ``None`` builds a
        model that runs but cannot be saved (:func:`save_model` needs the transform).

    Examples
    --------
    A small model on random tokens (``tl.embed`` builds and trains one from an AnnData):

    >>> import torch
    >>> from dfmamba_st.tl import SpatialConfig, SpatialDFMamba
    >>> model = SpatialDFMamba(SpatialConfig(n_features=5, d_model=8, depth=2, d_state=4))
    >>> tokens = torch.randn(2, 30, 10)  # (batch, L, 2 * n_features)
    >>> hidden, aux = model(tokens)
    >>> hidden.shape
    torch.Size([2, 30, 8])
    >>> mask = torch.zeros(2, 30, dtype=torch.bool)
    >>> mask[:, ::3] = True  # every third spot is masked
    >>> loss, terms = model.masked_loss(tokens, mask)
    >>> loss.ndim, sorted(terms)
    (0, ['aux', 'masked_mse'])
    """

    def __init__(self, config: SpatialConfig, features: FeatureTransform | None = None) -> None:
        super().__init__()
        self.config = config
        self.features = features
        token_dim = 2 * config.n_features
        self.embed_in = nn.Linear(token_dim, config.d_model)
        self.mask_token = nn.Parameter(torch.zeros(config.d_model))
        self.dfmamba = DFMamba(
            config.d_model,
            depth=config.depth,
            d_state=config.d_state,
            expand=config.expand,
            d_conv=config.d_conv,
            min_len=config.min_len,
            lambdas=config.lambdas,
            bidirectional=config.bidirectional,
        )
        self.head = nn.Linear(config.d_model, token_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None):
        """Embed ``tokens`` (batch, L, 2·n_features); masked positions (batch, L) see the mask token instead."""
        hidden = self.embed_in(tokens)
        if mask is not None:
            hidden = torch.where(mask[..., None], self.mask_token.to(hidden.dtype), hidden)
        return self.dfmamba(hidden)

    def masked_loss(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean squared error of the reconstructed tokens at masked spots, plus DF-Mamba's auxiliary loss."""
        out, aux = self(tokens, mask)
        err = (self.head(out) - tokens).pow(2).mean(-1)
        # mean over each window's masked spots, then over windows: for this term a batch split across data-parallel
        # ranks gives the same gradient as the whole batch in one process (the auxiliary gate-flow term, a square of
        # a batch mean, is computed per rank and differs slightly)
        weight = mask.float() if mask.any() else torch.ones_like(err)
        recon = ((err * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)).mean()
        loss = recon + aux.loss
        return loss, {"masked_mse": float(recon.detach()), "aux": float(aux.loss.detach())}


def _model_file(path: str | Path) -> Path:
    """``path`` with ``~`` expanded and ``.safetensors`` appended when it has another suffix (or none)."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors" or path.name in ("", ".", ".."):
        return path
    return path.with_name(path.name + ".safetensors")


def model_fingerprint(model: SpatialDFMamba) -> str:
    """SHA-256 of what a model file holds of a model: configuration, weights, feature transform.

    The same for a model and for what :func:`load_model` reads back from its file, so that an embedding's record
    (``uns['dfm']['params']['model_fingerprint']``) names the model that made it.

    Parameters
    ----------
    model
        A model of :func:`dfmamba_st.tl.embed`.

    Returns
    -------
    64 hexadecimal digits.

    Examples
    --------
    >>> import tempfile, dfmamba_st as dfm
    >>> from dfmamba_st.tl._model import model_fingerprint
    >>> adata = dfm.datasets.dlpfc_151673_hvg()[:300].copy()
    >>> dfm.pp.serialize(adata)
    >>> model = dfm.tl.embed(adata, epochs=1, d_model=8, depth=1, n_top_genes=100, progress=False, return_model=True)
    >>> again = dfm.tl.load_model(dfm.tl.save_model(model, tempfile.mkdtemp() + "/m"))
    >>> model_fingerprint(again) == model_fingerprint(model) == adata.uns["dfm"]["params"]["model_fingerprint"]
    True
    """
    tensors, described = _contents(model)
    names = sorted(tensors)
    return fingerprint(
        np.asarray([described["config"], described["features"], *names], dtype=object),
        # bfloat16 has no numpy type: its bits, as 16-bit integers
        *(_bits(tensors[name]).numpy() for name in names),
    )


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a bfloat16 one's bits as int16 (numpy has no bfloat16)."""
    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


def _contents(model: SpatialDFMamba) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a model file holds of ``model``: its tensors (weights, feature arrays) and its settings as JSON text."""
    tensors = unshared({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update(
        {f"features.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.features.state().items()}
    )
    return tensors, {"config": json.dumps(asdict(model.config)), "features": json.dumps(model.features.config())}


def model_file_read(path: str | Path) -> Path:
    """The file :func:`load_model` reads for ``path``.

    ``path`` itself, or ``path`` + ``.safetensors`` when only that exists (``~`` expanded).
    """
    given = Path(path).expanduser()
    suffixed = _model_file(given)
    return suffixed if not given.exists() and suffixed.is_file() else given


def save_model(model: SpatialDFMamba, path: str | Path) -> Path:
    """Write a model as ``safetensors`` tensors with a JSON header (config, genes, versions); no pickle.

    Parameters
    ----------
    model
        A trained model (with its feature transform).
    path
        File to write. ``~`` is expanded and ``.safetensors`` is appended when missing (``"mymodel"`` writes
        ``mymodel.safetensors``; :func:`load_model` and ``tl.embed(model=...)`` accept either name). Missing parent
        folders are created. An existing folder is refused: name the file inside it.

    Returns
    -------
    The path written.

    Raises
    ------
    IsADirectoryError
        ``path`` (or ``path`` + ``.safetensors``) is an existing folder.
    ValueError
        The model has no fitted feature transform.

    Examples
    --------
    Train on a small crop with tiny settings, save the model, load it back and apply it (or the file) to the same
    spots:

    >>> import tempfile
    >>> import numpy as np
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> adata = adata[adata.obs["array_row"] < 20].copy()  # a small crop
    >>> dfm.pp.serialize(adata)
    >>> model = dfm.tl.embed(
    ...     adata, epochs=1, d_model=16, depth=2, n_pcs=10, n_top_genes=300, progress=False, return_model=True
    ... )
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = dfm.tl.save_model(model, f"{folder}/small")
    ...     loaded = dfm.tl.load_model(path)
    ...     dfm.tl.embed(adata, model=path, key_added="X_loaded")  # tl.embed reads the file itself
    >>> path.name, loaded.config == model.config, loaded.training
    ('small.safetensors', True, False)
    >>> bool(np.allclose(adata.obsm["X_loaded"], adata.obsm["X_dfm"]))
    True
    >>> dfm.tl.embed(adata, model=loaded, key_added="X_again")
    >>> bool(np.allclose(adata.obsm["X_again"], adata.obsm["X_loaded"]))
    True

    The saved model gives the embedding of the model that was trained.
    """
    from safetensors.torch import save_file

    if not isinstance(model, SpatialDFMamba):
        raise TypeError(f"save_model saves a model of dfm.tl.embed (return_model=True), got {type(model).__name__}.")
    given = Path(path).expanduser()
    path = _model_file(given)
    for folder in dict.fromkeys((given, path)):
        if folder.is_dir():
            raise IsADirectoryError(
                f"{folder} is a folder; save_model needs a file name, e.g. {folder / 'model.safetensors'}."
            )
    if model.features is None:
        raise ValueError("The model has no fitted features; train it with dfm.tl.embed first.")
    tensors, described = _contents(model)
    header = {**format_header("dfmamba_st.spatial", str(MODEL_FORMAT)), **described}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> SpatialDFMamba:
    """Read a model written by :func:`~dfmamba_st.tl.save_model` (tensors only: no code in the file is ever executed).

    Parameters
    ----------
    path
        The model file. ``~`` is expanded; the name given to :func:`save_model` works too (``"mymodel"`` finds
        ``mymodel.safetensors`` when no file ``mymodel`` exists).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (a GPU when torch sees one).

    Returns
    -------
    The model, in evaluation mode, on ``device``.

    Raises
    ------
    FileNotFoundError
        Neither ``path`` nor ``path`` + ``.safetensors`` exists.
    IsADirectoryError
        ``path`` is a folder.
    ValueError
        The file is not a dfmamba_st model, is truncated or corrupt, or comes from a newer, incompatible version;
        or ``device`` is unknown or absent (e.g. ``"cuda"`` without a GPU).

    Examples
    --------
    The example of :func:`save_model` saves a trained model, loads it back with this function and applies it.
    """
    from safetensors import SafetensorError, safe_open

    torch_device = resolve_device(device)
    path = model_file_read(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = (f" It holds {found[:5]}" + (" …" if len(found) > 5 else "") + ".") if found else ""
        raise IsADirectoryError(
            f"{path} is a folder, not a model file; pass the file that dfm.tl.save_model wrote.{hint}"
        )
    if not path.exists():
        suffixed = _model_file(path)
        also = f" nor at {suffixed}" if suffixed != path else ""
        raise FileNotFoundError(f"No model file at {path}{also}.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable dfmamba_st model file (truncated or not safetensors): {err}"
        ) from err
    if header.get("format") != "dfmamba_st.spatial":
        raise ValueError(f"{path} is a safetensors file but not a dfmamba_st spatial model (no dfmamba_st header).")
    written_by = f"dfmamba_st {header.get('dfmamba_st_version')} (model format {header.get('format_version')})"
    version = header.get("format_version", "0")
    check_format_version(version, MODEL_FORMAT, where=str(path), what="model format", written_by=written_by)
    try:
        model = _model_from_file(header, tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a header or tensors that do not fit together
        raise ValueError(
            f"{path} is damaged or was edited: its header and tensors do not make a model of this dfmamba_st "
            f"{__version__} (written by {written_by}): {type(err).__name__}: {err}"
        ) from err
    return model.to(torch_device).eval()


def _model_from_file(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> SpatialDFMamba:
    """The model a file's header and tensors describe.

    ``KeyError``, ``TypeError``, ``ValueError`` or ``RuntimeError`` when they do not fit together.
    """
    config_dict = json.loads(header["config"])
    config_dict["lambdas"] = tuple(config_dict["lambdas"])
    config_dict["curves"] = tuple(config_dict["curves"])
    config = SpatialConfig(**config_dict)
    arrays = {k.removeprefix("features."): v.numpy() for k, v in tensors.items() if k.startswith("features.")}
    features = FeatureTransform.from_state(json.loads(header["features"]), arrays)
    if features.n_features != config.n_features:
        raise ValueError(
            f"the feature transform gives {features.n_features} features, the model takes {config.n_features}"
        )
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return load_state(SpatialDFMamba(config, features), state)
