"""Sphinx configuration for dfmamba_st."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfmamba_st import __version__

project = "dfmamba_st"
author = "dfmamba_st developers"
copyright = "2026, dfmamba_st developers"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
autosummary_generate = True
templates_path = ["_templates"]  # class pages document their own methods (the default template only lists them)
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports = ["mamba_ssm", "causal_conv1d"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
suppress_warnings = ["myst.header"]
# every cross-reference must resolve (sphinx -W in CI fails otherwise), except those into other projects: there is no
# network to fetch their inventories (intersphinx), so their names stay plain text
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|torch|pandas|pd|anndata|scanpy|squidpy|matplotlib|scipy|sklearn|pooch)(\..*)?"),
    (r"py:.*", r"(collections\.abc|os|pathlib|typing|json)(\..*)?"),
    (r"py:.*", r"(AnnData|Path|Tensor)"),  # annotations under TYPE_CHECKING, shown as written
    # Literal aliases of the package (core.scan.Backend, core.curves.Curve) and the spatial model's private feature
    # transform, shown by name in signatures; the parameters' entries list their values
    (r"py:class", r"(Backend|Curve|curves\.Curve|FeatureTransform)"),
]
