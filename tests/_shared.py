"""Where the tests find the real data of ``../shared/data``, and the crops they take of Visium slices."""

from pathlib import Path

import pytest

#: the project's real data, next to the repository (absent on a user's machine: tests that need it skip)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: the benchmark scripts (``benchmark_module`` loads them; the GPU check's shell scripts are read from here too)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

#: ``tl.embed`` options for a model trained in about a second: the tests that check what it computes, not how well
QUICK = dict(epochs=1, d_model=16, depth=2, n_pcs=10, n_top_genes=300, progress=False)


def shared_path(*parts: str) -> Path:
    """``DATA / parts``, or skip the calling test with the reason when it is not there."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} is not available")
    return path


def crop(adata, rows=(0, 30), cols=(0, 60)):
    """The spots of a Visium slice within a window of its grid (``array_row``, ``array_col``), as a new AnnData."""
    keep = adata.obs["array_row"].between(*rows) & adata.obs["array_col"].between(*cols)
    return adata[keep.to_numpy()].copy()


def model_tokens(adata, model):
    """The tokens ``tl.embed`` feeds ``model`` for ``adata`` (scaled as in training) and the libraries' sequences."""
    import numpy as np
    import torch

    from dfmamba_st.tl import _embed

    libraries = _embed._library_sequences(adata, None, "spatial", model.config.curves)
    features, _ = model.features.transform(adata)
    tokens = _embed._tokens(features, libraries, model.config.hops) / model.config.extra["token_scale"]
    return torch.from_numpy(tokens.astype(np.float32)), libraries


def warned_at(caught, text: str, file: str, *, once: bool = False) -> bool:
    """Whether some warning of ``caught`` holds ``text`` and every one that does names ``file`` (the user's call).

    ``once``: and exactly one warning holds ``text``.
    """
    from pathlib import Path

    matching = [w for w in caught if text in str(w.message)]
    return (len(matching) == 1 if once else bool(matching)) and all(
        Path(w.filename).resolve() == Path(file).resolve() for w in matching
    )
