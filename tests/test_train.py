"""The shared training loop: schedule, clipping, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmsec.runs import Run
from mmsec.train import TrainConfig, lr_factor, train_loop


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return x, y


def _batches(x, y):
    def batches(epoch: int):
        perm = torch.randperm(len(x))  # draws from torch's RNG: resume must restore it
        for s in range(0, len(x), 16):
            idx = perm[s:s + 16]
            yield x[idx], y[idx]
    return batches


def _fit(run, epochs: int, crash_at: int | None = None):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = _problem()

    def step(batch, _):
        xb, yb = batch
        return {"loss": ((model(xb).squeeze(1) - yb) ** 2).mean(), "extra": torch.tensor(1.0)}

    def on_epoch_end(epoch, _):
        if crash_at is not None and epoch == crash_at:
            raise KeyboardInterrupt  # the run is killed after checkpointing epoch crash_at - 1
        return {}

    cfg = TrainConfig(epochs=epochs, lr=0.3, optimizer="adam", grad_clip=10.0)
    out = train_loop({"lin": model}, _batches(x, y), step, cfg, run=run,
                     on_epoch_end=on_epoch_end, steps_per_epoch=4)
    return model, out


def test_loss_goes_down():
    model, out = _fit(None, epochs=5)
    hist = out["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] * 0.5
    assert out["steps"] == 20 and hist[0]["extra"] == 1.0


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)
    assert lr_factor(50, 100, TrainConfig(schedule="constant")) == 1.0


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    with Run.create(tmp_path / "full", "test", "lin", quiet=True) as run:
        full, _ = _fit(run, epochs=4)
    with pytest.raises(KeyboardInterrupt):
        with Run.create(tmp_path / "killed", "test", "lin", quiet=True) as run:
            _fit(run, epochs=4, crash_at=2)
    with Run.create(tmp_path / "killed", "test", "lin", resume=True, quiet=True) as run:
        resumed, out = _fit(run, epochs=4)
    assert out["steps"] == 16 and len(out["history"]) == 4
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_checkpoint_of_another_stage_is_not_loaded(tmp_path):
    with Run.create(tmp_path / "r", "test", "lin", quiet=True) as run:
        _fit(run, epochs=1)
    with Run.create(tmp_path / "r", "test", "lin", resume=True, quiet=True) as run:
        model = nn.Linear(4, 1)
        x, y = _problem()
        out = train_loop({"other": model}, _batches(x, y),
                         lambda b, _: ((model(b[0]).squeeze(1) - b[1]) ** 2).mean(),
                         TrainConfig(epochs=1), run=run, desc="another stage", steps_per_epoch=4)
        assert out["steps"] == 4  # trained from scratch, not resumed from the other stage
