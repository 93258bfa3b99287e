"""Every public function and class of the package documents its parameters and shows an example (numpy style; the
examples themselves run as doctests)."""

from __future__ import annotations

import inspect

import pytest

import dfmamba_st as dfm

MODULES = ("pp", "tl", "pl", "metrics", "datasets", "ts", "pathology", "core")


def _public() -> list[tuple[str, object]]:
    out = []
    for module in MODULES:
        for name in getattr(dfm, module).__all__:
            obj = getattr(getattr(dfm, module), name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{module}.{name}", obj))
    return out


def test_the_public_api_is_found():
    names = [name for name, _ in _public()]
    assert len(names) > 90 and {"pp.serialize", "tl.embed", "ts.save_forecaster", "core.fit"} <= set(names)


@pytest.mark.parametrize(("name", "obj"), _public(), ids=[name for name, _ in _public()])
def test_docstring_has_parameters_and_examples(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert "\nExamples\n--------\n" in doc, f"{name} has no Examples section"
    try:
        takes = [p for p in inspect.signature(obj).parameters if p != "self"]
    except (TypeError, ValueError):  # a builtin without a signature
        takes = []
    if takes:
        assert "\nParameters\n----------\n" in doc or "\nAttributes\n----------\n" in doc, (
            f"{name} takes {takes} but documents no Parameters (or, for a data class, Attributes)"
        )
