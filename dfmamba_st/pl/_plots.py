"""Plots: fractal gates on the tissue and along the sequence, domains next to an annotation, training curves."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .._utils import check_library_key
from ..tl._cluster import WEAK_KNEE

__all__ = ["bic", "domains", "gates", "training"]


def _finish(fig: Figure, axes, *, show: bool | None, return_fig: bool, ax_given: bool):
    if show is None:
        show = not return_fig and not ax_given
    if show:
        plt.show()
    if return_fig:
        return fig
    if show:
        return None
    return axes


def _tissue(
    adata: AnnData,
    values: pd.Series | np.ndarray,
    *,
    ax: Axes,
    title: str,
    cmap=None,
    palette=None,
    vmin=None,
    vmax=None,
    library_id: str | None = None,
) -> None:
    """Spots coloured by ``values`` on the tissue (squidpy's spatial_scatter, over the H&E image when there is one).

    The image is that of ``library_id`` in ``uns['spatial']`` or, without a ``library_id``, the only one there.
    """
    with warnings.catch_warnings():
        # squidpy's docstring templating (docrep) warns about its own docstrings on first import; not the user's concern
        warnings.simplefilter("ignore", SyntaxWarning)
        import squidpy as sq

    view = AnnData(obs=pd.DataFrame({"value": np.asarray(values)}, index=adata.obs_names), shape=(adata.n_obs, 0))
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        view.obs["value"] = pd.Categorical(values.to_numpy(), categories=values.cat.categories)
    view.obsm["spatial"] = np.asarray(adata.obsm["spatial"])
    images_of = adata.uns.get("spatial", {})
    if library_id is not None:
        lib = library_id if library_id in images_of else None  # never another library's image
    else:
        lib = next(iter(images_of)) if len(images_of) == 1 else None
    # unannotated spots (NaN) in light grey, with their own "NA" legend entry
    kwargs: dict = dict(color="value", ax=ax, title=title, frameon=False, legend_fontsize=7, na_color="lightgrey")
    if lib is not None:
        view.uns["spatial"] = {lib: images_of[lib]}
        images = images_of[lib].get("images", {})
        res = "hires" if "hires" in images else ("lowres" if "lowres" in images else None)
        kwargs.update(img_res_key=res, img=res is not None, img_alpha=0.5)
        if res is None:
            kwargs.update(shape=None, size=12, library_id=lib)
    else:
        # points without an image: naming the (absent) library keeps squidpy from asking for one
        kwargs.update(shape=None, img=False, size=12, library_id="")
    if cmap is not None:
        kwargs.update(cmap=cmap, norm=plt.Normalize(vmin, vmax))
    if palette is not None:
        from matplotlib.colors import ListedColormap

        kwargs.update(palette=ListedColormap(list(palette)))
    with warnings.catch_warnings():
        # squidpy hands matplotlib a colour map along with the colours it already computed (matplotlib then warns
        # that it ignores the map), and calls a matplotlib method that is to be deprecated: neither is the user's
        warnings.filterwarnings("ignore", message="No data for colormapping provided", category=UserWarning)
        warnings.filterwarnings("ignore", message="The set_bad function", category=PendingDeprecationWarning)
        sq.pl.spatial_scatter(view, **kwargs)
    ax.set_title(title)


def _libraries(
    adata: AnnData, library_key: str | None, library_id: str | None, recorded, *, ax: Axes | None
) -> list[tuple[str | None, AnnData]]:
    """``(library, spots)`` to draw: the library ``library_id``, or every library, each in its own panels.

    ``library_key=None`` takes the key recorded by the tool that wrote the plotted values (``recorded``). The
    libraries' coordinates overlap, so they are never drawn into one axes: with several and ``ax=``, ``library_id``
    must name one.
    """
    if library_key is None and recorded not in (None, "None"):
        library_key = str(recorded)
    if library_key is None:
        if library_id is not None:
            raise ValueError("library_id= needs library_key= (the obs column that names the libraries).")
        return [(None, adata)]
    check_library_key(adata, library_key)
    libraries = list(adata.obs[library_key].astype("category").cat.remove_unused_categories().cat.categories)
    if library_id is not None and library_id not in libraries:
        raise KeyError(f"library_id={library_id!r} is not in obs[{library_key!r}]; libraries: {libraries}.")
    if library_id is None and len(libraries) == 1:
        return [(None, adata)]
    if library_id is None and ax is not None:
        raise ValueError(
            f"adata holds {len(libraries)} libraries in obs[{library_key!r}] ({', '.join(map(str, libraries[:5]))}"
            f"{', …' if len(libraries) > 5 else ''}); pass library_id= to draw one into ax= (their coordinates "
            "overlap), or leave ax=None for panels per library."
        )
    chosen = libraries if library_id is None else [library_id]
    return [(str(lib), adata[(adata.obs[library_key] == lib).to_numpy()]) for lib in chosen]


def _panels(n_libraries: int, per_library: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, list]:
    """A figure of ``per_library`` panels per library; returns it and each library's list of panels.

    As many libraries stand side by side as ``ncols`` panels hold (at least one); axes left over are hidden.
    """
    if int(ncols) != ncols or ncols < 1:
        raise ValueError(f"ncols must be a positive whole number, got {ncols}.")
    side = min(max(1, int(ncols) // per_library), n_libraries)
    rows = -(-n_libraries // side)
    fig, axes = plt.subplots(
        rows, side * per_library, figsize=(size[0] * side * per_library, size[1] * rows), squeeze=False
    )
    flat = axes.ravel()  # library i has panels i * per_library ... in row-major order
    groups = [list(flat[i * per_library : (i + 1) * per_library]) for i in range(n_libraries)]
    for ax in flat[n_libraries * per_library :]:
        ax.set_axis_off()
    return fig, groups


def _require(adata: AnnData, where: str, key: str, hint: str) -> None:
    container = getattr(adata, where)
    if key not in container:
        raise KeyError(f"adata.{where}[{key!r}] not found: {hint}")


def gates(
    adata: AnnData,
    depth: int | Sequence[int] | None = None,
    *,
    key: str = "X_dfm",
    order_key: str = "dfm_order",
    sequence: bool = True,
    library_key: str | None = None,
    library_id: str | None = None,
    ncols: int = 4,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """The fractal gate of each depth on the tissue (0 = local view, 1 = coarse global view) and along the sequence.

    Parameters
    ----------
    adata
        Embedded with :func:`dfmamba_st.tl.embed` (reads ``obsm[key + '_gates']``).
    depth
        Depth(s) to draw; all fusing depths by default.
    key
        The embedding key used in :func:`~dfmamba_st.tl.embed`.
    order_key
        The serialization order (for the panel along the sequence).
    sequence
        Add a panel with the gates along the curve (rolling mean over 25 spots).
    library_key
        ``obs`` column of the libraries (default: the one given to :func:`~dfmamba_st.tl.embed`).
    library_id
        The library to draw. By default every library, each in its own panels (their coordinates overlap, so they
        are never drawn into one axes); with several libraries, ``ax=`` needs a ``library_id``.
    ncols
        Panels per row when several libraries are drawn: as many libraries side by side as fit (at least one).
    ax
        Draw one depth's tissue map into this axes.
    show
        Show the figure (default: when neither ``ax`` nor ``return_fig`` is given).
    return_fig
        Return the figure.

    Returns
    -------
    The figure if ``return_fig``, else the axes (a list, library by library) when ``show=False``, else ``None``.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> dfm.pp.serialize(adata)
    >>> dfm.tl.embed(adata, epochs=1, progress=False)  # a short run; the default trains 20 epochs
    >>> fig = dfm.pl.gates(adata, return_fig=True)
    >>> [ax.get_title() for ax in fig.axes if ax.get_title()]  # doctest: +NORMALIZE_WHITESPACE
    ['gate, depth 0 (0 local, 1 global)', 'gate, depth 1 (0 local, 1 global)',
     'gate, depth 2 (0 local, 1 global)', 'gates along the sequence']

    One tissue map per fusing depth and the panel along the sequence (the colour bars have no title).
    """
    _require(adata, "obsm", f"{key}_gates", "run dfm.tl.embed(adata) first.")
    recorded = adata.uns.get("dfm", {}).get("params", {}).get("library_key")
    libraries = _libraries(adata, library_key, library_id, recorded, ax=ax)
    values = np.asarray(adata.obsm[f"{key}_gates"])
    available = [k for k in range(values.shape[1]) if np.isfinite(values[:, k]).any()]
    if not available:
        raise ValueError("No depth produced a gate (the sequences were shorter than min_len, or depth=0).")
    depths = available if depth is None else ([depth] if np.isscalar(depth) else list(depth))
    for k in depths:
        if k not in available:
            raise ValueError(f"depth={k} has no gate; available depths: {available}.")
    if ax is not None:
        ((lib, spots),) = libraries
        gate = np.asarray(spots.obsm[f"{key}_gates"])[:, depths[0]]
        _tissue(spots, gate, ax=ax, title=f"gate, depth {depths[0]}", cmap="magma", vmin=0, vmax=1, library_id=lib)
        return _finish(ax.figure, ax, show=show, return_fig=return_fig, ax_given=True)
    n_panels = len(depths) + int(sequence)
    fig, groups = _panels(len(libraries), n_panels, ncols, (4.2, 4.2))
    for row, (lib, spots) in zip(groups, libraries):
        prefix = f"{lib}: " if len(libraries) > 1 else ""
        wrap = "\n" if prefix else " "  # a library's name makes the tissue panels' titles too long for one line
        gates_here = np.asarray(spots.obsm[f"{key}_gates"])
        for a, k in zip(row, depths):
            title = f"{prefix}gate, depth {k}{wrap}(0 local, 1 global)"
            _tissue(spots, gates_here[:, k], ax=a, title=title, cmap="magma", vmin=0, vmax=1, library_id=lib)
        if sequence:
            title = f"{prefix}gates along the sequence"
            _gates_along_sequence(row[-1], spots, gates_here, depths, order_key, title=title)
    fig.tight_layout()
    return _finish(fig, [a for row in groups for a in row], show=show, return_fig=return_fig, ax_given=False)


def _gates_along_sequence(
    ax: Axes, spots: AnnData, values: np.ndarray, depths: list[int], order_key: str, *, title: str
) -> None:
    """The gates of one library along its curve (rolling mean over 25 spots)."""
    order = np.argsort(spots.obs[order_key].to_numpy(), kind="stable") if order_key in spots.obs else None
    for k in depths:
        series = pd.Series(values[order, k] if order is not None else values[:, k])
        ax.plot(series.rolling(25, min_periods=1, center=True).mean().to_numpy(), lw=1, label=f"depth {k}")
    ax.set_xlabel("position along the curve")
    ax.set_ylabel("gate (rolling mean)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)


def domains(
    adata: AnnData,
    key: str = "dfm_domain",
    *,
    truth_key: str | None = None,
    library_key: str | None = None,
    library_id: str | None = None,
    ncols: int = 4,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """Spatial domains on the tissue, next to a reference annotation when ``truth_key`` is given.

    Domains are coloured to match the annotation they overlap most (so a correct domain has its layer's colour).

    Parameters
    ----------
    adata
        Clustered with :func:`dfmamba_st.tl.cluster`.
    key
        ``obs`` column of the domains.
    truth_key
        ``obs`` column of a manual annotation to draw alongside.
    library_key
        ``obs`` column of the libraries (default: the one given to :func:`~dfmamba_st.tl.cluster`).
    library_id, ncols
        As in :func:`gates`.
    ax
        Draw the domains (only) into this axes.
    show, return_fig
        As in :func:`gates`.

    Returns
    -------
    The figure if ``return_fig``, else the axes (a list, library by library) when ``show=False``, else ``None``.
    """
    _require(adata, "obs", key, "run dfm.tl.cluster(adata) first.")
    recorded = adata.uns.get(key, {}).get("params", {}).get("library_key")
    libraries = _libraries(adata, library_key, library_id, recorded, ax=ax)
    # colours from every spot drawn, so that a domain has one colour in every library's panel
    shown = libraries[0][1] if len(libraries) == 1 else adata
    pred = shown.obs[key].astype("category")
    palette = None
    truth = None
    if truth_key is not None:
        _require(adata, "obs", truth_key, "pass the obs column of the annotation.")
        truth = shown.obs[truth_key].astype("category")
        colors = plt.get_cmap("tab10" if len(truth.cat.categories) <= 10 else "tab20").colors
        truth_palette = {c: colors[i % len(colors)] for i, c in enumerate(truth.cat.categories)}
        table = pd.crosstab(pred, truth)
        palette, used = {}, set()
        for c in table.sum(axis=1).sort_values(ascending=False).index:
            best = next((t for t in table.loc[c].sort_values(ascending=False).index if t not in used), None)
            if best is not None and table.loc[c, best] > 0:
                palette[c] = truth_palette[best]
                used.add(best)
        spare = [col for col in plt.get_cmap("Set3").colors]
        for i, c in enumerate(c for c in pred.cat.categories if c not in palette):
            palette[c] = spare[i % len(spare)]
    colours = palette and [palette[c] for c in pred.cat.categories]

    def column(spots: AnnData, name: str, categories) -> pd.Series:
        return pd.Series(pd.Categorical(spots.obs[name].to_numpy(), categories=categories), index=spots.obs_names)

    if ax is not None:
        ((lib, spots),) = libraries
        _tissue(spots, column(spots, key, pred.cat.categories), ax=ax, title=key, palette=colours, library_id=lib)
        return _finish(ax.figure, ax, show=show, return_fig=return_fig, ax_given=True)
    n = 2 if truth is not None else 1
    fig, groups = _panels(len(libraries), n, ncols, (5.2, 4.6))
    for row, (lib, spots) in zip(groups, libraries):
        prefix = f"{lib}: " if len(libraries) > 1 else ""
        if truth is not None:
            values = column(spots, truth_key, truth.cat.categories)
            truth_colours = [truth_palette[c] for c in truth.cat.categories]
            _tissue(spots, values, ax=row[0], title=prefix + truth_key, palette=truth_colours, library_id=lib)
        values = column(spots, key, pred.cat.categories)
        _tissue(spots, values, ax=row[-1], title=prefix + key, palette=colours, library_id=lib)
    fig.tight_layout()
    return _finish(fig, [a for row in groups for a in row], show=show, return_fig=return_fig, ax_given=False)


def bic(
    adata: AnnData,
    key: str = "dfm_domain",
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """The BIC curve from which ``tl.cluster(n_clusters=None)`` chose the number of domains, and its choice.

    The chosen K is the knee: with K and BIC scaled to [0, 1], the point furthest below the straight line from the
    first to the last K tried (drawn dashed); the title gives its depth below that line. A curve that keeps falling
    without a clear bend (a shallow knee, "weak") means the number of domains is uncertain: pass ``n_clusters`` when
    it is known.

    Parameters
    ----------
    adata
        Clustered with :func:`dfmamba_st.tl.cluster` and ``n_clusters=None`` (reads ``uns[key]['bic']``).
    key
        The ``key_added`` of :func:`~dfmamba_st.tl.cluster`.
    ax, show, return_fig
        As in :func:`gates`.

    Returns
    -------
    The figure if ``return_fig``, else the axes when ``show=False``, else ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> dfm.pp.serialize(adata)
    >>> adata.obsm["X_noise"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5))
    >>> dfm.tl.cluster(adata, n_clusters=None, use_rep="X_noise", k_range=range(2, 6))  # warns: no clear knee
    >>> fig = dfm.pl.bic(adata, return_fig=True)
    >>> fig.axes[0].get_title().splitlines()
    ['dfm.tl.cluster: K = 2 at the knee', '(depth 0.00, weak)']

    Noise has no number of domains: the BIC only rises with K, and the knee is flat.
    """
    _require(adata, "obs", key, "run dfm.tl.cluster(adata) first.")
    record = adata.uns.get(key, {})
    if "bic" not in record:
        raise ValueError(
            f"uns[{key!r}] holds no BIC curve: the number of domains was given, not chosen "
            "(run dfm.tl.cluster(adata, n_clusters=None))."
        )
    ks = np.array(sorted(int(k) for k in record["bic"]))
    values = np.array([float(record["bic"][str(k)]) for k in ks])
    chosen = int(record["params"]["n_clusters"])
    given = ax is not None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.4))
    fig = ax.figure
    ax.plot(ks, values, marker="o", ms=4, lw=1.2, color="C0", label="BIC")
    ax.plot(ks[[0, -1]], values[[0, -1]], ls="--", lw=1, color="grey", label="chord (first to last K)")
    ax.plot([chosen], values[ks == chosen], marker="o", ms=10, mfc="none", mec="C3", mew=2, ls="", label="chosen")
    ax.set_xlabel("number of domains K")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("BIC (lower fits better)")
    title = f"dfm.tl.cluster: K = {chosen} at the knee"
    if "knee" in record:  # its depth below the chord; shallow: a weak choice
        knee = float(record["knee"])
        title += f"\n(depth {knee:.2f}{', weak' if knee < WEAK_KNEE else ''})"
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    if not given:
        fig.tight_layout()
    return _finish(fig, ax, show=show, return_fig=return_fig, ax_given=given)


def training(
    adata: AnnData,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """Loss curves of :func:`dfmamba_st.tl.embed` (total, masked-spot reconstruction, auxiliary) per epoch.

    Parameters
    ----------
    adata
        Embedded with :func:`dfmamba_st.tl.embed`.
    ax, show, return_fig
        As in :func:`gates`.

    Returns
    -------
    The figure if ``return_fig``, else the axes when ``show=False``, else ``None``.
    """
    _require(adata, "uns", "dfm", "run dfm.tl.embed(adata) first.")
    history = adata.uns["dfm"].get("history", {})
    if not len(history) or "train_loss" not in history:
        raise ValueError("uns['dfm'] holds no training history (the embedding came from a pre-trained model).")
    given = ax is not None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.4))
    fig = ax.figure
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    labels = {"train_loss": "total", "masked_mse": "masked-spot reconstruction", "aux": "auxiliary (DF-Mamba)"}
    for name, label in labels.items():
        if name in history:
            ax.plot(epochs, np.asarray(history[name]), marker="o", ms=3, lw=1.2, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.set_title("dfm.tl.embed training")
    ax.legend(frameon=False, fontsize=8)
    if not given:
        fig.tight_layout()
    return _finish(fig, ax, show=show, return_fig=return_fig, ax_given=given)
