"""The shared training loop: schedule, clipping, early stopping, seeding, history, checkpoint resume."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dfmamba_st.core import cosine_with_warmup, fit, isolated_global_state, resolve_device, seed_everything
from dfmamba_st.core import training as training_mod


def regression_data(n=64, seed=0, batch=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.01 * torch.randn(n, generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def mse(model, batch):
    x, y = batch
    loss = (model(x).squeeze(-1) - y).pow(2).mean()
    return loss, {"mse": float(loss.detach())}


def test_terms_returned_as_tensors_that_require_grad_are_logged_without_a_warning():
    """A loss function may return its terms as the tensors it computed; fit reads them detached."""

    def mse_terms(model, batch):
        x, y = batch
        loss = (model(x).squeeze(-1) - y).pow(2).mean()
        return loss, {"mse": loss}  # requires grad

    torch.manual_seed(0)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch says "Converting a tensor with requires_grad=True" once per process otherwise
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Converting a tensor with requires_grad")
            result = fit(nn.Linear(4, 1), mse_terms, regression_data(), epochs=2, lr=5e-2, progress=False)
    finally:
        torch.set_warn_always(warn_always)
    assert [row["mse"] == pytest.approx(row["train_loss"]) for row in result.history] == [True, True]


def test_loss_falls_and_history_is_recorded():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    result = fit(model, mse, regression_data(), epochs=30, lr=5e-2, weight_decay=0.0, progress=False)
    assert len(result.history) == 30
    first, last = result.history[0]["train_loss"], result.history[-1]["train_loss"]
    assert last < 0.05 * first
    assert set(result.history[0]) >= {"epoch", "train_loss", "val_loss", "lr", "mse"}
    assert math.isnan(result.history[0]["val_loss"])
    assert not model.training  # left in evaluation mode, ready to embed


def test_schedule_warms_up_then_decays_to_zero():
    f = cosine_with_warmup(100, 0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-2)
    assert f(100) == pytest.approx(0.0, abs=1e-9)
    assert cosine_with_warmup(27, 0.1)(1) == pytest.approx(2 / 3)  # round(2.7) = 3 warm-up steps, not int's 2
    lrs = [row["lr"] for row in fit(nn.Linear(4, 1), mse, regression_data(), epochs=20, lr=1.0, progress=False).history]
    assert max(lrs) == pytest.approx(1.0, rel=0.05) and lrs[-1] < 0.01


def test_early_stopping_restores_best_weights():
    train = regression_data()
    val = regression_data(seed=1)
    model = nn.Linear(4, 1)

    def noisy_val(m, batch):  # validation loss that gets worse every epoch after the first
        noisy_val.calls += 1
        return torch.tensor(float(noisy_val.calls))

    noisy_val.calls = 0

    def loss_fn(m, batch):
        return noisy_val(m, batch) if not m.training else mse(m, batch)

    result = fit(model, loss_fn, train, val_data=val[:1], epochs=50, patience=3, lr=1e-2, progress=False)
    assert result.stopped_early and len(result.history) == 4 and result.best_epoch == 0

    # restore_best=False, no early stopping: the last epoch's weights, which differ from the best epoch's
    noisy_val.calls = 0
    last = nn.Linear(4, 1)
    result = fit(
        last, loss_fn, train, val_data=val[:1], epochs=6, patience=None, restore_best=False, lr=1e-2, progress=False
    )
    assert len(result.history) == 6 and result.best_epoch == 0 and not result.stopped_early
    again = nn.Linear(4, 1)
    noisy_val.calls = 0
    fit(again, loss_fn, train, val_data=val[:1], epochs=6, patience=None, lr=1e-2, progress=False)
    assert not torch.allclose(last.weight, again.weight)  # the default would have gone back to epoch 0


def test_the_checkpoint_is_written_after_every_epoch(tmp_path):
    for epochs in (1, 2):
        fit(
            nn.Linear(4, 1),
            mse,
            regression_data(32),
            epochs=epochs,
            checkpoint_dir=tmp_path / str(epochs),
            patience=None,
            progress=False,
        )
        assert torch.load(tmp_path / str(epochs) / "last.pt", weights_only=True)["epoch"] == epochs - 1
        assert [f.name for f in (tmp_path / str(epochs)).iterdir()] == ["last.pt"]  # no half-written file left


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_same_seed_same_result_and_resume_equals_uninterrupted(tmp_path, ema_decay):
    def run(ckpt=None, interrupt_at=None):
        torch.manual_seed(123)  # a different global state must not matter: fit seeds itself
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        calls = {"n": 0}

        def loss_fn(m, batch):
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                raise KeyboardInterrupt
            return mse(m, batch)

        fit(
            model,
            loss_fn,
            regression_data(),
            epochs=6,
            lr=1e-2,
            seed=7,
            checkpoint_dir=ckpt,
            progress=False,
            patience=None,
            ema_decay=ema_decay,
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    full = run()
    assert torch.equal(full, run())
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, interrupt_at=4 * 3 + 2)  # stopped inside epoch 3: the checkpoint holds epochs 0-2
    assert (tmp_path / "last.pt").exists()
    resumed = run(tmp_path)
    assert torch.allclose(full, resumed, atol=1e-6)


def test_moving_average_of_weights_is_validated_and_kept():
    decay, train, val = 0.9, regression_data(), regression_data(seed=1)[:2]
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    common = dict(epochs=5, val_data=val, lr=5e-2, patience=None, restore_best=False, progress=False)

    # the raw trajectory, recorded: the weights before each step, then the final ones
    torch.manual_seed(0)
    raw, before_step = nn.Linear(4, 1), []

    def recording_mse(m, batch):
        if m.training:
            before_step.append(flat(m))
        return mse(m, batch)

    fit(raw, recording_mse, train, **common)
    after_step = [*before_step[1:], flat(raw)]  # the average does not change the trajectory it averages
    expected = after_step[0]
    for weights in after_step[1:]:
        expected = decay * expected + (1 - decay) * weights

    torch.manual_seed(0)
    averaged = nn.Linear(4, 1)
    result = fit(averaged, mse, train, ema_decay=decay, **common)
    assert len(after_step) == 5 * len(train)
    torch.testing.assert_close(flat(averaged), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(flat(averaged), flat(raw), atol=1e-3)
    # the validation loss of the last epoch is that of the averaged weights the model now holds
    with torch.no_grad():
        val_loss = sum(float(mse(averaged, batch)[0]) for batch in val) / len(val)
    assert result.history[-1]["val_loss"] == pytest.approx(val_loss, rel=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        fit(nn.Linear(4, 1), mse, train, epochs=1, ema_decay=1.0, progress=False)


def test_non_finite_loss_fails_clearly():
    model = nn.Linear(4, 1)
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        fit(model, lambda m, b: m(b[0]).sum() * float("nan"), regression_data(), epochs=1, progress=False)


def test_non_finite_validation_loss_fails_clearly():
    """A NaN never improves on the best loss: without the check, early stopping ended the run without a word."""

    def loss_fn(model, batch):
        loss, _ = mse(model, batch)
        return loss if model.training else loss * float("nan")

    with pytest.raises(FloatingPointError, match="Validation loss became nan at epoch 0"):
        fit(
            nn.Linear(4, 1),
            loss_fn,
            regression_data(),
            val_data=regression_data(),
            epochs=4,
            patience=2,
            progress=False,
        )


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        for device in ("cuda", 0):  # an index is a CUDA device, as torch.device reads it
            with pytest.raises(ValueError, match="no CUDA GPU"):
                resolve_device(device)
    else:
        assert resolve_device(0) == torch.device("cuda:0")
    for device in (1.5, None, -1, True, np.int64(-1), np.bool_(True)):
        with pytest.raises(TypeError, match="device must be 'auto', 'cpu'"):
            resolve_device(device)
    for device in ("meta", "mps", torch.device("meta")):  # devices torch knows, which the package does not run on
        with pytest.raises(ValueError, match="Unsupported device"):
            resolve_device(device)


def _scripted_val(values):
    """A loss function whose validation loss runs through ``values`` (one per epoch), training on a real MSE."""
    calls = {"n": 0}

    def loss_fn(m, batch):
        if m.training:
            return mse(m, batch)
        calls["n"] += 1
        return torch.tensor(float(values[calls["n"] - 1]))

    return loss_fn


@pytest.mark.parametrize(
    ("vals", "best", "n_epochs"),
    [([5, 6, 4, 7, 3, 8, 9, 10, 11, 12], 4, 7), ([5] * 10, 0, 3)],
    ids=["improvements", "plateau"],
)
def test_patience_counts_epochs_since_the_last_improvement(vals, best, n_epochs):
    """R1: an improvement resets the count of bad epochs; a loss equal to the best is none (a plateau stops early
    and keeps the first best epoch)."""
    result = fit(
        nn.Linear(4, 1),
        _scripted_val(vals),
        regression_data(32),
        val_data=[None],
        epochs=10,
        patience=2,
        progress=False,
    )
    assert result.best_epoch == best and len(result.history) == n_epochs and result.stopped_early


def test_best_weights_kept_are_the_moving_average():
    """R8: with ema_decay the weights kept as best are the averaged ones (here the last epoch is the best)."""
    kept, last = nn.Linear(4, 1), nn.Linear(4, 1)
    last.load_state_dict(kept.state_dict())
    common = dict(val_data=[None], epochs=4, patience=None, ema_decay=0.5, lr=5e-2, progress=False)
    fit(kept, _scripted_val([4, 3, 2, 1]), regression_data(32), restore_best=True, **common)
    fit(last, _scripted_val([4, 3, 2, 1]), regression_data(32), restore_best=False, **common)
    for a, b in zip(kept.parameters(), last.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_reach_the_optimiser_clipped(monkeypatch):
    """R9: test_gradient_norm_is_clipped cannot fail (Adam's first step is about lr whatever the gradient's size)."""
    norms = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    big = [(torch.full((8, 4), 1e3), torch.full((8,), -1e6))] * 3
    fit(nn.Linear(4, 1), mse, big, epochs=1, grad_clip=1.0, progress=False)
    assert len(norms) == 3 and max(norms) <= 1.0 + 1e-5
    norms.clear()
    fit(nn.Linear(4, 1), mse, big, epochs=1, grad_clip=None, progress=False)
    assert min(norms) > 1e3  # the same data unclipped: the check above can fail


def test_weight_decay_reaches_the_optimiser():
    """M09: with a zero gradient, AdamW's decoupled decay alone shrinks a weight by prod(1 - lr_t * wd)."""
    data = regression_data(32, batch=8)
    zero_grad_loss = lambda m, b: (m(b[0]) * 0.0).sum()
    lr, epochs = 0.1, 2
    for wd in (0.0, 0.5):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        w0 = model.weight.detach().clone()
        fit(
            model,
            zero_grad_loss,
            data,
            epochs=epochs,
            lr=lr,
            weight_decay=wd,
            patience=None,
            restore_best=False,
            progress=False,
        )
        f = cosine_with_warmup(epochs * len(data), 0.1)
        shrink = math.prod(1 - lr * f(step) * wd for step in range(epochs * len(data)))
        torch.testing.assert_close(model.weight.detach(), w0 * shrink, rtol=1e-6, atol=1e-7)


def test_fit_with_seed_none_follows_the_callers_random_state():
    """M10: seed=None leaves the random state alone (training with dropout then follows torch.manual_seed)."""

    def run(global_seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
        torch.manual_seed(global_seed)
        fit(model, mse, regression_data(32, batch=8), epochs=2, lr=1e-2, seed=None, patience=None, progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    with isolated_global_state():
        torch.use_deterministic_algorithms(False)
        a, b, c = run(1), run(1), run(2)
        assert not torch.are_deterministic_algorithms_enabled()  # seed_everything was not called either
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_resolve_device_refuses_a_gpu_index_past_the_last(monkeypatch):
    """M11: with one GPU, 'cuda:1' is refused and 'cuda:0' accepted."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == resolve_device(np.int64(0)) == resolve_device(0) == torch.device("cuda:0")
    for device in ("cuda:1", 1, np.int32(1)):
        with pytest.raises(ValueError, match="1 CUDA GPU"):
            resolve_device(device)


def test_data_parallel_gradients_and_logged_losses_are_means_over_ranks(monkeypatch):
    """M12: fit under a (faked) 2-rank group with identical ranks gives the optimiser the 1-rank gradients.

    Adam is invariant to the gradient's scale, so a sum instead of a mean barely moves the weights and the gloo test
    in test_scale.py cannot see it; the gradients reaching the optimiser can.
    """
    import torch.distributed as dist

    grads = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads.append(torch.cat([p.grad.flatten().clone() for g in self.param_groups for p in g["params"]]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)

    def run():
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        res = fit(model, mse, regression_data(32, batch=8), epochs=2, grad_clip=None, patience=None, progress=False)
        return [row["train_loss"] for row in res.history]

    single = run()
    one_rank = grads[:]
    grads.clear()
    monkeypatch.setattr(training_mod, "distributed_context", lambda: (0, 2))
    broadcast = []
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: broadcast.append((tensor.shape, src)))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.mul_(2))  # two ranks holding the same values
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    two = run()
    assert broadcast == [(torch.Size([1, 4]), 0), (torch.Size([1]), 0)]  # every rank starts from rank 0's weights
    assert len(grads) == len(one_rank) == 8
    for a, b in zip(grads, one_rank):
        torch.testing.assert_close(a, b)
    assert two == pytest.approx(single, rel=1e-6)


def test_resume_keeps_the_best_epoch_and_the_patience_count(tmp_path):
    """M13: the best loss, best weights and bad-epoch count come back from the checkpoint."""
    vals = [1.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]

    def run(ckpt, interrupt_epoch=None):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        state = {"epoch": 0}

        def loss_fn(m, batch):
            if m.training:
                if state["epoch"] == interrupt_epoch:
                    raise KeyboardInterrupt
                return mse(m, batch)
            return torch.tensor(vals[batch])  # eval: the batch is the epoch number

        def train_data(epoch):
            state["epoch"] = epoch
            return regression_data(32, batch=8)

        res = fit(
            model, loss_fn, train_data, val_data=lambda e: [e], steps_per_epoch=4, epochs=8, patience=3,
            lr=1e-2, checkpoint_dir=ckpt, progress=False,
        )  # fmt: skip
        return res, torch.cat([p.detach().flatten() for p in model.parameters()])

    full, w_full = run(None)
    assert full.best_epoch == 0 and len(full.history) == 4 and full.stopped_early
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, interrupt_epoch=2)  # epochs 0 and 1 are in the checkpoint
    resumed, w_resumed = run(tmp_path)
    assert resumed.best_epoch == 0 and len(resumed.history) == 4 and resumed.stopped_early
    torch.testing.assert_close(w_resumed, w_full)


def test_isolated_global_state_puts_back_warn_only():
    """M14: the caller's (deterministic, warn_only) pair is restored, warn_only included."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for warn_only in (True, False):
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
            with isolated_global_state():
                torch.use_deterministic_algorithms(True, warn_only=not warn_only)
            assert torch.is_deterministic_algorithms_warn_only_enabled() is warn_only
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_seeding_keeps_a_users_cublas_setting_and_the_isolation_puts_back_cudnn_benchmark(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with isolated_global_state():
        seed_everything(0)
        assert torch.backends.cudnn.benchmark is False and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.benchmark is True and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with isolated_global_state():
        seed_everything(0)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # set by the user: kept


def test_a_checkpoint_records_its_run_and_one_of_another_run_is_refused(tmp_path):
    """Settings, parameter shapes and the caller's run_key must match to resume; a state with no record (written
    before runs were recorded) is refused too."""
    options = dict(epochs=2, lr=1e-2, progress=False, checkpoint_dir=tmp_path, run_key={"data": "a"})
    fit(nn.Linear(4, 1), mse, regression_data(), **options)
    fit(nn.Linear(4, 1), mse, regression_data(), **options)  # the same run: resumed (nothing left to do)
    for change, named in [
        ({"lr": 2e-2}, "fit.lr"),
        ({"run_key": {"data": "b"}}, "run_key.data"),
        ({"weight_decay": 0.0}, "fit.weight_decay"),
    ]:
        with pytest.raises(ValueError, match=rf"another run \(differs in {named}\)"):
            fit(nn.Linear(4, 1), mse, regression_data(), **{**options, **change})
    with pytest.raises(ValueError, match=r"differs in parameters\.bias, parameters\.weight"):
        fit(nn.Linear(4, 2), mse, regression_data(), **options)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["run"]
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="holds no record of its run"):
        fit(nn.Linear(4, 1), mse, regression_data(), **options)


def _nine_samples_in_batches_of_eight_and_one():
    """``(y, batches)``: 9 regression samples in batches of 8 and 1, where the mean of ``|y|`` over the samples and the
    mean of the two batch means differ (the latter weighs the last sample as much as the other eight)."""
    x, y = regression_data(n=9, batch=9)[0]
    assert abs(float(y[:8].abs().mean() + y[8:].abs().mean()) / 2 - float(y.abs().mean())) > 0.05  # a real difference
    return y, [(x[:8], y[:8]), (x[8:], y[8:])]


def test_the_validation_loss_is_a_mean_over_samples_not_over_batches_of_unequal_size():
    """9 validation samples in batches of 8 and 1: the monitored loss is their mean (the mean of the two batch means
    weighed the last sample as much as the other eight)."""
    y, val = _nine_samples_in_batches_of_eight_and_one()

    def loss_fn(model, batch):
        if model.training:
            return mse(model, batch)
        grad_enabled.append(torch.is_grad_enabled())
        return batch[1].abs().mean()

    grad_enabled = []
    result = fit(nn.Linear(4, 1), loss_fn, regression_data(), epochs=1, val_data=val, progress=False)
    assert result.history[0]["val_loss"] == pytest.approx(float(y.abs().mean()))
    assert grad_enabled == [False, False]  # validation builds no graph
    with pytest.raises(ValueError, match="val_data yielded no batch in epoch 0"):
        fit(nn.Linear(4, 1), mse, regression_data(), epochs=1, val_data=[], progress=False)


def test_the_training_loss_and_its_terms_are_means_over_samples_not_over_batches_of_unequal_size():
    """An epoch of 9 training samples in batches of 8 and 1: the logged loss and terms are their means over samples."""
    y, train = _nine_samples_in_batches_of_eight_and_one()

    def loss_fn(model, batch):
        level = batch[1].abs().mean()  # a value that training does not move, with a gradient through the model
        return 0.0 * model(batch[0]).sum() + level, {"level": level}

    row = fit(nn.Linear(4, 1), loss_fn, train, epochs=1, progress=False).history[0]
    assert row["train_loss"] == pytest.approx(float(y.abs().mean()))
    assert row["level"] == pytest.approx(row["train_loss"])


def test_resuming_a_run_that_stopped_early_trains_no_further(tmp_path):
    def loss_fn(model, batch):  # a validation loss that only grows: stops after epoch 0 + patience 2
        if model.training:
            return mse(model, batch)
        loss_fn.calls += 1
        return torch.tensor(float(loss_fn.calls))

    loss_fn.calls = 0
    options = dict(epochs=10, patience=2, val_data=regression_data(batch=64), checkpoint_dir=tmp_path, progress=False)
    first = fit(nn.Linear(4, 1), loss_fn, regression_data(), **options)
    assert first.stopped_early and len(first.history) == 3
    model = nn.Linear(4, 1)
    again = fit(model, loss_fn, regression_data(), **options)
    assert len(again.history) == 3 and again.stopped_early and loss_fn.calls == 3  # no epoch run, nothing validated


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_patience_must_be_a_whole_number_of_at_least_one(patience):
    """patience=0 stopped every run after its first epoch."""
    with pytest.raises(ValueError, match=r"patience must be a whole number >= 1 or None"):
        fit(nn.Linear(4, 1), mse, regression_data(), epochs=2, patience=patience, progress=False)


def test_fingerprint_hashes_a_large_array_without_copying_it():
    """The run key of a pathology checkpoint hashes the whole image stack: its bytes are read in place (a copy held
    a second stack in memory), and strided or object arrays hash as their contiguous / text form."""
    import tracemalloc

    import numpy as np

    from dfmamba_st.core import fingerprint

    images = np.zeros((8, 3, 512, 512), dtype=np.uint8)  # 6 MiB
    tracemalloc.start()
    try:
        fingerprint(images)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 10
    grid = np.arange(12).reshape(3, 4)
    assert fingerprint(grid[:, ::2]) == fingerprint(np.ascontiguousarray(grid[:, ::2])) != fingerprint(grid)
    # the same bytes under another shape or dtype are other data
    assert fingerprint(grid) != fingerprint(grid.reshape(4, 3))
    assert fingerprint(np.zeros(2, np.int32)) != fingerprint(np.zeros(1, np.int64))
    assert fingerprint(np.array(["a", "bc"], dtype=object)) == fingerprint(np.array(["a", "bc"]))
