"""A model folder: ``model.safetensors`` (tensors, no pickle) and ``config.json`` (what rebuilds the model).

Shared by :func:`dfmamba_st.pathology.save_classifier` and :func:`dfmamba_st.ts.save_forecaster`, so that both
write and read their folders the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TENSORS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def constructor_config(arguments: dict) -> dict:
    """A constructor's arguments, from its ``locals()`` taken first thing, as a JSON-ready dict.

    ``self`` and ``__class__`` are dropped and a ``**kwargs`` mapping (any key ending in ``kwargs``) is merged in,
    so that ``type(model)(**config)`` builds the same model. Every value is made what JSON gives back: tuples and
    arrays become lists, numpy numbers plain Python ones (so a saved model's config equals the one read back).

    Examples
    --------
    >>> import numpy as np
    >>> class Net:
    ...     def __init__(self, width, scales=(1, 2), **block_kwargs):
    ...         self.config = constructor_config(locals())
    >>> Net(np.int64(4), backend="torch", lambdas=(1.0, np.float32(0.5))).config
    {'width': 4, 'scales': [1, 2], 'backend': 'torch', 'lambdas': [1.0, 0.5]}
    """
    config = {}
    for name, value in arguments.items():
        if name in ("self", "__class__"):
            continue
        if name.endswith("kwargs") and isinstance(value, dict):
            config.update({key: _plain(item) for key, item in value.items()})
        else:
            config[name] = _plain(value)
    return config


def _plain(value):
    """``value`` as JSON stores and gives it back: lists for tuples, arrays and tensors, Python numbers for numpy's."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def write_model_folder(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``tensors`` and ``config`` into ``directory`` (made if missing) and return the folder.

    Nothing is written when ``config`` is not JSON-serialisable or ``directory`` is a file.
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    text = json.dumps(config, indent=2)  # first: nothing written if it fails
    if directory.is_file():
        raise ValueError(f"{directory} is a file; a model is saved as a folder ({TENSORS_FILE} and {CONFIG_FILE}).")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(unshared(tensors), directory / TENSORS_FILE)
    (directory / CONFIG_FILE).write_text(text)
    return directory


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, each with memory of its own.

    safetensors refuses tensors that share memory; a module shared by two layers (ms-Mamba's one rate projection
    for every scale) is written once per name and tied again when the rebuilt model loads it.
    """
    out, seen = {}, set()
    for name, value in tensors.items():
        value = value.detach().cpu().contiguous()
        key = value.untyped_storage().data_ptr()
        out[name] = value.clone() if key in seen else value
        seen.add(key)
    return out


def read_model_folder(directory: str | Path, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a folder written by :func:`write_model_folder`; ``what`` names the writer in errors."""
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    missing = [name for name in (TENSORS_FILE, CONFIG_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a folder written by {what}: no {' or '.join(missing)} in it.")
    return json.loads((directory / CONFIG_FILE).read_text()), load_file(directory / TENSORS_FILE)
