"""Edges of the plots and the command line: subsets of several slices, many domains, colours, the recorded keys, the
depth argument, spot sizes and zoom, legends, and the command line's checks before any work."""

import re
import warnings
from pathlib import Path

import anndata as ad
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import Normalize, to_hex, to_rgb

import dfmamba_st as dfm
from dfmamba_st.__main__ import _parser, main

matplotlib.use("Agg")

from _shared import crop as crop_window
from _shared import shared_path as shared
from _shared import warned_at

QUICK = dict(epochs=1, d_model=16, n_pcs=20, progress=False)


def crop(adata, rows=(0, 30)):
    """Rows of a slice across its whole width."""
    return crop_window(adata, rows=rows, cols=(0, 200))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def embedded(bundled):
    """The top of the bundled slice (1,465 spots), serialized, embedded (one epoch) and clustered into 7 and 25."""
    adata = crop(bundled)
    dfm.pp.serialize(adata)
    dfm.tl.embed(adata, **QUICK)
    dfm.tl.cluster(adata, 7, n_init=2)
    dfm.tl.cluster(adata, 25, n_init=1, key_added="dom25")
    return adata


@pytest.fixture(scope="module")
def two_slices():
    """Crops of 151673 and 151674 in one AnnData (overlapping coordinates), each with its own image."""
    slices = {s: crop(ad.read_h5ad(shared("dlpfc", f"dlpfc_{s}.h5ad")), rows=(0, 15)) for s in ("151673", "151674")}
    adata = ad.concat(slices, label="lib", join="inner", uns_merge="unique", index_unique="-")
    assert sorted(adata.uns["spatial"]) == ["151673", "151674"]
    dfm.pp.serialize(adata, library_key="lib")
    dfm.tl.embed(adata, library_key="lib", **QUICK)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*lie almost only in one library")  # two crops of two sections
        dfm.tl.cluster(adata, 5, n_init=2, library_key="lib")
    return adata


def legend_colours(ax) -> dict[str, str]:
    """``{label: colour}`` of the legend beside a tissue panel."""
    legend = ax.get_legend()
    return {
        text.get_text(): to_hex(handle.get_facecolor()[0])
        for text, handle in zip(legend.get_texts(), legend.legend_handles)
    }


def scatter(ax):
    """The spots' collection of a tissue panel (the one with the most points)."""
    return max(ax.collections, key=lambda c: len(c.get_offsets()))


# --- 3: a subset holding one library of several ----------------------------------------------------------------------


def test_a_domain_has_the_same_colour_whichever_library_is_drawn(two_slices):
    """Audit s43, finding 3: the colours were matched on the library drawn, so with library_id= a domain could take
    another colour (even another layer's) than in the figure of every library."""
    adata = two_slices.copy()
    domains = adata.obs["dfm_domain"].astype("category")
    in_b = (adata.obs["lib"] == "151674").to_numpy()
    codes = domains.cat.codes.to_numpy().copy()
    codes[in_b] = (codes[in_b] + 1) % len(domains.cat.categories)  # each domain overlaps other layers there
    adata.obs["dfm_domain"] = pd.Categorical.from_codes(codes, domains.cat.categories)
    panels = dfm.pl.domains(adata, truth_key="layer", show=False)
    every = legend_colours(panels[1])
    assert every == legend_colours(panels[3])
    for lib in ("151673", "151674"):
        fig, ax = plt.subplots()
        dfm.pl.domains(adata, truth_key="layer", library_id=lib, ax=ax)
        here = set(adata.obs.loc[(adata.obs["lib"] == lib).to_numpy(), "dfm_domain"].astype(str))
        assert legend_colours(ax) == {d: c for d, c in every.items() if d in here}, lib  # its own domains only
        plt.close(fig)


def test_palette_takes_a_list_a_dict_or_a_colormap(embedded):
    categories = list(embedded.obs["dfm_domain"].cat.categories)
    listed = ["red", "blue", "green"]
    mapped = {c: "#123456" if i == 0 else "#abcdef" for i, c in enumerate(categories)}
    for palette, want in (
        (listed, [listed[i % 3] for i in range(len(categories))]),
        (mapped, [mapped[c] for c in categories]),
        (pd.Series(mapped), [mapped[c] for c in categories]),
        ("tab10", list(plt.get_cmap("tab10").colors[: len(categories)])),
        (plt.get_cmap("viridis"), [plt.get_cmap("viridis")(x) for x in np.linspace(0, 1, len(categories))]),
    ):
        adata = embedded.copy()
        fig, ax = plt.subplots()
        dfm.pl.domains(adata, palette=palette, store_colors=True, ax=ax)
        want = [to_hex(w) for w in want]
        assert legend_colours(ax) == dict(zip(categories, want))
        assert list(adata.uns["dfm_domain_colors"]) == want  # hex strings: the AnnData can still be written
        plt.close(fig)
    fig, ax = plt.subplots()
    dfm.pl.domains(embedded, palette=None, ax=ax)  # squidpy's default value: the matched colours
    plt.close(fig)
    with pytest.raises(ValueError, match=r"palette= has no colour for the domains \['1'"):
        dfm.pl.domains(embedded, palette={categories[0]: "red"}, show=False)
    with pytest.raises(TypeError, match="palette= takes a list of colours"):
        dfm.pl.domains(embedded, palette=3, show=False)


def test_a_library_without_its_image_is_named_once_per_figure(two_slices):
    adata = two_slices.copy()
    adata.uns["spatial"] = {"151673": adata.uns["spatial"]["151673"]}  # 151674's image gone
    for draw in (dfm.pl.domains, dfm.pl.gates):
        with pytest.warns(UserWarning, match="holds no image for library '151674'") as caught:
            fig = draw(adata, **({"truth_key": "layer"} if draw is dfm.pl.domains else {}), return_fig=True)
        plt.close(fig)
        assert sum("holds no image" in str(w.message) for w in caught) == 1, draw.__name__  # one per panel before


def test_the_gates_of_one_library_span_that_library_s_gates(two_slices):
    in_b = (two_slices.obs["lib"] == "151674").to_numpy()
    gates = np.asarray(two_slices.obsm["X_dfm_gates"])[in_b]
    want = np.percentile(gates[np.isfinite(gates)], [1, 99])  # every depth of that library
    fig, ax = plt.subplots()
    dfm.pl.gates(two_slices, depth=0, library_id="151674", ax=ax)
    norm = scatter(ax).norm
    plt.close(fig)
    assert (norm.vmin, norm.vmax) == pytest.approx(tuple(want))


def test_gates_span_the_gates_drawn_unless_given_a_range(embedded):
    """Audit s43, finding 2: on 0-1 the trained gates (within about 0.3-0.6) looked uniform, and vmin=/vmax= were
    ignored (the panels' own norm won). Audit s46, finding 3: one range for every depth, also where each is drawn
    into its own axes (each took its own range, so one colour meant other values side by side)."""
    gates = np.asarray(embedded.obsm["X_dfm_gates"])
    low, high = np.percentile(gates[np.isfinite(gates)], [1, 99])  # of every depth, whichever is drawn

    def limits(depth=0, **kwargs):
        fig, ax = plt.subplots()
        dfm.pl.gates(embedded, ax=ax, depth=depth, **kwargs)
        norm = scatter(ax).norm
        plt.close(fig)
        return norm.vmin, norm.vmax

    assert limits() != pytest.approx((0, 1)) and limits() == pytest.approx((low, high))
    for k in range(1, gates.shape[1]):
        if np.isfinite(gates[:, k]).any():
            assert limits(depth=k) == limits()
    assert limits(vmin=0, vmax=1) == (0, 1)
    assert limits(norm=Normalize(0.2, 0.7)) == (0.2, 0.7)
    assert limits(vmin=high + 0.05) == (high + 0.05, 1.0)  # the automatic end moves out of the way (review s43)
    assert limits(vmax=low - 0.05) == (0.0, low - 0.05)
    with pytest.raises(ValueError, match="vmin must be below vmax"):
        dfm.pl.gates(embedded, vmin=0.5, vmax=0.5, show=False)
    fig = dfm.pl.gates(embedded, depth=0, sequence=False, return_fig=True)
    bars = [bar.get_ylabel() for a in fig.axes for bar in a.child_axes]  # the colour bar, the map's inset
    assert bars == ["gate"]  # and its label


def test_a_subset_to_one_library_is_drawn_over_its_own_image(two_slices):
    one = two_slices[(two_slices.obs["lib"] == "151674").to_numpy()].copy()
    assert len(one.uns["spatial"]) == 2  # both images still there
    image = one.uns["spatial"]["151674"]["images"]["lowres"]
    fig = dfm.pl.domains(one, truth_key="layer", return_fig=True, show=False)
    tissue = [ax for ax in fig.axes if ax.get_title()]
    assert len(tissue) == 2
    for ax in tissue:
        assert ax.images, ax.get_title()
        assert ax.images[0].get_array().shape == image.shape
        assert np.allclose(ax.images[0].get_array(), image)  # 151674's image, not 151673's
    fig = dfm.pl.gates(one, return_fig=True, show=False)
    maps = [ax for ax in fig.axes if ax.get_title().startswith("gate, depth")]
    assert maps and all(ax.images for ax in maps)


# --- 7: legends of many domains -------------------------------------------------------------------------------------


@pytest.mark.parametrize("truth_key", [None, "layer"])
def test_a_legend_of_25_domains_fits_on_the_figure(embedded, truth_key):
    fig = dfm.pl.domains(embedded, "dom25", truth_key=truth_key, return_fig=True, show=False)
    fig.canvas.draw()
    width, height = fig.bbox.width, fig.bbox.height
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= width + 0.5 and box.y0 >= 0 and box.y1 <= height + 0.5, (box, width)
        # and off the panel: the legend stands beside the tissue
        assert box.x0 >= ax.get_window_extent().x1 - 1


# --- 8, 9: colours --------------------------------------------------------------------------------------------------


# 10 and 20: as many labels as the colour cycle holds (tab10, default_20), which scanpy still takes
@pytest.mark.parametrize(
    ("n", "cycle"), [(25, None), (16, None), (10, None), (7, None), (7, "default_20"), (20, "default_20")]
)
def test_an_annotation_has_the_colours_scanpy_gives_it(embedded, n, cycle):
    """Audit s46, finding 1: 11-28 labels (or 7 after ``sc.set_figure_params``, whose colour cycle is default_20) had
    other colours than in ``sc.pl.spatial`` / ``sc.pl.umap`` (tab20, then default_102); the 16th was tab20's grey."""
    import scanpy as sc
    from cycler import cycler
    from scanpy.plotting import palettes

    adata = embedded.copy()
    adata.obs["labels"] = pd.Categorical((adata.obs["dom25"].cat.codes % n).astype(str))
    theirs = adata.copy()  # scanpy stores the colours it picks in uns: on a copy, or dfm would read them back
    rc = {"axes.prop_cycle": cycler(color=palettes.default_20)} if cycle else {}
    with matplotlib.rc_context(rc):
        fig = dfm.pl.domains(adata, truth_key="labels", return_fig=True, show=False)
        sc.pl.embedding(theirs, basis="spatial", color="labels", show=False)
    plt.close("all")
    colours = legend_colours(fig.axes[0])
    categories = theirs.obs["labels"].cat.categories
    assert len(categories) == n and len({colours[c] for c in categories}) == n
    assert {c: colours[c] for c in categories} == dict(zip(categories, map(to_hex, theirs.uns["labels_colors"])))


def test_domains_matching_no_label_get_distinct_colours_that_are_neither_grey_nor_pastel(embedded):
    fig = dfm.pl.domains(embedded, "dom25", truth_key="layer", return_fig=True, show=False)
    truth, domains = legend_colours(fig.axes[0]), legend_colours(fig.axes[1])
    assert len(domains) == 25 and len(set(domains.values())) == 25  # no colour twice
    spare = [c for c in domains.values() if c not in truth.values()]
    assert len(spare) >= 25 - len(truth)
    for colour in spare:
        rgb = np.asarray(to_rgb(colour))
        assert rgb.max() - rgb.min() >= 0.3, colour  # not a grey like the NA colour (lightgrey), nor a pastel
        assert (rgb.max() + rgb.min()) / 2 <= 0.7, colour  # not a pastel or near-white, faint over the H&E image
        assert np.linalg.norm(rgb - np.asarray(to_rgb("lightgrey"))) > 0.1
        assert min(np.linalg.norm(rgb - np.asarray(to_rgb(t))) for t in truth.values()) >= 0.1, colour
    # and from each other: here enough candidates lie this far apart (the first distance `_spare_colours` tries)
    spare_rgb = [np.asarray(to_rgb(c)) for c in spare]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(spare_rgb) for b in spare_rgb[i + 1 :]) >= 0.25


@pytest.mark.parametrize("ignore", [("undetermined",), "Undetermined"])
def test_no_domain_takes_the_colour_of_an_ignored_label(embedded, ignore):
    adata = embedded.copy()
    largest = adata.obs["dfm_domain"].value_counts().index[0]
    truth = adata.obs["layer"].astype(object)
    truth[(adata.obs["dfm_domain"] == largest).to_numpy()] = "undetermined"  # as her2st marks unannotated spots
    adata.obs["truth"] = pd.Categorical(truth)
    fig = dfm.pl.domains(adata, truth_key="truth", ignore=ignore, return_fig=True, show=False)
    truth_colours, domains = legend_colours(fig.axes[0]), legend_colours(fig.axes[1])
    assert truth_colours["undetermined"] not in domains.values(), (truth_colours, domains)
    # with nothing ignored the label is matched like any other
    fig = dfm.pl.domains(adata, truth_key="truth", ignore=None, return_fig=True, show=False)
    truth_colours, domains = legend_colours(fig.axes[0]), legend_colours(fig.axes[1])
    assert domains[str(largest)] == truth_colours["undetermined"]


def test_domains_keep_the_annotations_stored_colours(embedded):
    adata = embedded.copy()
    categories = list(adata.obs["layer"].cat.categories)
    stored = ["#000000", "#ff0000", "#00ff00", "#0000ff", "#ff00ff", "#00ffff", "#808000"][: len(categories)]
    adata.uns["layer_colors"] = np.array(stored, dtype=object)
    fig = dfm.pl.domains(adata, truth_key="layer", return_fig=True, show=False)
    truth, domains = legend_colours(fig.axes[0]), legend_colours(fig.axes[1])
    present = set(adata.obs["layer"].dropna())
    assert {c: truth[c] for c in categories if c in present} == {
        c: s for c, s in zip(categories, stored) if c in present
    }
    # matched domains take the stored colours: one per label that is some domain's largest
    largest = set(pd.crosstab(adata.obs["dfm_domain"], adata.obs["layer"]).idxmax(axis=1))
    assert set(domains.values()) & set(stored) == {s for c, s in zip(categories, stored) if c in largest}
    assert len(largest) >= 3
    assert "layer_colors" in adata.uns and list(adata.uns["layer_colors"]) == stored  # left as it was
    adata.uns["layer_colors"] = np.array(stored[:2], dtype=object)  # one colour per category or none: scanpy's rule
    truth = legend_colours(dfm.pl.domains(adata, truth_key="layer", return_fig=True, show=False).axes[0])
    assert not set(truth.values()) & set(stored[:2])


def test_a_domain_never_takes_the_colour_of_a_label_it_barely_overlaps(bundled):
    """A domain whose largest label another domain holds more of gets a spare colour, not its second label's."""
    adata = bundled.copy()
    layer = adata.obs["layer"].astype(object).to_numpy()
    domain = layer.copy()
    in3, in4 = np.flatnonzero(layer == "Layer3"), np.flatnonzero(layer == "Layer4")
    domain[in4] = "Layer5"  # no domain of Layer4 itself: its colour is free
    domain[in3[:100]] = domain[in4[:20]] = "split"  # 100 Layer3 spots and 20 Layer4 spots
    adata.obs["domain"] = pd.Categorical(domain)
    fig = dfm.pl.domains(adata, "domain", truth_key="layer", return_fig=True, show=False)
    truth, domains = legend_colours(fig.axes[0]), legend_colours(fig.axes[1])
    assert domains["Layer3"] == truth["Layer3"] and domains["Layer5"] == truth["Layer5"]
    assert domains["split"] not in truth.values(), (domains, truth)  # a spare colour: it is mostly Layer3


def test_store_colors_writes_the_matched_colours_where_scanpy_reads_them(embedded):
    adata = embedded.copy()
    with pytest.raises(ValueError, match="store_colors=True needs truth_key="):
        dfm.pl.domains(adata, store_colors=True, show=False)
    assert "dfm_domain_colors" not in adata.uns
    fig = dfm.pl.domains(adata, truth_key="layer", store_colors=True, return_fig=True, show=False)
    matched = legend_colours(fig.axes[1])
    categories = list(adata.obs["dfm_domain"].cat.categories)
    assert [to_hex(c) for c in adata.uns["dfm_domain_colors"]] == [matched[c] for c in categories]
    # a later plot without the annotation, and scanpy's own, take the same colours
    assert legend_colours(dfm.pl.domains(adata, return_fig=True, show=False).axes[0]) == matched
    import scanpy as sc

    ax = sc.pl.embedding(adata, basis="spatial", color="dfm_domain", show=False)
    assert legend_colours(ax) == matched


def test_slices_pooled_without_a_library_key_are_warned_about(embedded):
    """After anndata.concat (which drops the recorded key) the slices' coordinates overlap: say so, or take the key."""
    both = ad.concat({"a": embedded, "b": embedded}, label="library", index_unique="-", uns_merge="same")
    for draw in (dfm.pl.domains, dfm.pl.gates):
        with pytest.warns(UserWarning, match=r"as another spot; drawn into one panel"):
            draw(both, return_fig=True, show=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            warnings.filterwarnings("ignore", message="uns..spatial.. holds no image")  # the libraries renamed
            draw(both, library_key="library", return_fig=True, show=False)


def test_an_option_nobody_takes_is_named_as_passed_on_to_squidpy(embedded):
    plt.close("all")
    for draw in (dfm.pl.domains, dfm.pl.gates):
        with pytest.raises(TypeError, match=r"\['bogus'\] went on to squidpy.pl.spatial_scatter"):
            draw(embedded, bogus=1, show=False)
    assert plt.get_fignums() == []  # the figure the plot made is closed


def test_plots_pass_their_other_options_on_to_squidpy_for_every_tissue_panel(embedded):
    default = dfm.pl.domains(embedded, truth_key="layer", return_fig=True, show=False)
    fig = dfm.pl.domains(embedded, truth_key="layer", size=0.5, legend_fontsize=11, return_fig=True, show=False)
    for before, after in zip(default.axes, fig.axes):  # both panels: the annotation and the domains
        assert {t.get_fontsize() for t in after.get_legend().get_texts()} == {11}
        width = [scatter(a).get_paths()[0].get_extents().width for a in (before, after)]  # a spot's circle
        assert width[1] == pytest.approx(0.5 * width[0])
    own = dfm.pl.domains(embedded, truth_key="layer", palette="Set1", return_fig=True, show=False)
    assert legend_colours(own.axes[0]) == legend_colours(default.axes[0])  # the annotation keeps its colours
    assert legend_colours(own.axes[1])["0"] == to_hex(plt.get_cmap("Set1").colors[0])
    fig = dfm.pl.gates(embedded, cmap="viridis", sequence=False, return_fig=True, show=False)
    assert scatter(fig.axes[0]).get_cmap().name == "viridis"
    for plot in (dfm.pl.domains, dfm.pl.gates):
        with pytest.raises(TypeError, match=r"\['title'\] cannot be passed on to squidpy"):
            plot(embedded, title="mine", show=False)


# --- 10: the serialization order ------------------------------------------------------------------------------------


def along_curve(fig):
    (ax,) = [ax for ax in fig.axes if ax.get_title().endswith("along the sequence")]
    return ax, np.asarray(ax.get_lines()[0].get_ydata())


def test_gates_follow_the_order_embed_read_and_warn_without_one(bundled):
    adata = crop(bundled, rows=(0, 12))
    dfm.pp.serialize(adata, key_added="myorder")
    dfm.tl.embed(adata, order_key="myorder", **QUICK)
    assert "dfm_order" not in adata.obs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, recorded = along_curve(dfm.pl.gates(adata, return_fig=True, show=False))
    assert not [w for w in caught if "serialization order" in str(w.message)]  # the recorded order is found
    _, given = along_curve(dfm.pl.gates(adata, order_key="myorder", return_fig=True, show=False))
    gates = adata.obsm["X_dfm_gates"]
    along = gates[np.argsort(adata.obs["myorder"].to_numpy(), kind="stable"), 0]
    expected = pd.Series(along).rolling(25, min_periods=1, center=True).mean().to_numpy()
    assert not np.allclose(along, gates[:, 0])  # the curve's order is not the AnnData order
    np.testing.assert_allclose(recorded, expected, rtol=1e-6)
    np.testing.assert_allclose(given, expected, rtol=1e-6)
    del adata.obs["myorder"]
    with pytest.warns(UserWarning, match=r"No serialization order found.*AnnData order") as caught:
        figure = dfm.pl.gates(adata, return_fig=True, show=False)
    assert warned_at(caught, "serialization order", __file__, once=True)  # points at the user's call
    ax, _ = along_curve(figure)
    assert "AnnData order" in ax.get_xlabel()
    with pytest.raises(KeyError, match=r"order_key='myorder' is not a column"):
        dfm.pl.gates(adata, order_key="myorder", show=False)


# --- 11: the depth argument -----------------------------------------------------------------------------------------


def test_gates_check_the_depth_argument(embedded):
    _, ax = plt.subplots()
    with pytest.raises(TypeError, match=r"depth must be a whole number.*got 1\.0"):
        dfm.pl.gates(embedded, depth=1.0, show=False)
    with pytest.raises(TypeError, match="depth must be a whole number"):
        dfm.pl.gates(embedded, depth=[0, "1"], show=False)
    for given in (None, ax):
        with pytest.raises(ValueError, match=r"depth=\[\] names no depth; pass some of the available depths \[0"):
            dfm.pl.gates(embedded, depth=[], ax=given, show=False)
    with pytest.raises(ValueError, match=r"ax= holds one depth's tissue map, got depth=\[0, 1\]"):
        dfm.pl.gates(embedded, depth=[0, 1], ax=ax, show=False)
    assert dfm.pl.gates(embedded, depth=[1], ax=ax, show=False) is ax
    assert ax.get_title() == "gate, depth 1"
    assert dfm.pl.gates(embedded, depth=np.int64(0), return_fig=True, show=False)


# --- 12: embeddings and domains under other keys --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:n_clusters=None chose .* no clear knee:UserWarning")  # a small crop: a weak knee
def test_plots_find_embeddings_and_domains_under_other_keys(bundled):
    adata = crop(bundled, rows=(0, 12))
    dfm.pp.serialize(adata)
    dfm.tl.embed(adata, key_added="X_mine", **{**QUICK, "epochs": 2})
    found = r"the keys of dfm.tl.embed's results here are \['X_mine'\]"
    with pytest.raises(KeyError, match=r"'X_dfm_gates'\] not found: " + found):
        dfm.pl.gates(adata, show=False)
    with pytest.raises(KeyError, match=r"key='X_dfm'.*" + found):
        dfm.pl.training(adata, show=False)
    assert dfm.pl.gates(adata, key="X_mine", return_fig=True, show=False)
    ax = dfm.pl.training(adata, key="X_mine", return_fig=True, show=False).axes[0]
    assert len(ax.get_lines()[0].get_xdata()) == 2 and "X_mine" in ax.get_title()
    dfm.tl.embed(adata, **QUICK)  # a second embedding keeps its own record

    def epochs(key):
        return len(dfm.pl.training(adata, key=key, return_fig=True, show=False).axes[0].get_lines()[0].get_xdata())

    assert (epochs("X_dfm"), epochs("X_mine")) == (1, 2)

    dfm.tl.cluster(adata, None, use_rep="X_mine", key_added="mydom", k_range=range(2, 6), n_init=1)
    adata.obs["notes"] = "x"  # an obs column of the user's: not a clustering
    for plot in (dfm.pl.domains, dfm.pl.bic):
        with pytest.raises(
            KeyError, match=r"'dfm_domain'\] not found: the keys of dfm.tl.cluster's results here are \['mydom'\]"
        ):
            plot(adata, show=False)
    assert dfm.pl.bic(adata, key="mydom", return_fig=True, show=False)


def test_missing_embedding_or_domains_still_say_which_tool_to_run(bundled):
    adata = crop(bundled, rows=(0, 5))
    with pytest.raises(KeyError, match=r"run dfm.tl.embed\(adata\) first"):
        dfm.pl.gates(adata, show=False)
    with pytest.raises(KeyError, match=r"run dfm.tl.embed\(adata\) first"):
        dfm.pl.training(adata, show=False)
    with pytest.raises(KeyError, match=r"run dfm.tl.cluster\(adata\) first"):
        dfm.pl.domains(adata, show=False)


# --- 13: why there is no BIC curve ----------------------------------------------------------------------------------


def test_bic_says_why_there_is_no_curve(embedded):
    adata = embedded.copy()
    dfm.tl.cluster(adata, None, method="leiden", key_added="leid")
    with pytest.raises(ValueError, match=r"method='leiden' sets the number of domains by its resolution"):
        dfm.pl.bic(adata, key="leid", show=False)
    dfm.tl.cluster(adata, 4, method="kmeans", key_added="km")
    with pytest.raises(ValueError, match=r"given, not chosen \(method='kmeans', n_clusters=4\)"):
        dfm.pl.bic(adata, key="km", show=False)
    adata.obs["mine"] = adata.obs["dfm_domain"]
    with pytest.raises(ValueError, match=r"obs\['mine'\] has no record of dfm.tl.cluster"):
        dfm.pl.bic(adata, key="mine", show=False)


# --- 14, 15: spot size without an image, zoom with one ---------------------------------------------------------------


def _circle_widths(ax):
    """Widths (data units) of the spots drawn as circles: squidpy's patches, the collection with the most."""
    spots = max(ax.collections, key=lambda c: len(c.get_paths()))
    return np.array([path.get_extents().width for path in spots.get_paths()])


def _nearest_spot_distance(xy):
    from scipy.spatial import cKDTree

    return np.median(cKDTree(xy).query(xy, 2)[0][:, 1])


def test_spots_without_an_image_are_circles_as_wide_as_they_lie_apart_whatever_the_crop(bundled):
    """A strip of 8 rows and a block of 30 rows: the same spots, the same circles (sized by scanpy's rule for
    embeddings, 120000 / n_obs points², the strip's spots merged into blobs)."""
    widths = []
    for rows in ((0, 30), (0, 8)):
        adata = crop(bundled, rows=rows)
        del adata.uns["spatial"]
        adata.obs["dfm_domain"] = adata.obs["layer"]
        ax = dfm.pl.domains(adata, return_fig=True, show=False).axes[0]
        assert not ax.images
        width = _circle_widths(ax)
        assert len(width) == adata.n_obs
        np.testing.assert_allclose(width, _nearest_spot_distance(np.asarray(adata.obsm["spatial"], float)), rtol=1e-6)
        widths.append(width[0])
    assert widths[0] == pytest.approx(widths[1])


def test_spots_of_her2st_without_an_image_are_circles_as_wide_as_they_lie_apart():
    adata = ad.read_h5ad(shared("her2st", "her2st_A1.h5ad"))
    adata.obs["dfm_domain"] = adata.obs["label"]
    ax = dfm.pl.domains(adata, return_fig=True, show=False).axes[0]
    np.testing.assert_allclose(_circle_widths(ax), _nearest_spot_distance(adata.obsm["spatial"]), rtol=1e-6)


def test_an_image_kept_under_another_name_or_without_scale_factors_is_named_in_a_warning(bundled):
    adata = crop(bundled, rows=(0, 30))
    adata.obs["dfm_domain"] = adata.obs["layer"]
    two = ad.concat({"L": adata, "R": adata}, label="lib", index_unique="-")
    image = adata.uns["spatial"]["151673"]
    two.uns["spatial"] = {"V1_L": image, "R": image}  # Space Ranger's name for one library, the label for the other
    with pytest.warns(UserWarning, match=r"holds no image for library 'L' \(it holds \['V1_L', 'R'\]\)") as caught:
        left, right = dfm.pl.domains(two, library_key="lib", return_fig=True, show=False).axes[:2]
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()  # points at the user's call
    assert not left.images and right.images
    plt.close("all")
    factors = {k: v for k, v in image["scalefactors"].items() if k != "tissue_lowres_scalef"}
    adata.uns["spatial"] = {"151673": {**image, "scalefactors": factors}}
    with pytest.warns(UserWarning, match=r"a lowres image but its scalefactors lack \['tissue_lowres_scalef'\]"):
        ax = dfm.pl.domains(adata, return_fig=True, show=False).axes[0]
    assert not ax.images  # drawn without the image, not with spots off it


# a crop, the whole slice, and a few spots (whose margin is a spot's diameter, more than 5 % of their extent)
@pytest.mark.parametrize(("rows", "cols"), [((0, 30), (0, 200)), ((0, 100), (0, 200)), ((40, 43), (60, 68))])
def test_tissue_panels_zoom_to_the_spots(bundled, rows, cols):
    adata = crop_window(bundled, rows=rows, cols=cols)
    adata.obs["dfm_domain"] = adata.obs["layer"]
    library = adata.uns["spatial"]["151673"]
    scale = library["scalefactors"]["tissue_lowres_scalef"]
    height, width = library["images"]["lowres"].shape[:2]
    xy = adata.obsm["spatial"] * scale
    low, high = xy.min(axis=0), xy.max(axis=0)
    diameter = library["scalefactors"]["spot_diameter_fullres"] * scale
    margin = max(0.05 * (high - low).max(), diameter)
    assert (margin == diameter) == (rows == (40, 43))
    ax = dfm.pl.domains(adata, return_fig=True, show=False).axes[0]
    assert ax.images
    (x0, x1), (y1, y0) = ax.get_xlim(), ax.get_ylim()
    assert y1 > y0  # the image's orientation: rows go down
    # the spots and the margin around them, within the image (whose pixels span -0.5 ... side - 0.5)
    assert (x0, x1) == pytest.approx((max(low[0] - margin, -0.5), min(high[0] + margin, width - 0.5)))
    assert (y0, y1) == pytest.approx((max(low[1] - margin, -0.5), min(high[1] + margin, height - 0.5)))
    if rows == (0, 30):
        assert (y1 - y0) < 0.5 * height  # the crop, not the whole slide


def _bars_beside_maps(fig):
    """(map, colour bar) of every tissue map of a gates figure: the bar is the map's inset."""
    maps = [a for a in fig.axes if a.get_title().startswith("gate, depth")]
    assert maps and all(len(a.child_axes) == 1 for a in maps)
    return [(a, a.child_axes[0]) for a in maps]


@pytest.mark.parametrize("layout", ["figure", "ax", "ax, constrained", "ax, tight_layout after", "ax, height-limited"])
def test_a_gate_colour_bar_is_as_tall_as_the_map_beside_it(embedded, layout):
    """The crop is wide (30 rows of the whole width): its maps are drawn shorter than their panels, and squidpy's
    bars, sized to the panel, stood above and below them; in a panel that limits the height, the map is narrower
    than its panel, and the bar must follow it, whatever layout runs afterwards."""
    if layout == "figure":
        fig = dfm.pl.gates(embedded, return_fig=True, show=False)
    else:
        size = (9, 1.5) if "height-limited" in layout else (4, 4)
        fig, ax = plt.subplots(figsize=size, layout="constrained" if "constrained" in layout else None)
        dfm.pl.gates(embedded, depth=1, ax=ax, show=False)
        if "tight_layout" in layout:
            fig.tight_layout()
    fig.canvas.draw()
    for map_, bar in _bars_beside_maps(fig):
        drawn, panel, beside = map_.get_position(), map_.get_position(original=True), bar.get_position()
        assert bar.get_ylabel() == "gate"
        if "height-limited" in layout:
            assert drawn.width < 0.5 * panel.width  # the map is narrower than its panel: the gap is tested
        else:
            assert drawn.height < 0.8 * panel.height  # a wide map: the bar's height is tested
        assert beside.y0 == pytest.approx(drawn.y0, abs=1e-6) and beside.y1 == pytest.approx(drawn.y1, abs=1e-6)
        assert 0 < beside.x0 - drawn.x1 < 0.05  # right beside the map


# --- 16: the training legend, colour bars into a given axes ---------------------------------------------------------


def test_training_legend_leaves_the_curves_uncovered(embedded):
    fig = dfm.pl.training(embedded, return_fig=True, show=False)
    fig.canvas.draw()
    (ax,) = fig.axes
    legend, panel = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= panel.x1  # beside the axes, not over the curves
    assert legend.x1 <= fig.bbox.width + 0.5  # and on the figure


def test_training_legend_stays_in_the_callers_axes(embedded):
    """Audit s46, finding 6: with ``ax=`` the legend stood beside the axes, under the next panel of the grid."""
    fig, (left, _) = plt.subplots(1, 2)
    dfm.pl.training(embedded, ax=left)
    fig.canvas.draw()
    legend, panel = left.get_legend().get_window_extent(), left.get_window_extent()
    plt.close(fig)
    assert panel.x0 <= legend.x0 and legend.x1 <= panel.x1 and panel.y0 <= legend.y0 and legend.y1 <= panel.y1


@pytest.mark.parametrize("plot", ["training", "domains"])
def test_figure_and_legend_sizes_follow_rcparams(embedded, plot):
    """sc.set_figure_params(figsize=..., fontsize=...) sets rcParams: our figures scale with them, as scanpy's do."""

    def draw(figsize, font):
        with plt.rc_context({"figure.figsize": figsize, "font.size": font}):
            fig = getattr(dfm.pl, plot)(embedded, return_fig=True, show=False)
            legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
            return fig.get_size_inches(), legend.get_texts()[0].get_fontsize()

    (size, font), (half, small) = draw((6.4, 4.8), 10.0), draw((3.2, 2.4), 5.0)
    assert half[1] == pytest.approx(size[1] / 2)  # (the width grows to fit the legend beside the panels)
    assert small == pytest.approx(font / 2) and font < 10.0  # a smaller size than the text's, relative to it


def test_each_gate_panel_draws_its_own_depth(embedded):
    fig = dfm.pl.gates(embedded, sequence=False, return_fig=True, show=False)
    panels = [a for a in fig.axes if a.get_title().startswith("gate, depth")]
    gates = embedded.obsm["X_dfm_gates"]
    assert len(panels) == gates.shape[1] >= 2
    assert all(not np.allclose(gates[:, 0], gates[:, k], atol=0.02) for k in range(1, gates.shape[1]))
    fig.canvas.draw()
    magma = plt.get_cmap("magma")
    norms = {(scatter(ax).norm.vmin, scatter(ax).norm.vmax) for ax in panels}
    assert len(norms) == 1  # one colour scale for every depth
    norm = Normalize(*norms.pop(), clip=True)
    for k, ax in enumerate(panels):
        colours = max((c.get_facecolors() for c in ax.collections), key=len)
        np.testing.assert_allclose(colours[:, :3], magma(norm(gates[:, k]))[:, :3], atol=0.02)


def test_the_epoch_axis_ticks_whole_epochs_only(embedded):
    """A one-epoch run is one point a curve: matplotlib's padding alone leaves ticks such as 0.945, 0.960, ..."""
    assert len(embedded.uns["dfm"]["history"]["train_loss"]) == 1
    ax = dfm.pl.training(embedded, return_fig=True, show=False).axes[0]
    ax.figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert 1 in ticks and all(float(t).is_integer() for t in ticks)


def test_training_curves_are_labelled_by_the_loss_they_show(embedded):
    ax = dfm.pl.training(embedded, return_fig=True, show=False).axes[0]
    history = embedded.uns["dfm"]["history"]
    names = {"total": "train_loss", "masked-spot reconstruction": "masked_mse", "auxiliary (DF-Mamba)": "aux"}
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == set(names)
    assert not np.allclose(history["masked_mse"], history["aux"])
    for label, key in names.items():
        np.testing.assert_allclose(lines[label].get_ydata(), history[key])


@pytest.mark.filterwarnings("ignore:n_clusters=None chose .* no clear knee:UserWarning")  # a small crop: a weak knee
def test_plots_leave_adata_unchanged(embedded):
    adata = embedded.copy()
    dfm.tl.cluster(adata, None, k_range=range(2, 6), n_init=1)
    before_uns, before_obs = sorted(adata.uns), adata.obs.copy()
    before_obsm = {k: np.array(v, copy=True) for k, v in adata.obsm.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dfm.pl.domains(adata, truth_key="layer", return_fig=True, show=False)
        dfm.pl.domains(adata, return_fig=True, show=False)
        dfm.pl.gates(adata, return_fig=True, show=False)
        dfm.pl.training(adata, return_fig=True, show=False)
        dfm.pl.bic(adata, return_fig=True, show=False)
    assert sorted(adata.uns) == before_uns
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    assert sorted(adata.obsm) == sorted(before_obsm)
    for k, v in before_obsm.items():
        np.testing.assert_array_equal(adata.obsm[k], v)


def test_gates_into_an_axes_of_another_figure_than_the_current_one(embedded):
    fig, (first, _) = plt.subplots(1, 2)
    other = plt.figure()  # e.g. another notebook cell's figure is current
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dfm.pl.gates(embedded, depth=0, ax=first, show=False)
    assert not [w for w in caught if "different Figure" in str(w.message)], [str(w.message) for w in caught]
    assert len(fig.axes) == 2 and len(first.child_axes) == 1 and not other.axes  # the colour bar: the map's inset


# --- the command line -----------------------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command line starts the workflow."""

    def refuse(*args, **kwargs):
        raise AssertionError("the workflow started before the arguments were checked")

    monkeypatch.setattr(dfm.pp, "serialize", refuse)
    monkeypatch.setattr(dfm.tl, "embed", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n-clusters", "-3"], r"--n-clusters must be at least 1 \(or 0"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--epochs", "-1"], "--epochs must be at least 1, got -1"),
        (["--device", "gpu"], "--device gpu: Unknown device 'gpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["--device", "mps"], "--device mps: Unsupported device 'mps'"),
        (["--input", "no/such/slice.h5ad"], r"--input no/such/slice.h5ad: no such file"),
        (["--truth-key", "layr"], r"--truth-key 'layr': dlpfc_151673 \(bundled\) has no such obs column"),
        (["--library-key", "slice"], r"--library-key 'slice': dlpfc_151673 \(bundled\) has no such obs column"),
        (["--n-clusters", "5000"], "more domains than the 3639 spots"),
        (["--seed", "-1"], r"--seed must be between 0 and 2\*\*32 - 1, got -1"),
        (["--seed", str(2**32)], r"--seed must be between 0 and 2\*\*32 - 1, got 4294967296"),
    ],
)
def test_command_line_rejects_bad_arguments_before_any_work(no_work, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m dfmamba_st" in err
    assert re.search(message, err), err


def test_command_line_refuses_a_library_column_with_missing_values_before_any_work(no_work, capsys, bundled, tmp_path):
    adata = crop(bundled, rows=(0, 10))
    adata.obs["lib"] = pd.Categorical(["a"] * (adata.n_obs - 1) + [np.nan])
    adata.write_h5ad(tmp_path / "slice.h5ad")
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(tmp_path / "slice.h5ad"), "--library-key", "lib"])
    assert exit_.value.code == 2  # an argument error, not a step's refusal (1)
    assert "--library-key 'lib': some spots of slice have no library (missing values)" in capsys.readouterr().err


def test_command_line_rejects_an_output_file_and_an_input_that_is_not_h5ad_before_any_work(no_work, capsys, tmp_path):
    (tmp_path / "results").write_text("")
    (tmp_path / "table.csv").write_text("gene,count\n")
    for argv, message in [
        (["--out", str(tmp_path / "results")], rf"--out {tmp_path / 'results'}: a file, not a folder"),
        (  # a folder that cannot be made: said before the work, not after it
            ["--out", str(tmp_path / "results" / "run1")],
            rf"--out {tmp_path / 'results' / 'run1'}: {tmp_path / 'results'} is a file, so the folder cannot be made",
        ),
        (["--input", str(tmp_path / "table.csv")], rf"--input {tmp_path / 'table.csv'}: not an \.h5ad file"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_command_line_rejects_an_input_without_unique_genes_or_positions_before_any_work(
    no_work, capsys, tmp_path, bundled
):
    repeated = crop(bundled, rows=(0, 10))
    repeated.var_names = [repeated.var_names[0], *repeated.var_names[:-1]]
    unplaced = crop(bundled, rows=(0, 10))
    del unplaced.obs["array_row"], unplaced.obsm["spatial"]
    for adata, name, message in [
        (repeated, "repeated", r"repeated has repeated gene names \(e\.g\. \[.+\]\); make them unique"),
        (unplaced, "unplaced", r"unplaced has no spot positions: neither obs\['array_row'/'array_col'\]"),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # anndata on the repeated names
            adata.write_h5ad(tmp_path / f"{name}.h5ad")
        with pytest.raises(SystemExit) as exit_:
            main(["--input", str(tmp_path / f"{name}.h5ad")])
        assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_command_line_ends_an_input_a_step_refuses_with_its_message_not_a_traceback(capsys, tmp_path, bundled):
    scaled = crop(bundled, rows=(0, 20))
    scaled.X = scaled.X.toarray() - 1.0  # as after sc.pp.scale: negative values
    scaled.write_h5ad(tmp_path / "scaled.h5ad")
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(tmp_path / "scaled.h5ad"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    assert re.search(r"^python -m dfmamba_st: error: scaled: adata\.X contains negative values", err, re.M), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert "--traceback shows where" in err
    with pytest.raises(ValueError, match="negative values"):  # --traceback: the error itself, for a bug report
        main(["--input", str(tmp_path / "scaled.h5ad"), "--out", str(tmp_path / "out"), "--traceback"])


def test_command_line_expands_the_home_folder_in_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = _parser().parse_args(["--out=~/results", "--input", "~/slice.h5ad"])
    assert args.out == tmp_path / "results" and args.input == tmp_path / "slice.h5ad"


def test_command_line_rejects_cuda_without_a_gpu(no_work, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cuda"])
    assert exit_.value.code == 2
    assert "--device cuda: device='cuda' was requested but torch sees no CUDA GPU" in capsys.readouterr().err


def test_command_line_version_and_help_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"dfmamba_st {dfm.__version__}"
    helps = {action.dest: action.help for action in _parser()._actions if action.dest not in ("help", "version")}
    assert all(text and "default" in text for text in helps.values()), helps
    assert "20 with 'cpu'" in helps["epochs"] and "'auto' = 'paper' on a CUDA GPU, 'cpu' otherwise" in helps["preset"]


def test_command_line_without_the_default_annotation_says_it_does_not_score(bundled, tmp_path, capsys):
    adata = crop(bundled, rows=(0, 10))
    del adata.obs["layer"]
    adata.write_h5ad(tmp_path / "slice.h5ad")
    saved = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(kwargs)
        return original(self, *args, **kwargs)

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.csv").write_text("an earlier run's scores\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.figure.Figure, "savefig", savefig)
        assert main(["--input", str(tmp_path / "slice.h5ad"), "--epochs", "1", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "no obs['layer']: not scoring" in out and "removed" in out and "scores.csv of an earlier run" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"result.h5ad", "domains.png", "gates.png"}
    assert len(saved) == 2 and all(kw.get("bbox_inches") == "tight" for kw in saved)  # legends are not cut off


@pytest.mark.filterwarnings("ignore:.*lie almost only in one library")  # two crops of two sections
def test_command_line_library_key_reaches_every_step(tmp_path):
    slices = {s: crop(ad.read_h5ad(shared("dlpfc", f"dlpfc_{s}.h5ad")), rows=(0, 10)) for s in ("151673", "151674")}
    joined = ad.concat(slices, label="lib", join="inner", uns_merge="unique", index_unique="-")
    joined.write_h5ad(tmp_path / "two.h5ad")
    argv = ["--input", str(tmp_path / "two.h5ad"), "--library-key", "lib", "--epochs", "1", "--n-clusters", "5"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    result = ad.read_h5ad(tmp_path / "out" / "result.h5ad")
    assert result.uns["dfm_order"]["params"]["library_key"] == "lib"
    assert result.uns["dfm"]["params"]["library_key"] == "lib"
    assert result.uns["dfm_domain"]["params"]["library_key"] == "lib"
    scores = pd.read_csv(tmp_path / "out" / "scores.csv", index_col=0)
    assert list(scores.index.astype(str)) == ["all", "151673", "151674"]  # together, then slice by slice


def test_command_line_warnings_point_at_the_call_of_main_not_into_the_package(tmp_path):
    """tl.cluster's and metrics.evaluate's warnings, reached through the command line's main, name its caller."""
    slices = {s: crop(ad.read_h5ad(shared("dlpfc", f"dlpfc_{s}.h5ad")), rows=(0, 10)) for s in ("151673", "151674")}
    joined = ad.concat(slices, label="lib", join="inner", uns_merge="unique", index_unique="-")
    joined.obs["unscored"] = pd.Categorical([np.nan] * joined.n_obs, categories=["Layer1"])  # no truth label at all
    joined.write_h5ad(tmp_path / "two.h5ad")
    argv = ["--input", str(tmp_path / "two.h5ad"), "--library-key", "lib", "--truth-key", "unscored"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--epochs", "1", "--n-clusters", "5", "--out", str(tmp_path / "out")]) == 0
    for text in ("lie almost only in one library", "No spot has a truth label"):  # two crops of two sections
        assert warned_at(caught, text, __file__), text


def test_command_line_says_each_warning_once_without_a_source_line(capsys):
    """What the scripts' __main__ blocks wrap main() in: a library's missing image was said once per plot, at
    '<frozen runpy>:88'; a catch_warnings in between (as the plots have) made Python say it again."""
    from dfmamba_st._cli import warnings_said_once

    with warnings_said_once("python -m dfmamba_st"):
        for _ in range(2):
            with warnings.catch_warnings():
                warnings.warn("no image for library 'A'", UserWarning, stacklevel=1)
                warnings.warn("no image for library 'B'", UserWarning, stacklevel=1)
                warnings.warn("a runtime note", RuntimeWarning, stacklevel=1)
        with warnings.catch_warnings(), pytest.raises(UserWarning):
            warnings.simplefilter("error")  # the filters are left alone: -W error still raises
            warnings.warn("an error now", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "python -m dfmamba_st: warning: no image for library 'A'",
        "python -m dfmamba_st: warning: no image for library 'B'",
        "python -m dfmamba_st: RuntimeWarning: a runtime note",  # another category is named
    ]
    # python -m dfmamba_st.pathology.train is run in a subprocess in test_pathology_edges; a run of this script took
    # 9.2 s on a 954-spot crop with one epoch (2026-12-07), so its __main__ block is only read here
    from dfmamba_st import __main__ as script

    assert "with warnings_said_once(_parser().prog):" in Path(script.__file__).read_text()


def test_command_line_passes_the_seed_and_chooses_k_with_n_clusters_0(bundled, tmp_path, capsys):
    adata = crop(bundled, rows=(0, 10))
    adata.write_h5ad(tmp_path / "slice.h5ad")
    argv = ["--input", str(tmp_path / "slice.h5ad"), "--epochs", "1", "--seed", "7", "--n-clusters", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a weak knee on a small crop is not what is tested
        assert main([*argv, "--out", str(tmp_path / "out" / "run")]) == 0  # folders made as needed
    out = capsys.readouterr().out
    assert "ari" in out and "the 151673 row" not in out  # the bundled slice's pointer is not about user data
    result = ad.read_h5ad(tmp_path / "out" / "run" / "result.h5ad")
    assert result.uns["dfm"]["params"]["seed"] == 7
    assert "bic" in result.uns["dfm_domain"]  # K chosen at the knee of the BIC curve


def test_axes_of_a_figure_pyplot_does_not_hold_draw_without_a_warning(embedded):
    """Audit s46, finding 7: with a pyplot figure open, the gates' colour bar in a ``Figure()`` made without pyplot
    printed matplotlib's "Adding colorbar to a different Figure" (squidpy's ``plt.colorbar(..., ax=ax)``)."""
    from matplotlib.figure import Figure

    plt.figure()  # pyplot's current figure, not the one drawn into
    ax = Figure().add_subplot()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dfm.pl.gates(embedded, depth=1, ax=ax)
    plt.close("all")
    assert len(ax.child_axes) == 1 and not [str(w.message) for w in caught]  # the colour bar: the map's inset


def test_the_gates_of_a_few_spots_are_dots_along_the_sequence(embedded):
    """Audit s46, finding 9: a line through one point draws nothing (an empty panel for a one-spot library)."""
    for spots, marker in ((embedded[:1], "."), (embedded[:20], "."), (embedded, "None")):
        fig = dfm.pl.gates(spots, return_fig=True)
        (sequence,) = [ax for ax in fig.axes if ax.get_title() == "gates along the sequence"]
        plt.close(fig)
        assert sequence.lines and {line.get_marker() for line in sequence.lines} == {marker}


def test_axes_of_a_figure_made_without_pyplot_are_drawn_into_and_pyplot_opens_nothing(embedded):
    """``ax=`` on a ``matplotlib.figure.Figure()`` (as in a GUI or a report): the panels and the colour bar land there,
    and pyplot opens no figure (``plt.sca`` registered the user's figure, and squidpy's ``plt.colorbar`` opened an
    empty one when pyplot had none)."""
    from matplotlib.figure import Figure

    before = plt.get_fignums()
    fig = Figure()
    ax = fig.add_subplot()
    dfm.pl.domains(embedded, ax=ax, show=False)
    assert ax.collections or ax.images
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    dfm.pl.gates(embedded, depth=1, ax=ax2, show=False)
    assert ax2.collections or ax2.images
    assert len(fig2.axes) == 1 and len(fig2.axes[0].child_axes) == 1  # the gate's colour bar, the panel's inset
    assert plt.get_fignums() == before
