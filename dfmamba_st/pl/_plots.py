"""Plots: fractal gates on the tissue and along the sequence, domains next to an annotation, training curves."""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Hashable, Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, ListedColormap, is_color_like, to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .._utils import (
    EMBED_RECORD,
    check_library_key,
    embed_record_key,
    gate_range,
    is_tool_record,
    recorded_param,
    shared_positions,
    user_stacklevel,
    warn_pooled_slices,
)
from ..metrics import _is_missing
from ..tl._cluster import WEAK_KNEE

__all__ = ["bic", "domains", "gates", "training"]

#: spare colours closer than this (RGB distance, 0-1 per channel) to a colour in use are left out; the second
#: value is used for the colours still missing once the first leaves none
_MIN_COLOUR_DISTANCES = (0.25, 0.1)
#: spare colours with less chroma (max - min channel) than this are greys or pastels, faint over the H&E image
#: and close to the NA colour ``lightgrey``
_MIN_CHROMA = 0.3
#: spare colours lighter than this (HLS lightness) are pastels or near-whites, barely visible over the H&E image
_MAX_LIGHTNESS = 0.7
#: how far the tissue panels reach beyond the spots: this fraction of their extent (at least one spot diameter)
_ZOOM_MARGIN = 0.05


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


def _embed_record(adata: AnnData, key: str) -> str | None:
    """The ``uns`` key of the record of the :func:`~dfmamba_st.tl.embed` run that wrote ``obsm[key]``, or ``None``.

    ``uns[embed_record_key(key)]``; files written before each embedding had its own record keep the last run's record
    in ``uns['dfm']``, which counts when its ``key_added`` is ``key``.
    """
    for uns_key in dict.fromkeys((embed_record_key(key), EMBED_RECORD)):
        record = adata.uns.get(uns_key)
        if is_tool_record(record) and str(record.get("key_added", "X_dfm")) == key:
            return uns_key
    return None


def _embeddings(adata: AnnData) -> list[str]:
    """The ``obsm`` keys of the embeddings :func:`~dfmamba_st.tl.embed` wrote (those with a ``_gates`` partner)."""
    return [k for k in adata.obsm if f"{k}_gates" in adata.obsm]


def _clusterings(adata: AnnData) -> list[str]:
    """The ``obs`` columns :func:`~dfmamba_st.tl.cluster` wrote (those with a record of its parameters in ``uns``)."""
    return [c for c in adata.obs.columns if recorded_param(adata, str(c), "method") is not None]


def _missing(what: str, found: list[str], tool: str) -> KeyError:
    """The error for a result not found: it names the keys of that tool's results that do exist."""
    hint = (
        f"the keys of {tool}'s results here are {found}; pass key= one of them" if found else f"run {tool}(adata) first"
    )
    return KeyError(f"{what} not found: {hint}.")


def _require_embedding(adata: AnnData, key: str) -> None:
    if f"{key}_gates" not in adata.obsm:
        raise _missing(f"adata.obsm[{key + '_gates'!r}]", _embeddings(adata), "dfm.tl.embed")


def _require_domains(adata: AnnData, key: str) -> None:
    if key not in adata.obs:
        raise _missing(f"adata.obs[{key!r}]", _clusterings(adata), "dfm.tl.cluster")


def _coordinates(adata: AnnData, *uns_keys: str | None) -> str:
    """The ``obsm`` key of the spots' coordinates: ``'spatial'``, else the one recorded in the first of ``uns_keys``."""
    if "spatial" in adata.obsm:
        return "spatial"
    for uns_key in uns_keys:
        recorded = recorded_param(adata, uns_key, "spatial_key")
        if recorded is not None and recorded in adata.obsm:
            return str(recorded)
    raise KeyError(f"adata.obsm['spatial'] not found (the spots' coordinates); obsm holds {list(adata.obsm)}.")


def _is_faint(colour) -> bool:
    """A grey, pastel or near-white: too close to the NA colour ``lightgrey`` or barely visible over the H&E image."""
    rgb = np.asarray(to_rgb(colour))
    return bool(rgb.max() - rgb.min() < _MIN_CHROMA or (rgb.max() + rgb.min()) / 2 > _MAX_LIGHTNESS)


def _default_colours(n: int) -> list[str]:
    """``n`` colours for categories, as scanpy gives a categorical column without ``uns[key + '_colors']``.

    The colour cycle of ``rcParams`` when it has ``n`` colours (tab10 by default, ``default_20`` after
    ``sc.set_figure_params``), else scanpy's ``default_20``, ``default_28`` or ``default_102`` (repeated beyond 102,
    where scanpy draws every category grey), so a column has the same colours here as in ``sc.pl.spatial`` and
    ``sc.pl.umap``.
    """
    from scanpy.plotting import palettes

    cycle = mpl.rcParams["axes.prop_cycle"].by_key().get("color", [])
    if len(cycle) >= n:
        colours = cycle
    elif n <= 20:
        colours = palettes.default_20
    elif n <= 28:
        colours = palettes.default_28
    else:
        colours = palettes.default_102
    return [to_hex(colours[i % len(colours)]) for i in range(n)]


def _category_colours(adata: AnnData, key: str, categories: pd.Index) -> dict | None:
    """``{category: colour}`` from ``uns[key + '_colors']`` when it has a valid colour per category (scanpy's rule)."""
    stored = adata.uns.get(f"{key}_colors")
    if stored is None or isinstance(stored, str) or len(stored) != len(categories):
        return None
    stored = list(stored)
    if not all(is_color_like(c) for c in stored):
        return None
    return {c: to_hex(colour, keep_alpha=True) for c, colour in zip(categories, stored)}


def _spare_colours(n: int, taken: Sequence) -> list[str]:
    """``n`` colours for domains that match no annotated label: distinct from ``taken`` and from each other.

    From tab10, Dark2, then scanpy's 102 colours, leaving out greys, pastels and near-whites (Set3's pastels, the
    spare colours until 2026-12-06, were faint over the H&E image); they repeat only when none is left.
    """
    from scanpy.plotting.palettes import default_102

    candidates = [to_hex(c) for name in ("tab10", "Dark2") for c in plt.get_cmap(name).colors]
    candidates = [c for c in dict.fromkeys(candidates + [to_hex(c) for c in default_102]) if not _is_faint(c)]
    used = [np.asarray(to_rgb(c)) for c in taken]
    out: list[str] = []
    for distance in _MIN_COLOUR_DISTANCES:
        for colour in candidates:
            rgb = np.asarray(to_rgb(colour))
            if len(out) == n:
                break
            if colour not in out and all(np.linalg.norm(rgb - u) >= distance for u in used):
                out.append(colour)
                used.append(rgb)
    if not out:  # every candidate is in use already: take them anyway
        out = candidates
    return [out[i % len(out)] for i in range(n)]


def _zoom(ax: Axes, xy: np.ndarray, image_shape: tuple[int, ...], spot_diameter: float) -> None:
    """Limit ``ax`` to the spots (image pixels) and a margin, as ``sc.pl.spatial`` does, within the image."""
    xy = xy[np.isfinite(xy).all(axis=1)]
    if not len(xy):
        return
    low, high = xy.min(axis=0), xy.max(axis=0)
    margin = max(_ZOOM_MARGIN * float((high - low).max()), spot_diameter)
    x0, x1 = max(low[0] - margin, -0.5), min(high[0] + margin, image_shape[1] - 0.5)
    y0, y1 = max(low[1] - margin, -0.5), min(high[1] + margin, image_shape[0] - 0.5)
    if x0 >= x1 or y0 >= y1:  # spots off the image: the margin around them alone
        x0, x1, y0, y1 = low[0] - margin, high[0] + margin, low[1] - margin, high[1] + margin
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # the image's rows go down


def _fit_legends(fig: Figure, pad: float = 0.1) -> None:
    """Widen ``fig`` until the legends beside its panels fit on it (tight_layout alone leaves wide ones cut off)."""
    for _ in range(4):
        bbox = fig.get_tightbbox()  # inches, legends included
        width = fig.get_figwidth()
        overflow = max(0.0, bbox.x1 - width) + max(0.0, -bbox.x0)
        if overflow < 0.01:
            return
        fig.set_figwidth(width + overflow + pad)
        fig.tight_layout()


def _image_of(images_of: Mapping, library_id: str | None, warn: bool = True) -> tuple[str | None, str | None]:
    """``(library, resolution)`` of the H&E image to draw under a library's spots, or ``(None, None)``.

    The image of ``library_id`` in ``uns['spatial']`` or, without a ``library_id``, the only one there (never another
    library's); hires before lowres. A warning names the library when ``uns['spatial']`` holds images but not its
    own, or when its image lacks the scale factors that place the spots on it (unless ``warn`` is false: the
    library's other panels).
    """
    if library_id is None:
        lib = next(iter(images_of)) if len(images_of) == 1 else None
    elif library_id in images_of:
        lib = library_id
    else:
        if images_of and warn:
            warnings.warn(
                f"uns['spatial'] holds no image for library {library_id!r} (it holds {list(images_of)[:5]}): drawn "
                "without one. uns['spatial'] is keyed by library name, as the library column names them.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return None, None
    if lib is None:
        return None, None
    images = images_of[lib].get("images", {})
    res = "hires" if "hires" in images else ("lowres" if "lowres" in images else None)
    if res is None:
        return None, None
    factors = images_of[lib].get("scalefactors", {})
    missing = [k for k in (f"tissue_{res}_scalef", "spot_diameter_fullres") if k not in factors]
    if missing:
        if warn:
            warnings.warn(
                f"uns['spatial'][{lib!r}] has a {res} image but its scalefactors lack {missing}, which place the spots "
                "on it: drawn without the image.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return None, None
    return lib, res


def _spot_spacing(xy: np.ndarray) -> float:
    """Median distance from a spot to its nearest other spot (0 with fewer than two distinct positions)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return 0.0
    distance = cKDTree(xy).query(xy, 2)[0][:, 1]
    return float(np.median(distance))


#: ``spatial_scatter`` options each tissue panel sets itself, so a plot's ``**kwargs`` cannot
_PANEL_OPTIONS = ("color", "ax", "title")


def _scatter_options(kwargs: dict) -> dict:
    """A plot's ``**kwargs`` for squidpy's ``spatial_scatter``, refusing the options each panel sets itself."""
    taken = sorted(set(kwargs) & set(_PANEL_OPTIONS))
    if taken:
        raise TypeError(
            f"{taken} cannot be passed on to squidpy.pl.spatial_scatter: every panel sets {list(_PANEL_OPTIONS)} "
            "itself (draw into your own axes with ax=, set titles on the axes returned)."
        )
    return kwargs


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
    spatial_key: str = "spatial",
    scatter: Mapping | None = None,
    colorbar_label: str | None = None,
    warn_image: bool = True,
) -> None:
    """Spots coloured by ``values`` on the tissue (squidpy's spatial_scatter, over the H&E image when there is one).

    ``scatter``: the caller's options for ``spatial_scatter``, over this function's own; ``colorbar_label``: the
    label of a continuous map's colour bar; ``warn_image``: say why no image is drawn (a library's first panel
    only, so that a figure says it once per library). The image is
    :func:`_image_of`'s; the panel is zoomed to the spots. Without an image, the spots are circles as
    wide as the median distance between neighbouring spots (so they touch, whatever the tissue's shape).

    A continuous map's colour bar is :func:`_bar_beside`'s (squidpy's own is turned off), as tall as the map.
    """
    with warnings.catch_warnings():
        # squidpy's docstring templating (docrep) warns about its own docstrings on first import; not the user's concern
        warnings.simplefilter("ignore", SyntaxWarning)
        import squidpy as sq

    view = AnnData(obs=pd.DataFrame({"value": np.asarray(values)}, index=adata.obs_names), shape=(adata.n_obs, 0))
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        view.obs["value"] = pd.Categorical(values.to_numpy(), categories=values.cat.categories)
    view.obsm["spatial"] = np.asarray(adata.obsm[spatial_key])
    # images go with the coordinates in obsm['spatial'] (their scale factors are for those)
    images_of = adata.uns.get("spatial", {}) if spatial_key == "spatial" else {}
    lib, res = _image_of(images_of, library_id, warn=warn_image)
    # unannotated spots (NaN) in light grey, with their own "NA" legend entry
    kwargs: dict = dict(
        color="value", ax=ax, title=title, frameon=False, legend_fontsize="x-small", na_color="lightgrey"
    )
    if res is not None:
        view.uns["spatial"] = {lib: images_of[lib]}
        kwargs.update(library_id=lib, img_res_key=res, img=True, img_alpha=0.5)
    else:
        spacing = _spot_spacing(view.obsm["spatial"])
        if spacing > 0:  # circles as wide as the spots lie apart, in the data's units, whatever the panel's size
            view.uns["spatial"] = {
                "spots": {"scalefactors": {"spot_diameter_fullres": spacing, "tissue_hires_scalef": 1.0}}
            }
            kwargs.update(library_id="spots", img_res_key="hires", img=False)
        else:  # a single spot, or all at one position: scanpy's size (points²) for an embedding of n_obs spots
            kwargs.update(shape=None, img=False, size=120000 / max(adata.n_obs, 1), library_id="")
    if cmap is not None:
        kwargs.update(cmap=cmap)
        if "norm" not in (scatter or {}):  # the caller's norm= replaces the range (matplotlib takes one or the other)
            kwargs.update(norm=plt.Normalize(vmin, vmax))
    if palette is not None:
        kwargs.update(palette=ListedColormap(list(palette)))
    kwargs.update(scatter or {})
    # squidpy's bar (plt.colorbar next to the whole panel) is replaced by one beside the map, unless turned off
    bar = cmap is not None and kwargs.get("colorbar", True)
    kwargs["colorbar"] = False
    with warnings.catch_warnings():
        # squidpy hands matplotlib a colour map along with the colours it already computed (matplotlib then warns
        # that it ignores the map), and calls a matplotlib method that is to be deprecated: neither is the user's
        warnings.filterwarnings("ignore", message="No data for colormapping provided", category=UserWarning)
        warnings.filterwarnings("ignore", message="The set_bad function", category=PendingDeprecationWarning)
        drawn_before = set(ax.collections)
        try:
            sq.pl.spatial_scatter(view, **kwargs)
        except (AttributeError, TypeError) as err:  # matplotlib's words for an option nobody takes
            unknown = [k for k in (scatter or {}) if f"'{k}'" in str(err)]
            if "unexpected keyword" not in str(err) or not unknown:
                raise
            raise TypeError(
                f"{unknown} went on to squidpy.pl.spatial_scatter (and matplotlib), which takes no such option: {err}"
            ) from err
    if bar:  # the spots: the collection squidpy drew with the values' colours
        (spots,) = [c for c in ax.collections if c not in drawn_before and c.get_array() is not None]
        _bar_beside(ax, spots, colorbar_label)
    ax.set_title(title)
    if res is not None:
        factors = images_of[lib]["scalefactors"]
        scale = float(factors[f"tissue_{res}_scalef"])
        diameter = float(factors["spot_diameter_fullres"]) * scale
        xy = np.asarray(view.obsm["spatial"], dtype=np.float64)[:, :2] * scale
        _zoom(ax, xy, np.shape(images_of[lib]["images"][res]), diameter)


def _bar_beside(ax: Axes, mappable, label: str | None) -> None:
    """A colour bar of ``mappable`` as tall as the map ``ax`` draws, just right of it.

    squidpy sizes its bar to the whole panel, and a map keeps the tissue's aspect ratio, so a wide tissue was drawn
    shorter than its bar. This bar lives in the map's own axes coordinates (an inset), so it follows the map through
    any layout (tight, constrained) and resize; being the figure's own call, it needs no pyplot figure.
    """
    fitted = ax.figure.colorbar(mappable, cax=ax.inset_axes((1.03, 0.0, 0.04, 1.0)))
    if label is not None:
        fitted.set_label(label, fontsize="small")


def _libraries(
    adata: AnnData,
    library_key: str | None,
    library_id: str | None,
    record: str | None,
    *,
    ax: Axes | None,
    spatial_key: str,
) -> list[tuple[str | None, AnnData]]:
    """``(library, spots)`` to draw: the library ``library_id``, or every library, each in its own panels.

    ``library_key=None`` takes the key recorded in ``uns[record]`` by the tool that wrote the plotted values. The
    libraries' coordinates overlap, so they are never drawn into one axes: with several and ``ax=``, ``library_id``
    must name one. Without a key, spots that share coordinates (``obsm[spatial_key]``) are warned about.
    """
    if library_key is None:
        library_key = recorded_param(adata, record, "library_key")
    if library_key is None:
        if library_id is not None:
            raise ValueError("library_id= needs library_key= (the obs column that names the libraries).")
        overdrawn = "drawn into one panel, one over another"
        warn_pooled_slices(
            adata,
            shared_positions(adata.obsm[spatial_key]),
            None,
            caller="the plot",
            shared=overdrawn,
        )
        return [(None, adata)]
    check_library_key(adata, library_key)
    libraries = list(adata.obs[library_key].astype("category").cat.remove_unused_categories().cat.categories)
    if library_id is not None and library_id not in libraries:
        raise KeyError(f"library_id={library_id!r} is not in obs[{library_key!r}]; libraries: {libraries}.")
    if library_id is None and len(libraries) == 1:
        # one library left (a subset of several): its own image, when uns['spatial'] names it
        only = str(libraries[0])
        return [(only if only in adata.uns.get("spatial", {}) else None, adata)]
    if library_id is None and ax is not None:
        raise ValueError(
            f"adata holds {len(libraries)} libraries in obs[{library_key!r}] ({', '.join(map(str, libraries[:5]))}"
            f"{', …' if len(libraries) > 5 else ''}); pass library_id= to draw one into ax= (their coordinates "
            "overlap), or leave ax=None for panels per library."
        )
    chosen = libraries if library_id is None else [library_id]
    return [(str(lib), adata[(adata.obs[library_key] == lib).to_numpy()]) for lib in chosen]


def _figsize(width: float, height: float) -> tuple[float, float]:
    """A figure size in inches, scaled with ``rcParams['figure.figsize']`` (``sc.set_figure_params(figsize=...)``).

    ``(width, height)`` is the size under matplotlib's default figure size; both scale with its height, so the
    panels keep their shape.
    """
    scale = mpl.rcParams["figure.figsize"][1] / mpl.rcParamsDefault["figure.figsize"][1]
    return width * scale, height * scale


#: a listed colormap of at most this many colours is a qualitative palette (tab20, Set3), whose colours are cycled
QUALITATIVE_MAX = 32


@contextlib.contextmanager
def _closed_on_error(fig: Figure):
    """Close ``fig`` (made by the plot, not the caller's) when drawing into it fails, and re-raise."""
    try:
        yield
    except BaseException:
        plt.close(fig)
        raise


def _panels(n_libraries: int, per_library: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, list]:
    """A figure of ``per_library`` panels per library; returns it and each library's list of panels.

    As many libraries stand side by side as ``ncols`` panels hold (at least one); axes left over are hidden.
    """
    if int(ncols) != ncols or ncols < 1:
        raise ValueError(f"ncols must be a positive whole number, got {ncols}.")
    side = min(max(1, int(ncols) // per_library), n_libraries)
    rows = -(-n_libraries // side)
    fig, axes = plt.subplots(
        rows, side * per_library, figsize=_figsize(size[0] * side * per_library, size[1] * rows), squeeze=False
    )
    flat = axes.ravel()  # library i has panels i * per_library ... in row-major order
    groups = [list(flat[i * per_library : (i + 1) * per_library]) for i in range(n_libraries)]
    for ax in flat[n_libraries * per_library :]:
        ax.set_axis_off()
    return fig, groups


def _depths(depth, available: list[int], *, ax: Axes | None) -> list[int]:
    """The depths to draw, checked: whole numbers among ``available``; one only into an ``ax=``."""

    def whole(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if depth is None:
        return available[:1] if ax is not None else available
    if whole(depth):
        depths = [int(depth)]
    elif isinstance(depth, Sequence | np.ndarray) and not isinstance(depth, str):
        depths = list(depth)
    else:
        depths = [depth]
    for k in depths:
        if not whole(k):
            raise TypeError(
                f"depth must be a whole number (a fusing depth such as 0) or a list of them, got {k!r} "
                f"({type(k).__name__}); available depths: {available}."
            )
    depths = [int(k) for k in depths]
    if not depths:
        raise ValueError(
            f"depth={depth!r} names no depth; pass some of the available depths {available}, or None (all)."
        )
    if ax is not None and len(depths) > 1:
        raise ValueError(
            f"ax= holds one depth's tissue map, got depth={depths}; pass one depth, or leave ax=None for a figure "
            "with a panel per depth."
        )
    for k in depths:
        if k not in available:
            raise ValueError(f"depth={k} has no gate; available depths: {available}.")
    return depths


def _sequence_order(adata: AnnData, order_key: str | None, record: str | None, sequence: bool) -> str | None:
    """The ``obs`` column of the serialization order for the panel along the curve, or ``None`` (with a warning).

    ``order_key=None`` takes the one recorded by :func:`~dfmamba_st.tl.embed` (else its default ``'dfm_order'``).
    """
    if not sequence:
        return None
    if order_key is not None:
        if order_key not in adata.obs:
            raise KeyError(
                f"order_key={order_key!r} is not a column of adata.obs (the order of dfm.pp.serialize); "
                f"columns: {list(adata.obs.columns)}."
            )
        return order_key
    candidate = str(recorded_param(adata, record, "order_key") or "dfm_order")
    if candidate in adata.obs:
        return candidate
    warnings.warn(
        f"No serialization order found (obs[{candidate!r}] is missing): the panel along the sequence shows the spots "
        "in AnnData order, not along the curve. Pass order_key= (the key_added of dfm.pp.serialize).",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
    return None


def gates(
    adata: AnnData,
    depth: int | Sequence[int] | None = None,
    *,
    key: str = "X_dfm",
    order_key: str | None = None,
    sequence: bool = True,
    library_key: str | None = None,
    library_id: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    ncols: int = 4,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs,
) -> Figure | Axes | list[Axes] | None:
    """The fractal gate of each depth on the tissue (0 = local view, 1 = coarse global view) and along the sequence.

    Parameters
    ----------
    adata
        Embedded with :func:`dfmamba_st.tl.embed` (reads ``obsm[key + '_gates']``).
    depth
        Depth(s) to draw (whole numbers); all fusing depths by default (the first one into an ``ax=``).
    key
        The ``key_added`` of :func:`~dfmamba_st.tl.embed`; its run's record gives the default ``library_key`` and
        ``order_key``.
    order_key
        The serialization order (for the panel along the sequence); by default the one
        :func:`~dfmamba_st.tl.embed` read. Without one the panel shows AnnData order, with a warning.
    sequence
        Add a panel with the gates along the curve (rolling mean over 25 spots).
    library_key
        ``obs`` column of the libraries (default: the one given to :func:`~dfmamba_st.tl.embed`).
    library_id
        The library to draw. By default every library, each in its own panels (their coordinates overlap, so they
        are never drawn into one axes); with several libraries, ``ax=`` needs a ``library_id``. A subset holding one
        library of several is drawn over that library's image.
    vmin, vmax
        The gate values at the ends of the colour map, the same for every tissue panel.
        By default the 1st and 99th percentiles of the gates of every depth of the libraries drawn (trained gates
        often lie within 0.3–0.6, which on the full 0–1 scale looks uniform), so a gate value has one colour whichever
        depth is drawn, also in panels drawn one at a time with ``ax=``; ``vmin=0, vmax=1`` gives the full scale. A
        ``norm=`` (passed on through ``**kwargs``) replaces them.
    ncols
        Panels per row when several libraries are drawn: as many libraries side by side as fit (at least one).
    ax
        Draw one depth's tissue map into this axes.
    show
        Show the figure (default: when neither ``ax`` nor ``return_fig`` is given).
    return_fig
        Return the figure. There is no ``save=``: save the figure returned (``fig.savefig("gates.png", dpi=150,
        bbox_inches="tight")``).
    **kwargs
        Passed on to :func:`squidpy.pl.spatial_scatter` for every tissue panel, over this function's own settings:
        e.g. ``size=`` (spot size, a factor), ``cmap=``, ``img_alpha=``, ``legend_fontsize=``, ``frameon=``. Not
        ``color``, ``ax`` or ``title``, which each panel sets.

    Returns
    -------
    With ``ax``: the figure of ``ax`` if ``return_fig``, else ``None`` if ``show=True``, else ``ax`` itself (``show``
    defaults to ``False`` there). Without ``ax``: the figure if ``return_fig``, else a flat list of every panel's axes
    (library by library, each library's panels left to right) when ``show=False``, else ``None``.

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

    One tissue map per fusing depth and the panel along the sequence (the colour bars, labelled 'gate', have no title).
    """
    _require_embedding(adata, key)
    record = _embed_record(adata, key)
    coordinates = _coordinates(adata, record)
    libraries = _libraries(adata, library_key, library_id, record, ax=ax, spatial_key=coordinates)
    values = np.asarray(adata.obsm[f"{key}_gates"])
    available = [k for k in range(values.shape[1]) if np.isfinite(values[:, k]).any()]
    if not available:
        raise ValueError("No depth produced a gate (the sequences were shorter than min_len, or depth=0).")
    depths = _depths(depth, available, ax=ax)
    drawn = np.concatenate([np.asarray(spots.obsm[f"{key}_gates"])[:, available] for _, spots in libraries])
    vmin, vmax = gate_range(drawn, vmin, vmax)
    style = dict(cmap="magma", vmin=vmin, vmax=vmax, spatial_key=coordinates, scatter=_scatter_options(kwargs))
    style["colorbar_label"] = "gate"
    if ax is not None:
        ((lib, spots),) = libraries
        gate = np.asarray(spots.obsm[f"{key}_gates"])[:, depths[0]]
        _tissue(spots, gate, ax=ax, title=f"gate, depth {depths[0]}", library_id=lib, **style)
        return _finish(ax.figure, ax, show=show, return_fig=return_fig, ax_given=True)
    order_key = _sequence_order(adata, order_key, record, sequence)
    n_panels = len(depths) + int(sequence)
    fig, groups = _panels(len(libraries), n_panels, ncols, (4.2, 4.2))
    with _closed_on_error(fig):
        for row, (lib, spots) in zip(groups, libraries):
            prefix = f"{lib}:\n" if len(libraries) > 1 else ""  # a line of its own: a long name was cut off
            gates_here = np.asarray(spots.obsm[f"{key}_gates"])
            for a, k in zip(row, depths):
                title = f"{prefix}gate, depth {k} (0 local, 1 global)"
                _tissue(spots, gates_here[:, k], ax=a, title=title, library_id=lib, warn_image=a is row[0], **style)
            if sequence:
                title = f"{prefix}gates along the sequence"
                _gates_along_sequence(row[-1], spots, gates_here, depths, order_key, title=title)
    fig.tight_layout()
    _fit_legends(fig)
    return _finish(fig, [a for row in groups for a in row], show=show, return_fig=return_fig, ax_given=False)


def _gates_along_sequence(
    ax: Axes, spots: AnnData, values: np.ndarray, depths: list[int], order_key: str | None, *, title: str
) -> None:
    """The gates of one library along its curve (rolling mean over 25 spots); in AnnData order without a curve."""
    order = np.argsort(spots.obs[order_key].to_numpy(), kind="stable") if order_key is not None else None
    for k in depths:
        series = pd.Series(values[order, k] if order is not None else values[:, k])
        smooth = series.rolling(25, min_periods=1, center=True).mean().to_numpy()
        ax.plot(smooth, lw=1, marker="." if len(series) < 25 else None, label=f"depth {k}")  # a few spots: dots
    ax.set_xlabel("position along the curve" if order is not None else "spot, in AnnData order (no curve found)")
    ax.set_ylabel("gate (rolling mean)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize="small")


def _domain_palette(
    adata: AnnData, key: str, truth_key: str | None, ignore: Hashable | Sequence[Hashable] | None = ()
) -> tuple[list | None, dict | None, pd.Series, pd.Series | None]:
    """Colours of the domains (a list over their categories, or ``None``: scanpy's) and of the annotation.

    Matched on every spot of ``adata``, so that a domain has one colour whichever library is drawn.

    The annotation keeps ``uns[truth_key + '_colors']`` when it has one colour per category (else the colours scanpy
    would give it, :func:`_default_colours`). A domain takes the colour of the label it overlaps most
    (never a label in ``ignore``, which :func:`~dfmamba_st.metrics.evaluate` does not score), unless another domain
    holds more spots of that label; the others get spare colours, distinct while any are left. Without
    ``truth_key``, the domains keep ``uns[key + '_colors']`` when it fits.
    """
    pred = adata.obs[key].astype("category")
    if truth_key is None:
        stored = _category_colours(adata, key, pred.cat.categories)  # one colour per category, or None
        return (list(stored.values()) if stored else None), None, pred, None
    truth = adata.obs[truth_key].astype("category")
    truth_palette = _category_colours(adata, truth_key, truth.cat.categories)
    if truth_palette is None:
        truth_palette = dict(zip(truth.cat.categories, _default_colours(len(truth.cat.categories))))
    table = pd.crosstab(pred, truth)
    table = table.loc[:, ~_is_missing(table.columns.to_series(), ignore)]
    palette = {}
    if table.shape[1]:
        # a domain can take only the label it overlaps most; of the domains whose largest label is the same, the
        # one with the most spots of it takes it, the others get spare colours (never a label they barely touch)
        overlap = table.max(axis=1)
        largest = table.idxmax(axis=1)[overlap > 0].astype(object)
        for label, domains in overlap[overlap > 0].groupby(largest, sort=False):
            palette[domains.idxmax()] = truth_palette[label]
    unmatched = [c for c in pred.cat.categories if c not in palette]
    taken = [truth_palette[t] for t in truth.cat.categories] + ["lightgrey"]
    palette.update(zip(unmatched, _spare_colours(len(unmatched), taken)))
    return [palette[c] for c in pred.cat.categories], truth_palette, pred, truth


def _palette_colours(palette, categories: pd.Index) -> list:
    """One colour per category from a ``palette=``.

    A list of colours (cycled), a ``{category: colour}`` mapping, a matplotlib colormap or its name (the colours of
    a listed map of up to :data:`QUALITATIVE_MAX` cycled, as tab10's; any other map, as viridis, sampled evenly).
    """
    return [to_hex(colour) for colour in _palette_entries(palette, categories)]


def _palette_entries(palette, categories: pd.Index) -> list:
    """:func:`_palette_colours` before the colours are made hex strings."""
    n = len(categories)
    if isinstance(palette, pd.Series):
        palette = palette.to_dict()
    if isinstance(palette, Mapping):
        missing = [c for c in categories if c not in palette]
        if missing:
            raise ValueError(f"palette= has no colour for the domains {missing[:10]}; it maps {list(palette)[:10]}.")
        return [palette[c] for c in categories]
    if isinstance(palette, str):
        try:
            palette = plt.get_cmap(palette)
        except ValueError as err:
            raise ValueError(f"palette={palette!r} is not a matplotlib colormap name: {err}") from None
    if isinstance(palette, ListedColormap) and palette.N <= QUALITATIVE_MAX:  # tab10, Set1: cycle the colours
        palette = list(palette.colors)
    elif isinstance(palette, Colormap):
        return [palette(x) for x in np.linspace(0, 1, max(n, 1))][:n]
    if isinstance(palette, Sequence | np.ndarray) and len(palette) > 0:
        return [palette[i % len(palette)] for i in range(n)]
    raise TypeError(
        "palette= takes a list of colours, a {domain: colour} dict, a matplotlib colormap or its name; "
        f"got {type(palette).__name__}."
    )


def _store_colours(adata: AnnData, key: str, colours: dict | None) -> None:
    """Write the domains' colours to ``uns[key + '_colors']``, in the order of the whole column's categories."""
    if colours is None:
        raise ValueError(
            "store_colors=True needs truth_key= (the colours are those matched to the annotation) or palette=."
        )
    categories = adata.obs[key].astype("category").cat.categories
    adata.uns[f"{key}_colors"] = np.asarray([colours[c] for c in categories], dtype=object)


def domains(
    adata: AnnData,
    key: str = "dfm_domain",
    *,
    truth_key: str | None = None,
    ignore: Hashable | Sequence[Hashable] | None = ("undetermined",),
    library_key: str | None = None,
    library_id: str | None = None,
    ncols: int = 4,
    store_colors: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs,
) -> Figure | Axes | list[Axes] | None:
    """Spatial domains on the tissue, next to a reference annotation when ``truth_key`` is given.

    A domain takes the colour of the annotated label it overlaps most (so a correct domain has its layer's colour),
    unless another domain holds more spots of that label, as when a layer is split;
    the annotation keeps its ``uns[truth_key + '_colors']`` when it has one colour per category, as in scanpy.
    Domains that match no label get colours of their own (no greys, no near-whites, none twice while any is left).

    Parameters
    ----------
    adata
        Clustered with :func:`dfmamba_st.tl.cluster`.
    key
        ``obs`` column of the domains.
    truth_key
        ``obs`` column of a manual annotation to draw alongside.
    ignore
        Annotation labels that mean "not annotated", as in :func:`~dfmamba_st.metrics.evaluate` (e.g. her2st's
        ``"undetermined"``): drawn in their own colour, which no domain takes.
    library_key
        ``obs`` column of the libraries (default: the one given to :func:`~dfmamba_st.tl.cluster`).
    library_id, ncols
        As in :func:`gates`.
    store_colors
        With ``truth_key`` or ``palette=``: write the domains' colours (matched, or the palette's) to
        ``uns[key + '_colors']``, where scanpy's plots (``sc.pl.umap``, ``sc.pl.spatial``) and later calls without
        ``truth_key`` find them; without either, a ValueError. Off by default: the plots leave ``adata`` as it was.
    ax
        Draw the domains (only) into this axes; with ``truth_key`` they keep the colours matched to the annotation,
        which is not drawn (draw it into another axes with ``key=truth_key``).
    show, return_fig
        As in :func:`gates`.
    **kwargs
        Passed on to :func:`squidpy.pl.spatial_scatter` for every tissue panel, as in :func:`gates` (e.g.
        ``size=``, ``legend_fontsize=``, ``legend_loc="on data"``). ``palette=`` replaces the domains' matched colours,
        not the annotation's: a list of colours (cycled), a ``{domain: colour}`` dict, a matplotlib colormap or its
        name.

    Returns
    -------
    With ``ax``: the figure of ``ax`` if ``return_fig``, else ``None`` if ``show=True``, else ``ax`` itself (``show``
    defaults to ``False`` there). Without ``ax``: the figure if ``return_fig``, else a flat list of every panel's axes
    (library by library, each library's panels left to right) when ``show=False``, else ``None``.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> dfm.pp.serialize(adata)
    >>> dfm.tl.embed(adata, epochs=1, progress=False)  # a short run; the default trains 20 epochs
    >>> dfm.tl.cluster(adata, n_clusters=7)
    >>> axes = dfm.pl.domains(adata, truth_key="layer", show=False)
    >>> [ax.get_title() for ax in axes]
    ['layer', 'dfm_domain']

    The annotation next to the domains, each domain in the colour of the layer it overlaps
    most (a split layer's smaller part in a colour of its own). Into axes of your
    own (the domains only), the axes come back:

    >>> fig, ax = plt.subplots()
    >>> dfm.pl.domains(adata, ax=ax) is ax
    True
    """
    _require_domains(adata, key)
    if truth_key is not None and truth_key not in adata.obs:
        raise KeyError(
            f"adata.obs[{truth_key!r}] not found: pass truth_key= the obs column of the annotation; "
            f"columns: {list(adata.obs.columns)}."
        )
    scatter = _scatter_options(kwargs)
    use_rep = recorded_param(adata, key, "use_rep")
    embedding = _embed_record(adata, str(use_rep)) if use_rep is not None else None
    coordinates = _coordinates(adata, embedding, "dfm_order")
    libraries = _libraries(adata, library_key, library_id, key, ax=ax, spatial_key=coordinates)
    colours, truth_palette, pred, truth = _domain_palette(adata, key, truth_key, ignore)
    palette = scatter.pop("palette", None)
    if palette is not None:  # the caller's colours for the domains (not the annotation's)
        colours = _palette_colours(palette, pred.cat.categories)
    if store_colors:
        chosen = truth is not None or palette is not None
        _store_colours(adata, key, dict(zip(pred.cat.categories, colours)) if chosen else None)
    # explicit colours, so that a library's panel can list only the domains it holds and keep every colour
    colours = colours or _default_colours(len(pred.cat.categories))

    def column(spots: AnnData, name: str, categories: pd.Index, colours: list) -> tuple[pd.Series, list]:
        """The panel's values, with the categories present among ``spots`` (all if none is), and their colours."""
        here = np.asarray(categories.isin(spots.obs[name].dropna().unique()))
        here = here if here.any() else np.ones(len(categories), dtype=bool)
        values = pd.Categorical(spots.obs[name].to_numpy(), categories=categories[here])
        return pd.Series(values, index=spots.obs_names), [c for c, h in zip(colours, here) if h]

    if ax is not None:
        ((lib, spots),) = libraries
        values, shown = column(spots, key, pred.cat.categories, colours)
        style = dict(palette=shown, library_id=lib, spatial_key=coordinates, scatter=scatter)
        _tissue(spots, values, ax=ax, title=key, **style)
        return _finish(ax.figure, ax, show=show, return_fig=return_fig, ax_given=True)
    n = 2 if truth is not None else 1
    fig, groups = _panels(len(libraries), n, ncols, (5.2, 4.6))
    truth_colours = [truth_palette[c] for c in truth.cat.categories] if truth is not None else None
    with _closed_on_error(fig):
        for row, (lib, spots) in zip(groups, libraries):
            prefix = f"{lib}: " if len(libraries) > 1 else ""
            if truth is not None:
                values, shown = column(spots, truth_key, truth.cat.categories, truth_colours)
                _tissue(
                    spots,
                    values,
                    ax=row[0],
                    title=prefix + truth_key,
                    palette=shown,
                    library_id=lib,
                    spatial_key=coordinates,
                    scatter=scatter,
                )
            values, shown = column(spots, key, pred.cat.categories, colours)
            _tissue(
                spots,
                values,
                ax=row[-1],
                title=prefix + key,
                palette=shown,
                library_id=lib,
                spatial_key=coordinates,
                scatter=scatter,
                warn_image=truth is None,  # else the annotation's panel said it
            )
    fig.tight_layout()
    _fit_legends(fig)
    return _finish(fig, [a for row in groups for a in row], show=show, return_fig=return_fig, ax_given=False)


def bic(
    adata: AnnData,
    key: str = "dfm_domain",
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """The BIC curve from which ``tl.cluster(n_clusters=None)`` chose the number of domains, and its choice.

    The chosen K is the knee: with K and BIC scaled to [0, 1], the point furthest below the straight line from the
    first to the last K tried (drawn dashed); the title gives its depth below that line. A curve that keeps falling
    without a clear bend (a shallow knee, "weak") means the number of domains is uncertain: pass ``n_clusters`` when
    it is known.

    Parameters
    ----------
    adata
        Clustered with :func:`dfmamba_st.tl.cluster`, ``method='gmm'`` or ``'kmeans'`` and ``n_clusters=None``
        (reads ``uns[key]['bic']``).
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
    _require_domains(adata, key)
    record = adata.uns.get(key, {})
    if not isinstance(record, Mapping) or "bic" not in record:
        method = recorded_param(adata, key, "method")
        if method is None:
            why = f"obs[{key!r}] has no record of dfm.tl.cluster (uns[{key!r}]['params'])"
        elif method == "leiden":
            why = (
                "method='leiden' sets the number of domains by its resolution (searched to give n_clusters, or 1 "
                "with n_clusters=None), not on a BIC curve; only 'gmm' and 'kmeans' with n_clusters=None choose it "
                "there"
            )
        else:
            why = (
                f"the number of domains was given, not chosen (method={method!r}, n_clusters="
                f"{recorded_param(adata, key, 'n_clusters')}); run dfm.tl.cluster(adata, n_clusters=None) for the curve"
            )
        raise ValueError(f"uns[{key!r}] holds no BIC curve: {why}.")
    ks = np.array(sorted(int(k) for k in record["bic"]))
    values = np.array([float(record["bic"][str(k)]) for k in ks])
    chosen = int(record["params"]["n_clusters"])
    given = ax is not None
    if ax is None:
        fig, ax = plt.subplots(figsize=_figsize(5, 3.4))
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
    ax.legend(frameon=False, fontsize="small")
    if not given:
        fig.tight_layout()
    return _finish(fig, ax, show=show, return_fig=return_fig, ax_given=given)


def training(
    adata: AnnData,
    *,
    key: str = "X_dfm",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Loss curves of :func:`dfmamba_st.tl.embed` (total, masked-spot reconstruction, auxiliary) per epoch.

    The auxiliary multi-scale terms (reconstruction of each depth's pairs, consistency of the depths, gate
    smoothness) are computed on the model's own features, which grow in scale as it trains, so they (and with them
    the total) usually rise while the masked-spot loss falls: a rising total is no sign of divergence. The
    masked-spot curve is the one that says how training went.

    Parameters
    ----------
    adata
        Embedded with :func:`dfmamba_st.tl.embed`.
    key
        The ``key_added`` of :func:`~dfmamba_st.tl.embed`: its run's record (``uns['dfm']`` for ``'X_dfm'``, else
        ``uns[key]``) holds the losses.
    ax, show, return_fig
        As in :func:`gates`.

    Returns
    -------
    The figure if ``return_fig``, else the axes when ``show=False``, else ``None``.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> dfm.pp.serialize(adata)
    >>> dfm.tl.embed(adata, epochs=1, progress=False)  # a short run: one point per curve
    >>> fig = dfm.pl.training(adata, return_fig=True)
    >>> ax = fig.axes[0]
    >>> ax.get_title(), ax.get_xlabel()
    ('dfm.tl.embed training', 'epoch')
    >>> [line.get_label() for line in ax.get_lines()]
    ['total', 'masked-spot reconstruction', 'auxiliary (DF-Mamba)']
    """
    record = _embed_record(adata, key)
    if record is None:
        found = [k for k in _embeddings(adata) if _embed_record(adata, k) is not None]
        raise _missing(
            f"The record of dfm.tl.embed's run for key={key!r} (adata.uns[{embed_record_key(key)!r}])",
            found,
            "dfm.tl.embed",
        )
    history = adata.uns[record].get("history", {})
    if not len(history) or "train_loss" not in history:
        raise ValueError(
            f"uns[{record!r}] holds no training history (the embedding came from a pre-trained model, or from "
            "epochs=0: no training)."
        )
    given = ax is not None
    if ax is None:
        fig, ax = plt.subplots(figsize=_figsize(6.8, 3.4))
    fig = ax.figure
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    labels = {"train_loss": "total", "masked_mse": "masked-spot reconstruction", "aux": "auxiliary (DF-Mamba)"}
    for name, label in labels.items():
        if name in history:
            ax.plot(epochs, np.asarray(history[name]), marker="o", ms=3, lw=1.2, label=label)
    ax.set_xlabel("epoch")
    if len(epochs) == 1:  # matplotlib pads a single point by 5 %, a range without two whole epochs to tick
        ax.set_xlim(0, 2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.set_title("dfm.tl.embed training" + (f" ({key})" if key != "X_dfm" else ""))
    if given:  # in the caller's axes: beside them it would lie under the next panel of their grid
        ax.legend(frameon=False, fontsize="small", loc="best")
    else:  # beside the axes, never over the curves (the figure is widened to fit it)
        ax.legend(frameon=False, fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    if not given:
        fig.tight_layout()
        _fit_legends(fig)
    return _finish(fig, ax, show=show, return_fig=return_fig, ax_given=given)
