"""Every public function and class of the package documents its parameters and shows an example (numpy style; the
examples themselves run as doctests)."""

from __future__ import annotations

import inspect
import re

import pytest

import dfmamba_st as dfm

MODULES = ("pp", "tl", "pl", "metrics", "datasets", "ts", "pathology", "core")


def _public() -> list[tuple[str, object]]:
    out = [(name, getattr(dfm, name)) for name in dfm.__all__ if inspect.isfunction(getattr(dfm, name))]
    for module in MODULES:
        for name in getattr(dfm, module).__all__:
            obj = getattr(getattr(dfm, module), name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{module}.{name}", obj))
    return out


def test_the_public_api_is_found():
    names = [name for name, _ in _public()]
    assert len(names) > 90 and {"set_threads", "pp.serialize", "tl.embed", "ts.save_forecaster", "core.fit"} <= set(
        names
    )


@pytest.mark.parametrize(("name", "obj"), _public(), ids=[name for name, _ in _public()])
def test_docstring_has_an_example_and_documents_every_parameter(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert "\nExamples\n--------\n" in doc, f"{name} has no Examples section"
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return
    named = [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not named:
        return
    assert "\nParameters\n----------\n" in doc or "\nAttributes\n----------\n" in doc, (
        f"{name} takes {named} but documents no Parameters (or, for a data class, Attributes)"
    )
    # the sections before Returns / Examples / ...: each parameter heads an entry (alone or in a list "a, b")
    head = re.split(r"\n(?:Returns|Yields|Raises|Warns|Notes|See Also|Examples)\n-+\n", doc)[0]
    lines = [line for line in head.splitlines() if line and not line.startswith(" ")]
    entries = {word for line in lines for word in re.split(r"[, ]+", line)}
    undocumented = [p for p in named if p not in entries]
    assert not undocumented, f"{name}: no entry for {undocumented}"
