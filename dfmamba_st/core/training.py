"""The one training loop, device choice and seeding used by every module of dfmamba_st."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

__all__ = [
    "TrainResult",
    "cosine_with_warmup",
    "distributed_context",
    "fingerprint",
    "fit",
    "isolated_global_state",
    "resolve_device",
    "seed_everything",
]


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless a ``torch.distributed`` process group is running.

    Start one with ``torchrun`` and ``torch.distributed.init_process_group("gloo")`` (CPU) or ``"nccl"`` (GPUs);
    :func:`fit` then trains data-parallel.

    Returns
    -------
    ``(rank, world_size)`` of the initialised default process group; ``(0, 1)`` when ``torch.distributed`` is not
    available or no process group is initialised.

    Examples
    --------
    A single process (no process group):

    >>> from dfmamba_st.core import distributed_context
    >>> distributed_context()
    (0, 1)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sync_parameters(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _average_gradients(model: nn.Module, world_size: int) -> None:
    """All-reduce the gradients (one flat buffer) and divide by the number of ranks: data-parallel SGD."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a parameter unused on this rank still takes part in the reduction
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def _average_values(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of logged values over the ranks (every rank then takes the same early-stopping decision)."""
    import torch.distributed as dist

    names = sorted(values)
    buffer = torch.tensor([values[k] for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(buffer)
    buffer /= dist.get_world_size()
    return dict(zip(names, buffer.tolist()))


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` ask torch for deterministic kernels.

    Parameters
    ----------
    seed
        The seed.
    deterministic
        Use deterministic algorithms where torch has them (warns, instead of failing, where it has none). This
        calls ``torch.use_deterministic_algorithms(True, warn_only=True)``, turns off ``torch.backends.cudnn.benchmark``
        and sets the environment variable ``CUBLAS_WORKSPACE_CONFIG`` to ``":4096:8"`` unless it is already set.
        ``False`` leaves these settings as they are (it does not turn deterministic algorithms off).

    Notes
    -----
    The seeds and settings are global: they stay in force after the call. Wrap the call in
    :func:`isolated_global_state` to put the caller's state back afterwards.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.core import isolated_global_state, seed_everything
    >>> with isolated_global_state():  # the caller's random states are put back after the block
    ...     seed_everything(0)
    ...     first = torch.rand(3)
    ...     seed_everything(0)
    ...     second = torch.rand(3)
    >>> torch.equal(first, second)
    True
    """
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - user code and scanpy draw from the global NumPy state
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@contextmanager
def isolated_global_state() -> Iterator[None]:
    """Put the caller's random states and torch's determinism settings back after the block (or function) it wraps.

    :func:`seed_everything` reseeds Python, NumPy and torch and turns on torch's deterministic algorithms; a library
    call that seeds itself (``tl.embed``) should not leave the user's session seeded or slowed down. Usable as a
    decorator. CUDA random states are restored when CUDA was initialised before the block.

    Examples
    --------
    >>> import numpy as np
    >>> from dfmamba_st.core import isolated_global_state, seed_everything
    >>> before = np.random.get_state()[1].copy()
    >>> with isolated_global_state():
    ...     seed_everything(0)
    >>> bool((np.random.get_state()[1] == before).all())
    True
    """
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()  # noqa: NPY002
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model`` (a tensor shared by several modules counted once).

    Parameters
    ----------
    model
        Any module; its parameters with ``requires_grad`` set are counted (frozen ones and buffers are not).

    Returns
    -------
    The total number of elements of those parameters.

    Examples
    --------
    >>> from torch import nn
    >>> from dfmamba_st.core import count_parameters
    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def resolve_device(device: str | int | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a device, failing clearly if it is absent.

    Parameters
    ----------
    device
        ``"auto"`` (a CUDA GPU when torch sees one, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a GPU index
        ``N`` (``"cuda:N"``, as :class:`torch.device` reads it) or a :class:`torch.device` of type ``cpu`` or
        ``cuda`` (checked as its string form).

    Returns
    -------
    The :class:`torch.device`. ``"cuda"`` stays without an index (the current CUDA device).

    Raises
    ------
    ValueError
        For a CUDA device when torch sees no CUDA GPU, for a GPU index torch does not see, for a name torch does not
        parse, and for any device type other than ``cpu`` and ``cuda`` (e.g. ``"mps"``, ``"meta"``).
    TypeError
        For anything else (a float, a negative index, ``None``).

    Examples
    --------
    >>> from dfmamba_st.core import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        device = str(device)
    elif isinstance(device, numbers.Integral) and not isinstance(device, bool | np.bool_) and device >= 0:
        device = f"cuda:{device}"  # as torch.device(0) reads an index
    elif not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', an index or a torch.device, got {device!r}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but torch sees no CUDA GPU (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda}). Use device='cpu' or device='auto'."
        )
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} was requested but torch sees {torch.cuda.device_count()} CUDA GPU(s).")
    return resolved


def cosine_with_warmup(total_steps: int, warmup_fraction: float = 0.1) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 0.

    Parameters
    ----------
    total_steps
        Number of optimiser steps of the whole run.
    warmup_fraction
        Fraction of ``total_steps`` spent in the linear warm-up. The number of warm-up steps is
        ``max(1, round(warmup_fraction * total_steps))`` (at least one; Python's ``round``, halves to even).

    Returns
    -------
    ``factor(step)``, the multiplier of the peak learning rate at step ``step`` (counted from 0), the form
    :class:`torch.optim.lr_scheduler.LambdaLR` takes: ``(step + 1) / warmup`` during the ``warmup`` warm-up steps,
    then ``0.5 * (1 + cos(pi * progress))`` with ``progress = (step - warmup) / max(1, total_steps - warmup)``
    capped at 1: the multiplier is 1 right after the warm-up and, when the warm-up is shorter than the run, 0 from
    ``step = total_steps`` on.

    Examples
    --------
    >>> from dfmamba_st.core import cosine_with_warmup
    >>> factor = cosine_with_warmup(10, warmup_fraction=0.2)  # two warm-up steps
    >>> [round(factor(step), 3) for step in (0, 1, 2, 6, 10, 20)]
    [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    """
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class TrainResult:
    """What :func:`~dfmamba_st.core.fit` returns.

    Attributes
    ----------
    history
        One dict per epoch: ``epoch``, ``train_loss``, ``val_loss`` (``nan`` without validation data), ``lr`` and
        the mean of every extra term the loss function reported.
    best_epoch
        Epoch of the lowest monitored loss (the validation loss, else the training loss). The model ends with that
        epoch's weights when ``restore_best`` is set; otherwise with the last epoch's (or their moving average with
        ``ema_decay``).
    stopped_early
        Whether early stopping ended the run.

    Examples
    --------
    :func:`fit` fills it; an empty one:

    >>> from dfmamba_st.core import TrainResult
    >>> TrainResult()
    TrainResult(history=[], best_epoch=-1, stopped_early=False)
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False


LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, {}


def _batches(data: Iterable | Callable[[int], Iterable], epoch: int) -> Iterable:
    return data(epoch) if callable(data) else data


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress_terms(row: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows after an epoch: the training loss, then every term the loss function reported.

    The terms matter when the total hides them: in ``tl.embed`` the masked-spot error falls while DF-Mamba's
    auxiliary terms grow, so the total alone can rise during a good run.

    Examples
    --------
    >>> row = {"epoch": 3.0, "train_loss": 1.7812, "masked_mse": 0.5671, "aux": 1.2141, "val_loss": float("nan")}
    >>> _progress_terms({**row, "lr": 1e-3})
    {'loss': '1.781', 'masked_mse': '0.567', 'aux': '1.21'}
    >>> _progress_terms({"epoch": 0.0, "train_loss": 0.5, "val_loss": 0.61, "lr": 1e-4})  # with validation data
    {'loss': '0.5', 'val': '0.61'}
    """
    shown = {"loss": f"{row['train_loss']:.4g}"}
    shown.update({k: f"{v:.3g}" for k, v in row.items() if k not in ("epoch", "train_loss", "val_loss", "lr")})
    if math.isfinite(row.get("val_loss", math.nan)):
        shown["val"] = f"{row['val_loss']:.4g}"
    return shown


def fingerprint(*arrays: Any) -> str:
    """SHA-256 of arrays' shapes, types and values (texts too): names a run's data in ``fit(run_key=...)``.

    Parameters
    ----------
    *arrays
        Arrays or anything :func:`numpy.asarray` takes (lists, numbers, CPU tensors that need no gradient). Each
        one's shape, dtype and values (its C-ordered bytes) enter the digest, in the order given; an object array
        (e.g. of strings) is first converted to a string array.

    Returns
    -------
    The digest as a string of 64 hexadecimal digits. It changes with the shape or dtype even when the values are
    equal (``np.arange(3)`` in int32 and in int64 differ).

    Examples
    --------
    >>> import numpy as np
    >>> fingerprint(np.arange(3)) == fingerprint(np.arange(3)) != fingerprint(np.arange(4))
    True
    """
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        if array.dtype == object:
            array = array.astype(str)
        digest.update(f"{array.shape}{array.dtype.str}".encode())
        digest.update(array.data)  # the buffer itself: no copy of a large image stack
    return digest.hexdigest()


def _run_record(model: nn.Module, run_key: Mapping[str, Any] | None, **settings: Any) -> str:
    """What identifies a training run, as JSON: ``fit``'s settings, the parameter shapes and the caller's key."""
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    return json.dumps({"fit": settings, "parameters": shapes, "run_key": run_key}, sort_keys=True, default=str)


def _check_same_run(path: Path, stored: str | None, run: str) -> None:
    """Refuse to resume from the checkpoint of another run."""
    if stored == run:
        return
    if stored is None:
        differs = "it holds no record of its run (an older version wrote it)"
    else:
        old, new = json.loads(stored), json.loads(run)
        names = [
            f"{group}.{k}"
            for group in new
            for k in sorted(set(old[group] or {}) | set(new[group] or {}))
            if (old[group] or {}).get(k) != (new[group] or {}).get(k)
        ]
        differs = f"it was written by another run (differs in {', '.join(names)})"
    raise ValueError(
        f"checkpoint_dir holds {path}, but {differs}: resuming would mix two runs. Use an empty folder for this run, "
        "or delete the file to start this run over."
    )


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Iterable | Callable[[int], Iterable],
    *,
    epochs: int,
    val_data: Iterable | Callable[[int], Iterable] | None = None,
    steps_per_epoch: int | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.1,
    grad_clip: float | None = 1.0,
    patience: int | None = 10,
    seed: int | None = 42,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    description: str = "training",
    restore_best: bool = True,
    ema_decay: float | None = None,
    run_key: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` with AdamW, a cosine schedule with warm-up, gradient clipping and early stopping.

    Parameters
    ----------
    model
        The module to train (already on its device).
    loss_fn
        ``loss_fn(model, batch)`` returns the scalar loss, or ``(loss, {name: float})`` with terms to log.
    train_data
        An iterable of batches re-iterated every epoch, or ``train_data(epoch)`` returning one.
    epochs
        Maximum number of epochs.
    val_data
        Validation batches (same forms); early stopping and the best weights use the validation loss when given,
        the training loss otherwise.
    steps_per_epoch
        Number of optimiser steps per epoch, for the schedule; by default ``len(train_data)``.
    lr, weight_decay
        AdamW settings. The decay applies to every parameter, also to ``A_log``, ``D``, biases and norm weights,
        which mamba-ssm's convention exempts; exempting them changed no spatial or forecasting result beyond its
        noise (``docs/spatial_log.md``, "Weight decay on every parameter").
    warmup_fraction
        Fraction of all steps spent in linear warm-up.
    grad_clip
        Maximum gradient norm (``None``: no clipping).
    patience
        Stop after this many epochs without improvement, at least 1 (``None``: never stop early).
    seed
        Seed set before training with :func:`seed_everything` (``None``: leave the random state alone). It is not
        put back afterwards: the process stays seeded, with torch's deterministic algorithms on. Wrap the call in
        :func:`isolated_global_state` to keep the caller's state, as ``tl.embed``, ``ts.train_forecaster`` and
        ``pathology.train_classifier`` do.
    checkpoint_dir
        Save the full training state there after every epoch and resume from it when it exists. The state records
        the run it belongs to (these settings, the model's parameter shapes and ``run_key``); a state of another
        run is refused, not resumed.
    progress
        Show a tqdm progress bar.
    description
        Label of the progress bar.
    restore_best
        End with the weights of the epoch with the lowest monitored loss (``False``: the last epoch's weights).
    ema_decay
        Keep an exponential moving average of the weights (and buffers), updated after every optimiser step with
        this decay (e.g. ``0.99``: an average over roughly the last 100 steps), and use it in place of the raw
        weights for validation, for the kept best weights and for the weights the model ends with. ``None``: no
        average.
    run_key
        What else identifies the run for ``checkpoint_dir`` (e.g. its data), JSON-serialisable: a checkpoint written
        with another ``run_key`` is refused.

    Returns
    -------
    A :class:`TrainResult`; the model is left holding the weights of the best epoch (or of the last one).

    Notes
    -----
    Inside a ``torch.distributed`` process group (e.g. under ``torchrun``) training is data-parallel: rank 0's
    initial weights are broadcast, every rank computes the loss on its own share of each batch, gradients are
    averaged over the ranks before clipping and the optimiser step (what ``DistributedDataParallel`` does, for any
    ``loss_fn``), logged losses are averaged, only rank 0 shows progress and writes checkpoints.

    Examples
    --------
    Fit ``y = 3x`` with a linear model (started at zero, so that the run is the same every time) for five epochs of
    four batches:

    >>> import torch
    >>> from torch import nn
    >>> from dfmamba_st.core import fit
    >>> x = torch.linspace(-1, 1, 32)[:, None]
    >>> batches = [(x[i : i + 8], 3 * x[i : i + 8]) for i in range(0, 32, 8)]
    >>> def loss_fn(model, batch):
    ...     inputs, targets = batch
    ...     return nn.functional.mse_loss(model(inputs), targets)
    >>> model = nn.Linear(1, 1)
    >>> _ = nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    >>> result = fit(model, loss_fn, batches, epochs=5, lr=0.1, seed=None, progress=False)  # seed=None: no reseeding
    >>> len(result.history), sorted(result.history[0]), result.best_epoch
    (5, ['epoch', 'lr', 'train_loss', 'val_loss'], 4)
    >>> result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    True
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}.")
    if patience is not None and (
        isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 1
    ):
        raise ValueError(f"patience must be a whole number >= 1 or None (never stop early), got {patience!r}.")
    if seed is not None:
        seed_everything(seed)
    if steps_per_epoch is None:
        if callable(train_data):
            raise ValueError("steps_per_epoch is needed when train_data is a callable.")
        steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    total_steps = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup_fraction))
    result = TrainResult()
    best_loss, best_state, bad_epochs, start_epoch = math.inf, None, 0, 0
    rank, world_size = distributed_context()
    if world_size > 1:
        _sync_parameters(model)
    device = next(model.parameters()).device
    ema = (
        None
        if ema_decay is None
        else AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    )
    # the weights that are validated, kept as best and returned: the moving average when there is one
    judged = model if ema is None else ema.module

    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    run = _run_record(
        model,
        run_key,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        grad_clip=grad_clip,
        patience=patience,
        seed=seed,
        restore_best=restore_best,
        ema_decay=ema_decay,
    )
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_same_run(ckpt_path, state.get("run"), run)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        result = TrainResult(**state["result"])
        best_loss, best_state, bad_epochs = state["best_loss"], state["best_state"], state["bad_epochs"]
        # a run that stopped early is finished: resuming it trains no further epochs
        start_epoch = epochs if result.stopped_early else state["epoch"] + 1
        _set_rng_state(state["rng"])

    bar = tqdm(range(start_epoch, epochs), desc=description, disable=not progress or rank > 0, leave=False)
    for epoch in bar:
        model.train()
        sums: dict[str, float] = {}
        n_samples = 0
        for batch in _batches(train_data, epoch):
            loss, extra = _split_loss(loss_fn(model, batch))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Training loss became {loss.detach().item()} at epoch {epoch}; lower lr or check the input for "
                    "NaN/inf."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world_size > 1:
                _average_gradients(model, world_size)
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            weight = _n_samples(batch)
            n_samples += weight
            for name, value in {"train_loss": float(loss.detach()), **extra}.items():
                # a loss function may return its terms as tensors that require grad: read them detached
                value = value.detach() if isinstance(value, torch.Tensor) else value
                sums[name] = sums.get(name, 0.0) + float(value) * weight
        if n_samples == 0:
            raise ValueError(f"train_data yielded no batch in epoch {epoch}.")
        row = {k: v / n_samples for k, v in sums.items()}  # means over samples, not over batches of unequal size
        row["val_loss"] = _evaluate(judged, loss_fn, val_data, epoch) if val_data is not None else math.nan
        if world_size > 1:
            row = _average_values(row, device)
        row = {"epoch": float(epoch), **row}
        row["lr"] = optimizer.param_groups[0]["lr"]
        result.history.append(row)
        monitored = row["val_loss"] if val_data is not None else row["train_loss"]
        if not math.isfinite(monitored):  # a NaN would never improve: early stopping would end the run silently
            which, data = ("Validation loss", "validation") if val_data is not None else ("Mean training loss", "input")
            raise FloatingPointError(
                f"{which} became {monitored} at epoch {epoch}; lower lr or check the {data} data for NaN/inf."
            )
        if monitored < best_loss:
            best_loss, bad_epochs, result.best_epoch = monitored, 0, epoch
            best_state = {k: v.detach().clone() for k, v in judged.state_dict().items()}
        else:
            bad_epochs += 1
        bar.set_postfix(_progress_terms(row), refresh=False)
        stop = patience is not None and bad_epochs >= patience
        result.stopped_early = stop
        if ckpt_path is not None and rank == 0:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "result": result.__dict__,
                    "best_loss": best_loss,
                    "best_state": best_state,
                    "bad_epochs": bad_epochs,
                    "epoch": epoch,
                    "rng": _rng_state(),
                    "run": run,
                    **({} if ema is None else {"ema": ema.state_dict()}),
                },
                tmp,
            )
            tmp.replace(ckpt_path)
        if stop:
            break
    bar.close()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    return result


def _n_samples(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (the batch, or the first in a tuple, list or dict); 1 else.

    Losses are means over a batch, so an epoch's loss weighs each batch by this (a last, smaller batch counts less).
    """
    while isinstance(batch, tuple | list | Mapping) and len(batch):
        batch = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.ndim else 1


@torch.no_grad()
def _evaluate(model: nn.Module, loss_fn: LossFn, data: Iterable | Callable[[int], Iterable], epoch: int) -> float:
    """Mean loss over the samples of ``data``."""
    model.eval()
    total, n = 0.0, 0
    for batch in _batches(data, epoch):
        loss, _ = _split_loss(loss_fn(model, batch))
        weight = _n_samples(batch)
        total += float(loss) * weight
        n += weight
    model.train()
    if n == 0:
        raise ValueError(f"val_data yielded no batch in epoch {epoch}.")
    return total / n
