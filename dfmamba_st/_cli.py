"""What the two command lines (``python -m dfmamba_st``, ``python -m dfmamba_st.pathology.train``) check alike."""

from __future__ import annotations

import argparse
from pathlib import Path


def path_argument(text: str) -> Path:
    """A path given on the line, ``~`` expanded (the shell leaves it as is in ``--out=~/results``)."""
    return Path(text).expanduser()


def check_device_and_output(parser: argparse.ArgumentParser, device: str, out: Path | None) -> None:
    """Argparse errors, before any work, for a ``--device`` torch cannot use and an ``--out`` that is a file."""
    from .core import resolve_device  # here, not at the top: --help stays quick

    try:
        resolve_device(device)
    except ValueError as err:
        parser.error(f"--device {device}: {err}")
    if out is not None and out.exists() and not out.is_dir():
        parser.error(f"--out {out}: a file, not a folder")
