"""Real public data sets: DLPFC (10x Visium, spatialLIBD) and her2st (legacy Spatial Transcriptomics).

Every loader either reads a local file (``path=``) or downloads the public raw files with :mod:`pooch` into a
cache folder (:func:`data_dir`) and assembles an :class:`~anndata.AnnData` from them. Nothing is downloaded at
import time. The assembly from raw files is a separate public function (:func:`read_dlpfc_raw`,
:func:`read_her2st_raw`), so files obtained another way (Globus, a colleague's disk) can be read the same way.

Sources and checksums
---------------------
DLPFC (Maynard et al. 2021, *Nat. Neurosci.* 24:425; spatialLIBD):

- counts: ``https://spatial-dlpfc.s3.us-east-2.amazonaws.com/h5/{sample}_filtered_feature_bc_matrix.h5``, the
  link table "Raw data" of the spatialLIBD README (https://github.com/LieberInstitute/spatialLIBD). **No checksum
  for these files is published anywhere we could find**, so they are downloaded with ``known_hash=None``
  (pooch then only checks that the download completes); the file's SHA256 is logged at scanpy's info level
  (``sc.settings.verbosity = "info"`` shows it) so a user can record it.
- spot positions, scale factors, low-resolution H&E image: ``10X/{sample}/tissue_positions_list.txt``,
  ``scalefactors_json.json``, ``tissue_lowres_image.png`` of https://github.com/LieberInstitute/HumanPilot, and
  the manual layer annotation ``10X/barcode_level_layer_map.tsv`` of the same repository, all fetched from
  ``raw.githubusercontent.com`` at the pinned commit ``044446d6bd8fc154aa74f7be62ec67effb1ec376``. Their SHA256
  checksums below were computed by us from those exact files (the repository publishes git object ids, not
  SHA256 sums); because the URL pins the commit, the bytes cannot change.

her2st (Andersson et al. 2021, *Nat. Commun.* 12:6012), from https://github.com/almaan/her2st at the pinned
commit ``85df7411b987a7dec3feff9718b869a7a82091ec``: ``data/ST-cnts/{section}.tsv.gz`` (counts),
``data/ST-pat/lbl/{section}_labeled_coordinates.tsv`` (pathologist regions, pixel coordinates) and
``data/ST-spotfiles/{section}_selection.tsv`` (spots under tissue). SHA256 checksums computed by us from those
files, as above. The same data are on Zenodo (record 3957257) as password-protected 7z archives, which pooch
cannot open, so the GitHub copies are used.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import warnings
from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pooch
from scipy import sparse

from ._utils import user_stacklevel

__all__ = [
    "DLPFC_SAMPLES",
    "HER2ST_SECTIONS",
    "data_dir",
    "dlpfc",
    "dlpfc_151673_hvg",
    "dlpfc_urls",
    "her2st",
    "her2st_urls",
    "read_dlpfc_raw",
    "read_her2st_raw",
]

#: Environment variable that overrides the download cache folder.
ENV_DATA_DIR = "DFMAMBA_ST_DATA"

#: The 12 DLPFC Visium samples of spatialLIBD and their donor.
DLPFC_SAMPLES: dict[str, str] = {
    **dict.fromkeys(("151507", "151508", "151509", "151510"), "Br5292"),
    **dict.fromkeys(("151669", "151670", "151671", "151672"), "Br5595"),
    **dict.fromkeys(("151673", "151674", "151675", "151676"), "Br8100"),
}
DLPFC_LAYERS: tuple[str, ...] = ("Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM")

_S3 = "https://spatial-dlpfc.s3.us-east-2.amazonaws.com"
_HUMANPILOT_COMMIT = "044446d6bd8fc154aa74f7be62ec67effb1ec376"
_HUMANPILOT = f"https://raw.githubusercontent.com/LieberInstitute/HumanPilot/{_HUMANPILOT_COMMIT}"
# SHA256 of the HumanPilot files at _HUMANPILOT_COMMIT (computed from the files themselves; see module docstring).
_DLPFC_SHA256: dict[str, dict[str, str]] = {
    "151507": {
        "tissue_positions_list.txt": "5c5be4dcd51c914bad02634f1ed2d96bd0c200ae487e236f644d94ded983efd0",
        "scalefactors_json.json": "0831c11047ae9acb6eaa281ef9ed89554252b8527f5e2a2ab1208de6fbd82119",
        "tissue_lowres_image.png": "765469a4a4913f7e64bb4b824b216a424ac0c795fc338decc8194808c12aef5b",
    },
    "151508": {
        "tissue_positions_list.txt": "cf10de46b124381a2cd28dbe3e8bdcfa469ceb5659f26de1039c9a5b9da1a257",
        "scalefactors_json.json": "9649a055c191d7c1eb3202c08358c6d63de5b332771f8b8fdf4ac66b40a5523e",
        "tissue_lowres_image.png": "0bcb61ab7849a5de5a1985ac4e2ebe277fbfe92f381211dea51ac8ec73f83e12",
    },
    "151509": {
        "tissue_positions_list.txt": "badca077b07d5268bb222e7bfdd0b31d179fa97f51870e28f562ef4f961e8d6a",
        "scalefactors_json.json": "dae9348e2b4dd6b16f60d1c8c74af73251f44c55a52dc33121018b7381d23cc1",
        "tissue_lowres_image.png": "a0925ad594650bb845e8317a688364c8c8b29909bd59f4d66423517483580b00",
    },
    "151510": {
        "tissue_positions_list.txt": "1152698bac69bbdc1eaa5e83ef0565492b4709ccf64abe113f7ef266b735edb4",
        "scalefactors_json.json": "2845415140804270adafc55c01b531a82eb8706b9cff83fe55fb4220f6b922f3",
        "tissue_lowres_image.png": "f70846896e437afe83e7ff5fab8c24af3168e91b61125adf9c7151e78006bcf6",
    },
    "151669": {
        "tissue_positions_list.txt": "00147e492d41a3724c413934ef777c94f72f15636933346783fcd3e7903bddb4",
        "scalefactors_json.json": "46422f5b8e256c6f532b9e3bd59671a16536bb6e4640f44fbf69fc654b53c5d3",
        "tissue_lowres_image.png": "c24ebd434d7b4f0837a637a943c766f81f0c805b1deb75faf0f1abaacb6267b3",
    },
    "151670": {
        "tissue_positions_list.txt": "cf1cf68a6efe052f10b86b32c0b7f142d6d4bfcfa107aafa92c56234b08ec25a",
        "scalefactors_json.json": "125b25b3df2a99c60bc3364c398f0c7cd9ae47401551f87265ed5e580a3fea2f",
        "tissue_lowres_image.png": "7c6496d1d93a3158ca94c22eedbeb010d1c3f9f40325e5bc327e41c45d3ea6a4",
    },
    "151671": {
        "tissue_positions_list.txt": "fbf0e0b41bb6d10b0e87accc62fa1e17d5b5e0a7bd9f193173499c6c3f7d46b2",
        "scalefactors_json.json": "6b6b71b55a7afd3a278490db95da1eff11bf618f34c4dd8109640ba0c05b845e",
        "tissue_lowres_image.png": "4ef4e3790291b270050148e69f629248a42688cc523002295fcbfc75cdaf411e",
    },
    "151672": {
        "tissue_positions_list.txt": "45e98bc3304158b3ab5a71e6851ccc95cdf723ce7b4e593ba5af9259cb3b66f1",
        "scalefactors_json.json": "ae164d7aa0b8aa58af08c21246741fcbbf74c7211d53007ed1420c22d762f395",
        "tissue_lowres_image.png": "e868f35fbf7910d7481178176b36e1c7ef9fb0530a08cdd43e4c65a23602f96c",
    },
    "151673": {
        "tissue_positions_list.txt": "c1ce0eafc855982bb2a9773f147ce6c5aef68dfd06600caa8a7e7a0e6f7cc5e8",
        "scalefactors_json.json": "91c4beb9ca8145855a6a6df0a00eda6541931fc12d82d09cf8f01c9c15179dbc",
        "tissue_lowres_image.png": "2ca692ceb00b205bd2f75182935a018753b08c63fbba7e142fd154db22547fcf",
    },
    "151674": {
        "tissue_positions_list.txt": "bc8738299011382ad81a35d81c5bcb1546b17b5c10a5a6411baf9bc1f58acca7",
        "scalefactors_json.json": "869be1c7c2bc7722b1858e1f41a491305264208d083d641786e6f102fc723bac",
        "tissue_lowres_image.png": "ed3423433091926df71ff8470014be4da8e0df06ae23efbdd0d0d82b29debc21",
    },
    "151675": {
        "tissue_positions_list.txt": "2c857eeddd96898d5d17bd066ee9f55fb8f0c7c7758cb8c26f71dc95d60024ff",
        "scalefactors_json.json": "fce4c55751326c1bf9af0f87591a4bab1383fcab0b10714bf688d2eabf909dc6",
        "tissue_lowres_image.png": "4adf842df9ad1f2769e1952f7129edbcb26fd0c2fb7f208dfca46ea54b9b6ce5",
    },
    "151676": {
        "tissue_positions_list.txt": "2b655c9ead1fa5686ef9a49ab8452d56cd849dc1d15779b215e4f9726ebe55c0",
        "scalefactors_json.json": "2ee6b05b734c39688792ca2d26b8558b59c116098fc184b579b500d3b8497afd",
        "tissue_lowres_image.png": "c74f5d8386c5b6cfa9d6fb376256eed0dd6813e8f112ed257f81448c65c55f6b",
    },
}
_DLPFC_LAYER_MAP_SHA256 = "b5d81f0e61810bb74d8a02495eda8f84e0eb9335211dcdd03513d747036e5ca9"

_HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
_HER2ST = f"https://raw.githubusercontent.com/almaan/her2st/{_HER2ST_COMMIT}"
# Sections with both counts and a pathologist annotation in the repository (J1 has labels but no counts there).
_HER2ST_SHA256: dict[str, dict[str, str]] = {
    "A1": {
        "counts": "d91035e5d8a9c4ce7865e4c61446deec1a7318602d41b3220e9fcb3ce7e41fe3",
        "labels": "23a0a68dccd54a8397ea4066994edb7110e88373d5b3bc6e35254dda9253fa5f",
        "selection": "e5f79223be2ea2aebb082c4759059ab7079b0132052d0944209048ac57788c5d",
    },
    "B1": {
        "counts": "97b3abf2676c596ac7dd53829780005724cab62a6f676697516006481a443f74",
        "labels": "f7050caa71c47a4c95fcca2a7f29560d387310877b1c9e4a54f841059db837ee",
        "selection": "7ea9963677db80199db928d763b0b34ea1015fb7452e85ac7b21d42ee15c3875",
    },
    "C1": {
        "counts": "8383130eebf0f9f8186f006ed6b704149ba62303605a312a9080fa9901be9c20",
        "labels": "41b6e1bbb1031480d969e725e739971cb39dbdb6e2b6d662d585bebacf093040",
        "selection": "9a5187c98d2c312064057d3bad192d4a19105b5135ff2b68f5e4547cade0954d",
    },
    "D1": {
        "counts": "8fe13d29763b3f6a9e85322dae97e05c4ca42b57cef4b1077c88b9b7b6a980ac",
        "labels": "c8bf26103d1aac42611d9c85ba3db9c596b9a80ec045ca9b246b8d14d8b3c20f",
        "selection": "7ba7843b52ddc2b147ee968fe9466a5d1fa0d884b51def292ce340d88da034eb",
    },
    "E1": {
        "counts": "b2f572ea0a95d256cb172a9284e96b6d2ff236398d4934a992df85c96d11c4cc",
        "labels": "29db60fe5b306bb982fbd2bbdd1f9c60eedf90c6ac1d56bedd3c18ed5a369829",
        "selection": "a979c36f6310fff965c96f05ad290ca322d88e400b5aed2a1139fdd6f0e2da92",
    },
    "F1": {
        "counts": "187aa13f204d514851d3674dfa09b4a8d7f2676f1d40d2ef63e9e368c7cf672a",
        "labels": "3b59970f0c6ba09d8e0fc9286ace2a295bf06d36c59684162b7a8aca0e021ec5",
        "selection": "cf479a5812c317541c7f7d6a4ebf1bfd93b0a1ab3eef35a8da15b9e76164f2f4",
    },
    "G2": {
        "counts": "9d51a5ed85bdf60069dcf51beeffba4e90e35e8630ec3b707a2453ffdd608e3b",
        "labels": "8466275647ad125569ee94d099cc7b78c15028968ba1dd267a85a81c001a16ff",
        "selection": "abae30bb6f434cb2aae34b8ef56da6b613c840d48c49279d55f4600ad496245c",
    },
    "H1": {
        "counts": "90b391782535f38c9ab20fe8b38f44ebbfdad2201075a677a198cbef12c29b07",
        "labels": "b65cbc99ed7a01281bc2eb87be87b902312e47ca91bc1f00ff351489b78434c3",
        "selection": "fc9cc5bad3a1e26e48f435696259df38b500042a9565486c15fd37ab7d8f9ed6",
    },
}
#: her2st sections that carry a pathologist annotation (and counts) in the public repository.
HER2ST_SECTIONS: tuple[str, ...] = tuple(_HER2ST_SHA256)

_BUNDLED_HVG = "dlpfc_151673_hvg.h5ad"


# --------------------------------------------------------------------------------------------------------------------
# download layer
# --------------------------------------------------------------------------------------------------------------------
def data_dir() -> Path:
    """Folder where downloaded raw files are cached.

    ``$DFMAMBA_ST_DATA`` when that environment variable is set (a relative path is taken from the working folder of
    the call), else the operating system's cache folder for ``dfmamba_st`` (:func:`pooch.os_cache`, e.g.
    ``~/.cache/dfmamba_st`` on Linux). It is created on first download.

    Returns
    -------
    The cache folder, as an absolute path.

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"DFMAMBA_ST_DATA": "/tmp/dfm-cache"}):  # your own setting is put back
    ...     str(data_dir())
    '/tmp/dfm-cache'
    """
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser().absolute() if env else Path(pooch.os_cache("dfmamba_st")).absolute()


def _sample(sample_id: str | int) -> str:
    sid = str(sample_id).strip()
    if sid not in DLPFC_SAMPLES:
        raise ValueError(f"Unknown DLPFC sample {sample_id!r}; choose one of {sorted(DLPFC_SAMPLES)}.")
    return sid


def _section(section: str) -> str:
    sec = str(section).strip().upper()
    if sec not in _HER2ST_SHA256:
        raise ValueError(
            f"Unknown or unannotated her2st section {section!r}; choose one of {list(HER2ST_SECTIONS)} "
            "(the sections with a pathologist annotation and counts in the public repository)."
        )
    return sec


def dlpfc_urls(sample_id: str | int = "151673") -> dict[str, tuple[str, str | None]]:
    """Public URLs and checksums of the raw files of one DLPFC sample.

    Parameters
    ----------
    sample_id
        One of :data:`~dfmamba_st.datasets.DLPFC_SAMPLES`.

    Returns
    -------
    ``{local file name: (url, known_hash)}``; ``known_hash`` is ``"sha256:…"`` or ``None`` where no checksum is
    known (the 10x count matrix on the spatialLIBD S3 bucket).

    Examples
    --------
    >>> urls = dlpfc_urls(151673)
    >>> urls["151673_filtered_feature_bc_matrix.h5"]
    ('https://spatial-dlpfc.s3.us-east-2.amazonaws.com/h5/151673_filtered_feature_bc_matrix.h5', None)
    >>> urls["barcode_level_layer_map.tsv"][1][:15]
    'sha256:b5d81f0e'
    """
    sid = _sample(sample_id)
    files: dict[str, tuple[str, str | None]] = {
        f"{sid}_filtered_feature_bc_matrix.h5": (f"{_S3}/h5/{sid}_filtered_feature_bc_matrix.h5", None),
    }
    for name, digest in _DLPFC_SHA256[sid].items():
        files[f"{sid}_{name}"] = (f"{_HUMANPILOT}/10X/{sid}/{name}", f"sha256:{digest}")
    files["barcode_level_layer_map.tsv"] = (
        f"{_HUMANPILOT}/10X/barcode_level_layer_map.tsv",
        f"sha256:{_DLPFC_LAYER_MAP_SHA256}",
    )
    return files


def her2st_urls(section: str = "A1") -> dict[str, tuple[str, str | None]]:
    """Public URLs and SHA256 checksums of the raw files of one annotated her2st section.

    Parameters
    ----------
    section
        One of :data:`~dfmamba_st.datasets.HER2ST_SECTIONS`.

    Returns
    -------
    ``{local file name: (url, known_hash)}``.

    Examples
    --------
    >>> sorted(her2st_urls("A1"))
    ['A1.tsv.gz', 'A1_labeled_coordinates.tsv', 'A1_selection.tsv']
    """
    sec = _section(section)
    digest = _HER2ST_SHA256[sec]
    return {
        f"{sec}.tsv.gz": (f"{_HER2ST}/data/ST-cnts/{sec}.tsv.gz", f"sha256:{digest['counts']}"),
        f"{sec}_labeled_coordinates.tsv": (
            f"{_HER2ST}/data/ST-pat/lbl/{sec}_labeled_coordinates.tsv",
            f"sha256:{digest['labels']}",
        ),
        f"{sec}_selection.tsv": (f"{_HER2ST}/data/ST-spotfiles/{sec}_selection.tsv", f"sha256:{digest['selection']}"),
    }


def _download(files: dict[str, tuple[str, str | None]], subdir: str, *, offline_hint: str) -> dict[str, Path]:
    """Fetch every file with :func:`pooch.retrieve` into ``data_dir() / subdir`` (cached; hashes checked).

    A failed download (no network, a server error, an unwritable cache) raises an :class:`OSError` that says how to
    load the data without network (``offline_hint``); cache folders created by the failed call are removed again
    when they are empty.
    """
    from scanpy import logging as logg

    folder = data_dir() / subdir
    created = [folder, *folder.parents]
    created = created[: next(i for i, d in enumerate(created) if d.exists())]  # the folders pooch will create
    try:  # a cache folder that cannot be made is no network failure
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"The cache folder {folder} cannot be created ({type(err).__name__}: {err}); set ${ENV_DATA_DIR} to a "
            "writable folder."
        ) from err
    out = {}
    for fname, (url, known_hash) in files.items():
        cached = (folder / fname).exists()  # a cached file pooch downloads again is one that failed its checksum
        try:
            path = Path(pooch.retrieve(url=url, known_hash=known_hash, fname=fname, path=folder, progressbar=False))
        except Exception as err:
            for d in created:  # deepest first; a folder that is not empty stays
                try:
                    d.rmdir()
                except OSError:
                    break
            if not isinstance(err, OSError):  # e.g. pooch's ValueError for a checksum mismatch
                raise
            reason = f"{type(err).__name__}: {err}"
            reason = reason if len(reason) <= 300 else reason[:297] + "..."
            if cached and known_hash is not None:
                raise OSError(
                    f"{folder / fname} does not match its checksum ({known_hash}), and downloading it again from "
                    f"{url} failed ({reason}). Replace it with the original file (or delete it and call again with "
                    f"network access); without network access: {offline_hint}."
                ) from err
            raise OSError(
                f"Could not download {fname} from {url} ({reason}). Without network access: {offline_hint}; or put "
                f"the raw files {list(files)} in the cache folder {folder} (set ${ENV_DATA_DIR} to use another "
                "folder) and call again."
            ) from err
        if known_hash is None and not cached:  # (a cached file is not hashed again on every call)
            logg.info(f"{fname} has no published checksum; sha256 of the downloaded file: {_sha256(path)}")
        out[fname] = path
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# assembly from raw files (no network)
# --------------------------------------------------------------------------------------------------------------------
def _read_positions(path: str | Path) -> pd.DataFrame:
    """Space Ranger spot positions, with or without header (``tissue_positions_list.csv`` / ``.txt``)."""
    names = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    with open(path) as fh:
        first = fh.readline()
    header = 0 if first.lower().startswith("barcode") else None
    pos = pd.read_csv(path, header=header, names=names if header is None else None)
    pos.columns = names
    return pos.set_index("barcode")


def _read_layer_map(path: str | Path, sample_id: str) -> pd.Series:
    """Manual layer of each barcode of one sample from HumanPilot's ``barcode_level_layer_map.tsv``."""
    table = pd.read_csv(path, sep="\t", header=None, names=["barcode", "sample_name", "layer"], dtype=str)
    if table.iloc[0, 0].lower() == "barcode":  # tolerate a header line
        table = table.iloc[1:]
    table = table[table["sample_name"].str.strip() == sample_id]
    layer = table["layer"].str.strip().str.replace(r"^L(\d)$", r"Layer\1", regex=True)
    return pd.Series(layer.to_numpy(), index=table["barcode"].to_numpy(), name="layer")


def _read_png_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_dlpfc_raw(
    matrix_h5: str | Path,
    positions: str | Path,
    layer_map: str | Path,
    *,
    sample_id: str | int,
    scalefactors: str | Path | None = None,
    lowres_image: str | Path | None = None,
    source: str | None = None,
) -> ad.AnnData:
    """Assemble one DLPFC sample from its raw files (no network).

    Parameters
    ----------
    matrix_h5
        Space Ranger ``filtered_feature_bc_matrix.h5`` of the sample (spots under tissue only).
    positions
        Space Ranger ``tissue_positions_list.txt``/``.csv`` (barcode, in_tissue, array_row, array_col,
        pxl_row_in_fullres, pxl_col_in_fullres; with or without a header line).
    layer_map
        HumanPilot's ``barcode_level_layer_map.tsv`` (barcode, sample, layer ``L1``–``L6``/``WM``; no header).
    sample_id
        The sample to take from ``layer_map`` and the key under ``uns['spatial']``.
    scalefactors
        Space Ranger ``scalefactors_json.json``; stored in ``uns['spatial'][sample_id]['scalefactors']``.
    lowres_image
        Space Ranger ``tissue_lowres_image.png``; stored as ``uns['spatial'][sample_id]['images']['lowres']``.
    source
        Provenance text for ``uns['source']`` (defaults to the file names).

    Returns
    -------
    AnnData with the layout of the project's shared DLPFC files:

    - ``X``: raw UMI counts, CSR float32 (all genes of the matrix); ``var_names``: gene symbols of the 10x
      reference (made unique), ``var['gene_ids']``: Ensembl ids;
    - ``obs['layer']``: categorical ``Layer1``…``Layer6``, ``WM``; NaN for spots without a manual layer;
    - ``obs['array_row']``, ``obs['array_col']``, ``obs['in_tissue']``, ``obs['sum_umi_all_genes']``,
      ``obs['sum_gene_all_genes']``, ``obs['sample_id']``, ``obs['subject']`` (donor);
    - ``obsm['spatial']``: full-resolution pixel coordinates ``[x, y]`` = ``[pxl_col, pxl_row]``;
    - ``uns['spatial'][sample_id]``: ``images`` / ``scalefactors`` / ``metadata`` when given (so
      ``squidpy.pl.spatial_scatter`` and ``scanpy.pl.spatial`` work); ``uns['source']``.

    Examples
    --------
    The files of a sample, as :func:`dlpfc` downloads them (the reading needs them on disk):

    >>> import dfmamba_st as dfm
    >>> list(dfm.datasets.dlpfc_urls("151673"))  # doctest: +NORMALIZE_WHITESPACE
    ['151673_filtered_feature_bc_matrix.h5', '151673_tissue_positions_list.txt', '151673_scalefactors_json.json',
     '151673_tissue_lowres_image.png', 'barcode_level_layer_map.tsv']
    >>> adata = dfm.datasets.read_dlpfc_raw(  # doctest: +SKIP
    ...     "151673_filtered_feature_bc_matrix.h5",
    ...     "151673_tissue_positions_list.txt",
    ...     "barcode_level_layer_map.tsv",
    ...     sample_id="151673",
    ...     scalefactors="151673_scalefactors_json.json",
    ...     lowres_image="151673_tissue_lowres_image.png",
    ... )
    """
    import scanpy as sc

    sid = str(sample_id)
    try:
        adata = sc.read_10x_h5(str(matrix_h5))
    except (OSError, KeyError) as err:  # h5py: not an HDF5 file; scanpy: an HDF5 file without a 10x matrix
        raise ValueError(
            f"{matrix_h5} is not a readable 10x .h5 matrix ({type(err).__name__}: {err}). A truncated or failed "
            "download left in the cache folder is read again at every call: delete it and call again."
        ) from err
    adata.var_names_make_unique()
    X = sparse.csr_matrix(adata.X, dtype=np.float32)
    X.sort_indices()
    var = pd.DataFrame({"gene_ids": adata.var["gene_ids"].astype(str).to_numpy()}, index=adata.var_names.copy())

    pos = _read_positions(positions)
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        raise ValueError(
            f"{len(missing)} barcodes of {Path(matrix_h5).name} (e.g. {missing[0]!r}) are not in "
            f"{Path(positions).name}; are both files from sample {sid}?"
        )
    pos = pos.loc[adata.obs_names]
    layers = _read_layer_map(layer_map, sid)
    if layers.empty:
        raise ValueError(f"{Path(layer_map).name} has no rows for sample {sid!r}.")
    layer = layers.reindex(adata.obs_names)
    unknown = set(layer.dropna()) - set(DLPFC_LAYERS)
    if unknown:
        raise ValueError(f"Unexpected layer names {sorted(unknown)} in {Path(layer_map).name}.")

    obs = pd.DataFrame(index=adata.obs_names.copy())
    obs["layer"] = pd.Categorical(layer.to_numpy(), categories=list(DLPFC_LAYERS))
    obs["array_row"] = pos["array_row"].to_numpy(np.int64)
    obs["array_col"] = pos["array_col"].to_numpy(np.int64)
    obs["in_tissue"] = pos["in_tissue"].to_numpy(np.int64)
    obs["sum_umi_all_genes"] = np.asarray(X.sum(axis=1)).ravel().round().astype(np.int64)
    obs["sum_gene_all_genes"] = np.diff(X.indptr).astype(np.int64)
    obs["sample_id"] = pd.Categorical([sid] * len(obs))
    obs["subject"] = pd.Categorical([DLPFC_SAMPLES.get(sid, "unknown")] * len(obs))

    out = ad.AnnData(X=X, obs=obs, var=var)
    out.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    lib: dict = {"metadata": {"source": f"{Path(matrix_h5).name}, {Path(positions).name}"}}
    if scalefactors is not None:
        with open(scalefactors) as fh:
            lib["scalefactors"] = json.load(fh)
    if lowres_image is not None:
        lib["images"] = {"lowres": _read_png_rgb(lowres_image)}
    out.uns["spatial"] = {sid: lib}
    out.uns["source"] = source or (
        f"DLPFC {sid} (Maynard et al. 2021): {Path(matrix_h5).name} + {Path(positions).name} + {Path(layer_map).name}"
    )
    out.uns["spatial_coords"] = "obsm['spatial'] = [pxl_col_in_fullres, pxl_row_in_fullres] (x, y)"
    return out


def read_her2st_raw(
    counts: str | Path,
    labels: str | Path,
    selection: str | Path | None = None,
    *,
    section: str,
    source: str | None = None,
) -> ad.AnnData:
    """Assemble one annotated her2st section from its raw files (no network).

    Spots are the rows of the count table (``"{x}x{y}"`` array positions). The pathologist label of each spot
    comes from ``labels`` by rounding its array coordinates ``x``, ``y`` to the spot grid; spots with counts but no
    label are dropped, as are label rows without a label.

    Parameters
    ----------
    counts
        ``data/ST-cnts/{section}.tsv.gz``: spots × genes integer counts, tab separated, spot ids in the first column.
    labels
        ``data/ST-pat/lbl/{section}_labeled_coordinates.tsv``: columns ``x``, ``y``, ``pixel_x``, ``pixel_y``,
        ``label``.
    selection
        ``data/ST-spotfiles/{section}_selection.tsv`` (spots under tissue); only used to fill
        ``obs['in_selection_file']``.
    section
        Section name, recorded in ``uns['source']``.
    source
        Provenance text for ``uns['source']``.

    Returns
    -------
    AnnData with the layout of the project's shared her2st files: ``X`` raw counts (CSR float32), ``var_names``
    gene symbols, ``obs['label']`` (categorical pathologist region, including ``'undetermined'``),
    ``obs['array_x']``, ``obs['array_y']``, ``obs['in_selection_file']``, ``obsm['spatial']`` (pixel
    coordinates ``[pixel_x, pixel_y]`` of the H&E image), ``uns['source']``.

    Examples
    --------
    The files of a section, as :func:`her2st` downloads them (the reading needs them on disk):

    >>> import dfmamba_st as dfm
    >>> list(dfm.datasets.her2st_urls("A1"))
    ['A1.tsv.gz', 'A1_labeled_coordinates.tsv', 'A1_selection.tsv']
    >>> adata = dfm.datasets.read_her2st_raw(  # doctest: +SKIP
    ...     "A1.tsv.gz", "A1_labeled_coordinates.tsv", "A1_selection.tsv", section="A1"
    ... )
    """
    opener = gzip.open if str(counts).endswith(".gz") else open
    with opener(counts, "rt") as fh:
        table = pd.read_csv(fh, sep="\t", index_col=0)
    table.index = table.index.astype(str)
    lbl = pd.read_csv(labels, sep="\t")
    need = {"x", "y", "pixel_x", "pixel_y", "label"}
    if not need <= set(lbl.columns):
        raise ValueError(f"{Path(labels).name} lacks columns {sorted(need - set(lbl.columns))}.")
    lbl = lbl.dropna(subset=["x", "y", "label"])
    lbl["spot"] = lbl["x"].round().astype(int).astype(str) + "x" + lbl["y"].round().astype(int).astype(str)
    if lbl["spot"].duplicated().any():
        dups = lbl.loc[lbl["spot"].duplicated(), "spot"].tolist()
        raise ValueError(f"Several labelled positions round to the same spot: {dups[:5]}.")
    lbl = lbl.set_index("spot")
    keep = table.index[table.index.isin(lbl.index)]
    if len(keep) == 0:
        raise ValueError(f"No spot of {Path(counts).name} has a label in {Path(labels).name}.")
    dropped = len(table) - len(keep)
    if dropped:
        from scanpy import logging as logg

        logg.info(f"her2st {section}: {dropped} spots with counts but no label dropped")
    table = table.loc[keep]
    lbl = lbl.loc[keep]

    xy = keep.str.split("x", expand=True)
    obs = pd.DataFrame(index=pd.Index(keep, name=None))
    obs["label"] = pd.Categorical(lbl["label"].astype(str).str.strip().to_numpy())
    obs["array_x"] = xy.get_level_values(0).astype(np.int64)
    obs["array_y"] = xy.get_level_values(1).astype(np.int64)
    if selection is not None:
        sel = pd.read_csv(selection, sep="\t")
        sel_ids = set(sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str))
        obs["in_selection_file"] = np.array([s in sel_ids for s in keep], dtype=bool)
    X = sparse.csr_matrix(table.to_numpy(dtype=np.float32))
    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=table.columns.astype(str)))
    out.obsm["spatial"] = lbl[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    out.uns["source"] = source or (
        f"her2st {section} (Andersson et al. 2021): {Path(counts).name} + {Path(labels).name}"
        + (f" (+ {Path(selection).name})" if selection is not None else "")
    )
    return out


# --------------------------------------------------------------------------------------------------------------------
# public loaders
# --------------------------------------------------------------------------------------------------------------------
def _local_file(path: str | Path, stem: str, subdir: str, valid: list[str]) -> Path:
    """Resolve ``path`` (a file, or a folder holding ``{stem}.h5ad`` directly or in ``subdir/``) to one file.

    ``valid`` are the ids of the data set, named in the error when no file matches.
    """
    if not str(path).strip():
        raise ValueError("path= is empty; pass a file or a folder (path=None downloads the data).")
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is neither a file nor a folder.")
    for folder in (p, p / subdir):
        exact = folder / f"{stem}.h5ad"
        if exact.is_file():
            return exact
        others = sorted(folder.glob(f"{stem}_*.h5ad"))
        if len(others) == 1:
            return others[0]
        if len(others) > 1:
            raise ValueError(
                f"Several files match {stem}_*.h5ad in {folder}: {[o.name for o in others]}; pass path= one of them."
            )
    prefix = stem.split("_")[0]
    present = [str(f.relative_to(p)) for folder in (p, p / subdir) for f in sorted(folder.glob(f"{prefix}_*.h5ad"))]
    raise FileNotFoundError(
        f"No {stem}.h5ad (or {stem}_*.h5ad) in {p} or {p / subdir}. "
        + (f"Files there: {present}. " if present else f"There is no {prefix}_*.h5ad file there. ")
        + f"Valid ids: {valid}."
    )


def _check_layout(adata: ad.AnnData, label_key: str, path: Path) -> ad.AnnData:
    problems = [f"obs[{k!r}]" for k in (label_key,) if k not in adata.obs]
    if "spatial" not in adata.obsm:
        problems.append("obsm['spatial']")
    if problems:
        raise ValueError(f"{path} lacks {', '.join(problems)}; is it a dfmamba_st data file?")
    return adata


def _read_local(file: Path, label_key: str) -> ad.AnnData:
    """Read a local ``.h5ad`` with a clear error for a file that is not one, and check its layout."""
    try:
        adata = ad.read_h5ad(file)
    except (OSError, TypeError, KeyError, ValueError) as err:  # (an HDF5 file of another layout: Type/KeyError)
        matrix = ""
        if file.suffix == ".h5":
            matrix = (
                " It looks like a Space Ranger matrix (.h5): read it with scanpy's sc.read_10x_h5, or the raw files "
                "of a DLPFC sample with dfmamba_st.datasets.read_dlpfc_raw."
            )
        raise ValueError(
            f"{file} is not a readable .h5ad file ({type(err).__name__}: {err}); pass path= an AnnData .h5ad file or "
            f"the folder that holds it.{matrix}"
        ) from err
    return _check_layout(adata, label_key, file)


def _recorded_ids(adata: ad.AnnData, file: Path, known: re.Pattern, obs_keys: tuple[str, ...]) -> tuple[set, str]:
    """The ids of the data set that a file records, and where.

    Looked up in order: an ``obs`` column of ``obs_keys``, the keys of ``uns['spatial']``, ``uns['source']``, the
    file name; the first that names an id matching ``known`` wins (other names, e.g. a user's own library names,
    are ignored).
    """

    def ids_in(texts) -> set[str]:
        return {m for text in texts for m in known.findall(str(text).upper())}

    spatial = adata.uns.get("spatial")
    source = adata.uns.get("source")
    candidates = [(adata.obs[key].dropna().unique(), f"obs[{key!r}]") for key in obs_keys if key in adata.obs]
    candidates.append((list(spatial) if isinstance(spatial, dict) else [], "uns['spatial']"))
    candidates.append(([source] if isinstance(source, str) else [], "uns['source']"))
    candidates.append(([file.stem], "its file name"))
    for texts, where in candidates:
        if ids := ids_in(texts):
            return ids, where
    return set(), ""


def _warn_other_sample(adata: ad.AnnData, file: Path, requested: str, what: str, arg: str, known: re.Pattern) -> None:
    """Warn when the file read for ``requested`` records other ids of the data set (and not ``requested``)."""
    ids, where = _recorded_ids(adata, file, known, ("sample_id", "section"))
    if ids and requested.upper() not in ids:
        warnings.warn(
            f"{file} holds {what} {', '.join(sorted(ids))} (from {where}), not the requested {what} {requested!r}. "
            f"Pass {arg}={sorted(ids)[0]!r} (to silence this) or the file of {what} {requested}.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


#: DLPFC sample ids and her2st section ids as they appear in file names and provenance text
_DLPFC_ID = re.compile(r"(?<!\d)(" + "|".join(DLPFC_SAMPLES) + r")(?!\d)")
_HER2ST_ID = re.compile(r"(?<![A-Za-z0-9])([A-H][1-6])(?![A-Za-z0-9])")


def dlpfc(sample_id: str | int = "151673", *, path: str | Path | None = None) -> ad.AnnData:
    """One human DLPFC Visium sample with its manual cortical-layer annotation (Maynard et al. 2021).

    With ``path``: read a local ``.h5ad`` (a file, or a folder holding ``dlpfc_{sample_id}.h5ad`` directly or in
    a ``dlpfc/`` subfolder, as in the project's shared data). Without it: download the public raw files into
    :func:`data_dir` (once; later calls use the cache) and assemble them with :func:`read_dlpfc_raw`.

    The count matrix (``https://spatial-dlpfc.s3.us-east-2.amazonaws.com/h5/{id}_filtered_feature_bc_matrix.h5``, linked
    from the spatialLIBD README) has **no published checksum**, so it is downloaded with ``known_hash=None``: its
    integrity is not verified (its SHA256 is logged at scanpy's info level). Positions, scale factors, the
    low-resolution image and the layer map come from the HumanPilot repository at a pinned commit and are checked
    against SHA256 sums (see :func:`dlpfc_urls`).

    Parameters
    ----------
    sample_id
        Sample name, one of :data:`~dfmamba_st.datasets.DLPFC_SAMPLES` (e.g. ``151673``); an int is accepted.
    path
        Local ``.h5ad`` file or folder; no network access when given. A file that records another sample
        (``obs['sample_id']`` or ``obs['section']``, the keys of ``uns['spatial']``, ``uns['source']`` or its name)
        is read with a warning.

    Returns
    -------
    AnnData: ``X`` raw counts (CSR float32; a local file's ``X`` as it is stored), ``obs['layer']`` (``Layer1``…
    ``Layer6``, ``WM``, NaN where not annotated), ``obs['array_row'/'array_col']`` (Visium grid), ``obsm['spatial']``
    (full-resolution pixels ``[x, y]``), ``uns['spatial'][sample_id]`` (low-resolution image and scale factors),
    ``uns['source']``. A download holds the full transcriptome (33,538 genes); the shared files hold a gene subset.

    Raises
    ------
    FileNotFoundError
        ``path`` is a folder without the sample's file (the message lists the files there and the valid ids).
    ValueError
        ``path`` is not an ``.h5ad`` file, or not a DLPFC one; or ``sample_id`` is unknown (download).
    OSError
        The download failed (e.g. no network); the message says how to load the data offline.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc(151673)  # doctest: +SKIP
    >>> adata = dfm.datasets.dlpfc("151673", path="../shared/data")  # doctest: +SKIP
    >>> adata.obs["layer"].cat.categories.tolist()  # doctest: +SKIP
    ['Layer1', 'Layer2', 'Layer3', 'Layer4', 'Layer5', 'Layer6', 'WM']
    """
    sid = str(sample_id).strip()
    if path is not None:
        file = _local_file(path, f"dlpfc_{sid}", "dlpfc", sorted(DLPFC_SAMPLES))
        adata = _read_local(file, "layer")
        _warn_other_sample(adata, file, sid, "DLPFC sample", "sample_id", _DLPFC_ID)
        return adata
    sid = _sample(sid)
    files = dlpfc_urls(sid)
    got = _download(
        files,
        "dlpfc",
        offline_hint=f"pass path= a local copy, e.g. dfm.datasets.dlpfc({sid!r}, path='dlpfc_{sid}.h5ad') (a .h5ad "
        f"file, or a folder holding dlpfc_{sid}.h5ad)",
    )
    urls = "; ".join(url for url, _ in files.values())
    return read_dlpfc_raw(
        got[f"{sid}_filtered_feature_bc_matrix.h5"],
        got[f"{sid}_tissue_positions_list.txt"],
        got["barcode_level_layer_map.tsv"],
        sample_id=sid,
        scalefactors=got[f"{sid}_scalefactors_json.json"],
        lowres_image=got[f"{sid}_tissue_lowres_image.png"],
        source=f"DLPFC {sid} (Maynard et al. 2021, spatialLIBD), downloaded from: {urls}",
    )


def her2st(section: str = "A1", *, path: str | Path | None = None) -> ad.AnnData:
    """One HER2+ breast-cancer section with its pathologist annotation (Andersson et al. 2021).

    Legacy Spatial Transcriptomics (100 µm spots on a square-ish array, no Visium grid). With ``path``: read a
    local ``.h5ad`` (a file, or a folder holding ``her2st_{section}.h5ad`` directly or in ``her2st/``). Without it:
    download the section's counts, labels and spot selection from the authors' GitHub repository at a pinned
    commit (SHA256-checked, see :func:`her2st_urls`) and assemble them with :func:`read_her2st_raw`.

    Parameters
    ----------
    section
        One of :data:`~dfmamba_st.datasets.HER2ST_SECTIONS` (``A1``, ``B1``, ``C1``, ``D1``, ``E1``, ``F1``, ``G2``,
        ``H1``).
    path
        Local ``.h5ad`` file or folder; no network access when given. A file that records another section
        (``obs['sample_id']`` or ``obs['section']``, the keys of ``uns['spatial']``, ``uns['source']`` or its name)
        is read with a warning.

    Returns
    -------
    AnnData: ``X`` raw counts (CSR float32; a local file's ``X`` as it is stored), ``obs['label']`` (pathologist region;
    drop ``'undetermined'`` when scoring, as :func:`dfmamba_st.metrics.evaluate` does by default),
    ``obs['array_x'/'array_y']``, ``obsm['spatial']`` (H&E pixel coordinates), ``uns['source']``.

    Raises
    ------
    FileNotFoundError
        ``path`` is a folder without the section's file (the message lists the files there and the valid ids).
    ValueError
        ``path`` is not an ``.h5ad`` file, or not a her2st one; or ``section`` is unknown (download).
    OSError
        The download failed (e.g. no network); the message says how to load the data offline.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.her2st("A1")  # doctest: +SKIP
    >>> adata = dfm.datasets.her2st("A1", path="../shared/data")  # doctest: +SKIP
    """
    if path is not None:
        sec = str(section).strip().upper()
        file = _local_file(path, f"her2st_{sec}", "her2st", list(HER2ST_SECTIONS))
        adata = _read_local(file, "label")
        _warn_other_sample(adata, file, sec, "her2st section", "section", _HER2ST_ID)
        return adata
    sec = _section(section)
    files = her2st_urls(sec)
    got = _download(
        files,
        "her2st",
        offline_hint=f"pass path= a local copy, e.g. dfm.datasets.her2st({sec!r}, path='her2st_{sec}.h5ad') (a .h5ad "
        f"file, or a folder holding her2st_{sec}.h5ad)",
    )
    urls = "; ".join(url for url, _ in files.values())
    return read_her2st_raw(
        got[f"{sec}.tsv.gz"],
        got[f"{sec}_labeled_coordinates.tsv"],
        got[f"{sec}_selection.tsv"],
        section=sec,
        source=f"her2st {sec} (Andersson et al. 2021), downloaded from: {urls}",
    )


def dlpfc_151673_hvg() -> ad.AnnData:
    """DLPFC sample 151673 restricted to 3,000 highly variable genes, shipped inside the package (offline).

    All 3,639 spots of the project's shared ``dlpfc_151673.h5ad`` (itself a 7,319-gene subset of the
    transcriptome; see ``uns['source']``), with the genes reduced to the 3,000 that :func:`dfmamba_st.tl.embed`
    chooses on that file (:func:`scanpy.pp.highly_variable_genes` scores, ``flavor="seurat_v3"`` on the raw counts,
    ties broken by gene name), so ``tl.embed`` gives here what it gives on the full file. Made by
    ``benchmarks/make_bundled_slice.py``. Each call returns a new object.

    Returns
    -------
    AnnData with ``X`` raw integer UMI counts (CSR float32), ``var['gene_ids']``, ``var['highly_variable_rank']``,
    ``obs['layer']`` (``Layer1``…``Layer6``, ``WM``; NaN for 28 unannotated spots), ``obs['array_row']``,
    ``obs['array_col']``, ``obs['sample_id']``, ``obsm['spatial']`` (full-resolution pixels ``[x, y]``),
    ``uns['spatial']['151673']`` (``images['lowres']`` and ``scalefactors``) and ``uns['source']``.

    Examples
    --------
    >>> import dfmamba_st as dfm
    >>> adata = dfm.datasets.dlpfc_151673_hvg()
    >>> adata.shape
    (3639, 3000)
    >>> int(adata.obs["layer"].notna().sum())
    3611
    """
    ref = resources.files("dfmamba_st") / "data" / _BUNDLED_HVG
    if not ref.is_file():
        raise FileNotFoundError(
            f"The bundled file dfmamba_st/data/{_BUNDLED_HVG} is missing from this installation; "
            "regenerate it with benchmarks/make_bundled_slice.py or use dfm.datasets.dlpfc()."
        )
    with resources.as_file(ref) as file:
        return ad.read_h5ad(file)
