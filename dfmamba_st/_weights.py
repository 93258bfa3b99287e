"""A model folder: ``model.safetensors`` (tensors, no pickle) and ``config.json`` (what rebuilds the model).

Shared by :func:`dfmamba_st.pathology.save_classifier` and :func:`dfmamba_st.ts.save_forecaster`, so that both
write and read their folders the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ._version import __version__

TENSORS_FILE, CONFIG_FILE = "model.safetensors", "config.json"

#: version of the folder layout, written into ``config.json``; folders of a newer layout are refused with a clear
#: error (folders written before the field existed read as version 0)
FOLDER_FORMAT = 1


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


def format_header(kind: str, version: int | str) -> dict:
    """What every saved model records of itself: its ``kind``, its format ``version`` and the package version.

    ``version`` is a string in a ``safetensors`` header (whose metadata holds strings only), an int in ``config.json``.

    Examples
    --------
    >>> sorted(format_header("dfmamba_st.forecaster", 1))
    ['dfmamba_st_version', 'format', 'format_version']
    """
    return {"format": kind, "format_version": version, "dfmamba_st_version": __version__}


def write_model_folder(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict, *, kind: str) -> Path:
    """Write ``tensors`` and ``config`` into ``directory`` (made if missing) and return the folder.

    ``config.json`` also records ``kind`` (what the folder holds, checked by :func:`read_model_folder`), the folder
    layout's :data:`FOLDER_FORMAT` and the package version. Nothing is written when ``config`` is not
    JSON-serialisable or ``directory`` is a file.
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    header = format_header(kind, FOLDER_FORMAT)
    if clash := sorted(header.keys() & config.keys()):
        raise ValueError(
            f"{', '.join(clash)} in config.json {'is' if len(clash) == 1 else 'are'} the folder's own "
            f"entr{'y' if len(clash) == 1 else 'ies'}; give {'another name' if len(clash) == 1 else 'other names'}."
        )
    text = json.dumps({**header, **config}, indent=2)  # first: nothing written if it fails
    if directory.is_file():
        raise ValueError(f"{directory} is a file; a model is saved as a folder ({TENSORS_FILE} and {CONFIG_FILE}).")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(unshared(tensors), directory / TENSORS_FILE)
    (directory / CONFIG_FILE).write_text(text)
    return directory


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load ``state`` into ``model`` with every floating tensor in the dtype it was saved in; return ``model``.

    ``load_state_dict`` alone copies into the model's own dtype, so a bfloat16 or float64 model would come back as
    float32 and forecast otherwise. Saved in one floating dtype, the whole model is cast to it first, buffers left out
    of the file (pixel statistics) included; in several, each tensor takes its own. Parameters shared by two layers
    stay shared (one tensor, cast once).

    Examples
    --------
    >>> layer = torch.nn.Linear(2, 2).to(torch.bfloat16)
    >>> load_state(torch.nn.Linear(2, 2), layer.state_dict()).weight.dtype
    torch.bfloat16
    """
    dtypes = {value.dtype for value in state.values() if value.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for name, value in state.items():
        target = own.get(name)
        if target is not None and target.is_floating_point() and value.is_floating_point():
            target.data = target.data.to(value.dtype)
    model.load_state_dict(state)
    return model


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


def read_model_folder(directory: str | Path, *, kind: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a folder that :func:`write_model_folder` wrote with ``kind``.

    ``what`` names the writer in errors. A folder holding another kind, or written in a newer layout than
    :data:`FOLDER_FORMAT`, is refused; one from before the layout was recorded is read as this kind.
    """
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    missing = [name for name in (TENSORS_FILE, CONFIG_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a folder written by {what}: no {' or '.join(missing)} in it.")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{directory}/{CONFIG_FILE} holds no settings written by {what} (a {type(config).__name__}).")
    written = config.get("format", kind)
    if written != kind:
        raise ValueError(f"{directory} holds a folder of kind {written!r}, not one written by {what} ({kind!r}).")
    version = config.get("format_version", 0)
    written_by = f"dfmamba_st {config.get('dfmamba_st_version')} (folder format {version})"
    check_format_version(version, FOLDER_FORMAT, where=str(directory), what="folder format", written_by=written_by)
    return config, load_file(directory / TENSORS_FILE)


def check_format_version(version: object, supported: int, *, where: str, what: str, written_by: str) -> None:
    """Refuse a file's format ``version`` that is no format number or is newer than ``supported``.

    ``version`` as stored: an int (JSON) or its digits (safetensors metadata). ``where`` names the file, ``what``
    the kind of format, ``written_by`` the writer (package version and format) in the messages.
    """
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{where} is damaged: its {what} {version!r} is not a format number (0, 1, 2, ...).")
    if version > supported:
        raise ValueError(
            f"{where} was written by {written_by}; this is dfmamba_st {__version__} reading {what} <= {supported}. "
            "Upgrade dfmamba_st to load it."
        )
