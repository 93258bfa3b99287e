"""Execute the tutorial notebooks in place, so that they are stored with fresh outputs.

``python tutorials/execute.py`` (every notebook here) or ``python tutorials/execute.py tutorials/dlpfc_layers.ipynb``.
The notebooks themselves are the source: edit them, then run this.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def main(paths: list[str]) -> None:
    # the kernel inherits the environment: with MPLBACKEND=Agg (as in CI) it would draw no figure into the notebook
    os.environ.pop("MPLBACKEND", None)
    for path in [Path(p) for p in paths] or sorted(HERE.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
        )
        client.execute()
        nbformat.write(notebook, path)
        print("executed", path)


if __name__ == "__main__":
    main(sys.argv[1:])
