"""What the two command lines (``python -m dfmamba_st``, ``python -m dfmamba_st.pathology.train``) check alike."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path


def path_argument(text: str) -> Path:
    """A path given on the line, ``~`` expanded (the shell leaves it as is in ``--out=~/results``)."""
    return Path(text).expanduser()


def check_shared_arguments(parser: argparse.ArgumentParser, device: str, out: Path | None, seed: int) -> None:
    """Argparse errors, before any work, for the options both command lines have.

    A ``--device`` torch cannot use, an ``--out`` folder that cannot be written (a file, or under one; not
    writable) and a ``--seed`` numpy cannot take. Nothing is created here.
    """
    from .core import resolve_device  # here, not at the top: --help stays quick

    try:
        resolve_device(device)
    except ValueError as err:
        parser.error(f"--device {device}: {err}")
    if not 0 <= seed < 2**32:
        parser.error(f"--seed must be between 0 and 2**32 - 1, got {seed}")
    if out is None:
        return
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: a file, not a folder")
    made_in = out if out.exists() else next(p for p in out.absolute().parents if p.exists())  # the root exists
    if not made_in.is_dir():
        parser.error(f"--out {out}: {made_in} is a file, so the folder cannot be made")
    if not os.access(made_in, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: {made_in} is not writable")


@contextlib.contextmanager
def warnings_said_once(prog: str) -> Iterator[None]:
    """Each warning of a command-line run printed once, as ``prog: warning: message``.

    Another category than ``UserWarning`` is named in place of ``warning``. Python's own display names a source
    line, which on the command line is runpy's or the package's, never the user's, and repeats a message after any
    ``warnings.catch_warnings`` (the plots use them), so a library's missing image was said once per plot. The
    filters still decide what is raised (``-W error``) or hidden (``ignore``); a message shown is shown once,
    whatever they say about repeats. Only the scripts' ``__main__`` blocks use it: a caller of ``main()`` keeps its
    own warning handling.
    """
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text not in said:
            said.add(text)
            kind = "warning" if category is UserWarning else category.__name__
            print(f"{prog}: {kind}: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
