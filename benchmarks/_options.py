"""``KEY=VALUE`` command-line options of the benchmark scripts (ablation switches handed to a model or a tool)."""

from __future__ import annotations

import argparse
from typing import Any


def parse_value(text: str) -> Any:
    """``"true"``/``"false"`` → bool, ``"none"`` → None, then int, then float, else the text itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(items: list[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=false"]`` → ``{"a": 1, "b": False}``; ``flag`` names the option in the error message."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} options are key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def add_options_flag(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """Add ``flag`` taking ``KEY=VALUE`` items (read them with :func:`parse_options`)."""
    parser.add_argument(flag, nargs="+", default=[], metavar="KEY=VALUE", help=help)
