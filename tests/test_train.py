"""The training core: optimisers and parameter groups, schedules, accumulation, several
optimisers in one loop, batch sources, checkpoint slots and (mid-epoch) resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmsec.runs import Run
from mmsec.training import (
    Batches,
    IndexBatches,
    Optim,
    build_optimizer,
    lr_factor,
    param_groups,
    pgd,
    train,
)


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
    return Batches(batches, 4)


def _fit(run, epochs: int, crash_at: int | None = None, every="epoch", crash_step=None):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = _problem()

    def step(batch, ctx):
        if crash_step is not None and ctx.step == crash_step:
            raise KeyboardInterrupt  # killed mid-epoch
        xb, yb = batch
        return {"loss": ((model(xb).squeeze(1) - yb) ** 2).mean(), "extra": torch.tensor(1.0)}

    def on_epoch_end(epoch, _):
        if crash_at is not None and epoch == crash_at:
            raise KeyboardInterrupt  # the run is killed after checkpointing epoch crash_at - 1
        return {}

    optim = Optim(model, kind="adam", lr=0.3, grad_clip=10.0, schedule="constant")
    out = train(step, _batches(x, y), optim, epochs=epochs, run=run, slot="lin",
                on_epoch_end=on_epoch_end, checkpoint_every=every)
    return model, out


def test_loss_goes_down():
    model, out = _fit(None, epochs=5)
    assert out.history[-1]["loss"] < out.history[0]["loss"] * 0.5
    assert out.steps == 20 and out.history[0]["extra"] == 1.0


def test_cosine_schedule_with_warmup():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_no_weight_decay_on_gains_biases_norms_and_temperature():
    from open_clip.model import CLIP

    clip = CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32,
                                          "layers": 1, "head_width": 16},
                text_cfg={"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2,
                          "layers": 1})
    decay, rest = param_groups(clip, 0.1)
    names = {id(p): n for n, p in clip.named_parameters()}
    rest_names = {names[id(p)] for p in rest["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert rest["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert "logit_scale" in rest_names
    assert all("bias" in n or "ln" in n or clip.get_parameter(n).ndim < 2 for n in rest_names)
    assert "visual.conv1.weight" in decay_names and "token_embedding.weight" in decay_names
    assert not any("bias" in n or n.endswith("ln_final.weight") for n in decay_names)
    opt = build_optimizer(Optim(clip, kind="adamw", weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_two_optimizers_in_one_loop_update_only_their_own_parameters():
    """A GAN-style step: D updated first through ctx.update, then G from the returned loss;
    G's loss flows through D, but D receives no gradient from it."""
    torch.manual_seed(0)
    G, D = nn.Linear(2, 2), nn.Linear(2, 1)
    frozen = nn.Linear(2, 2)  # a victim: no gradient may reach it
    seen_d = []

    def step(x, ctx):
        loss_d = (D(x) - 1).pow(2).mean() + D(G(x).detach()).pow(2).mean()
        ctx.update("D", loss_d)
        seen_d.append(D.weight.detach().clone())
        loss_g = (D(frozen(G(x))) - 1).pow(2).mean()
        return {"G": loss_g, "loss_D": loss_d.detach()}

    g0, d0 = G.weight.detach().clone(), D.weight.detach().clone()
    x = torch.randn(8, 2)
    out = train(step, Batches(lambda e: [x] * 3, 3),
                {"D": Optim(D, kind="adam", lr=0.1), "G": Optim(G, kind="adam", lr=0.1)},
                epochs=2)
    assert out.steps == 6 and {"loss_G", "loss_D"} <= set(out.history[0])
    assert not torch.equal(G.weight, g0) and not torch.equal(D.weight, d0)
    assert frozen.weight.grad is None and all(p.grad is None for p in D.parameters())
    assert not torch.equal(seen_d[0], d0)  # D stepped before G's loss was computed


def test_accumulation_equals_one_big_batch():
    x, y = _problem()

    def run_with(batch_size: int, accumulate: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        source = IndexBatches(32, batch_size, seed=0, shuffle=False)
        train(lambda idx, _c: ((model(x[idx]).squeeze(1) - y[idx]) ** 2).mean(), source,
              Optim(model, kind="sgd", lr=0.1, momentum=0.0, schedule="constant"), epochs=1,
              accumulate=accumulate)
        return model.weight.detach()

    assert torch.allclose(run_with(32, 1), run_with(16, 2), atol=1e-6)


def test_a_generator_without_length_is_an_error_not_a_guess():
    with pytest.raises(TypeError, match="length"):
        Batches(lambda epoch: (i for i in range(30)))
    assert len(Batches(lambda epoch: (i for i in range(30)), 30)) == 30
    source = IndexBatches(10, 4, seed=1)
    assert len(source) == 3 and [len(b) for b in source.epoch(0)] == [4, 4, 2]
    assert len(IndexBatches(10, 4, seed=1, drop_last=True)) == 2
    shards = [torch.cat(list(IndexBatches(10, 2, seed=1, rank=r, world_size=2).epoch(3)))
              for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))  # disjoint shards


def test_a_diverging_loss_stops_with_a_clear_error_before_the_weights_are_touched():
    model = nn.Linear(2, 1)
    w0 = model.weight.detach().clone()

    def step(x, ctx):
        return model(x).sum() * (float("nan") if ctx.step == 1 else 1.0)

    from mmsec.errors import MmsecError

    with pytest.raises(MmsecError, match="is nan at step 2: training diverged"):
        train(step, Batches(lambda e: [torch.ones(1, 2)] * 3, 3), Optim(model, lr=0.1), epochs=1)
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, w0)


def test_a_diverging_loss_checked_at_read_back_keeps_the_last_good_checkpoint(tmp_path,
                                                                            monkeypatch):
    # as on a GPU, where checking every loss at once would be a host-device sync per step
    monkeypatch.setenv("MMSEC_DEFER_CHECKS", "1")
    from mmsec.errors import MmsecError
    from mmsec.scalars import read_scalars

    model = nn.Linear(2, 1)

    def step(x, ctx):
        return model(x).sum() * (float("nan") if ctx.step == 4 else 1.0)

    with Run.create(tmp_path / "run", "test", "p", quiet=True) as run:
        with pytest.raises(MmsecError, match="is nan at step 5: training diverged"):
            train(step, Batches(lambda e: [torch.ones(1, 2)] * 8, 8), Optim(model, lr=0.1),
                  epochs=1, run=run, checkpoint_every=2)
        meta = run.load_checkpoint("train")[1]
    assert meta["step"] == 4  # the checkpoint after step 6 was never written
    steps = [s for s, _ in read_scalars(tmp_path / "run")[("train", "step")]["loss"]]
    assert steps == [1, 2, 3, 4]  # the steps before the bad one are logged


def test_numbers_read_back_late_are_the_numbers_of_their_step(tmp_path):
    from mmsec.scalars import read_scalars

    model = nn.Linear(2, 1)
    counter = torch.zeros(())

    def step(x, ctx):
        counter.add_(1)  # changed in place after it is logged
        return {"loss": model(x).sum(), "count": counter, "half": torch.tensor(0.5).half()}

    with Run.create(tmp_path / "run", "test", "p", quiet=True) as run:
        out = train(step, Batches(lambda e: [torch.ones(1, 2)] * 30, 30),
                    Optim(model, lr=0.1), epochs=1, run=run, checkpoint_every="never")
    curves = read_scalars(tmp_path / "run")[("train", "step")]
    assert curves["count"] == [(i, float(i)) for i in range(1, 31)]
    assert curves["half"][0] == (1, 0.5) and out.history[0]["count"] == 15.5


def test_a_step_without_a_loss_for_an_optimiser_is_an_error_not_a_silent_no_op():
    from mmsec.errors import MmsecError

    model = nn.Linear(2, 1)
    w0 = model.weight.detach().clone()
    one = Batches(lambda e: [torch.ones(1, 2)] * 2, 2)
    out = train(lambda x, ctx: {"gen": model(x).sum()}, one, {"gen": Optim(model, lr=0.1)},
                epochs=1)  # one optimiser may take its own name as the key
    assert out.steps == 2 and not torch.equal(model.weight, w0)
    assert "loss_gen" in out.history[0]  # logged as with several optimisers
    with pytest.raises(MmsecError, match="returned no loss .*keys: image"):
        train(lambda x, ctx: {"image": model(x).sum()}, one, {"gen": Optim(model, lr=0.1)},
              epochs=1)
    other = nn.Linear(2, 1)
    with pytest.raises(MmsecError, match="no loss for optimiser.*b in a whole epoch"):
        train(lambda x, ctx: {"a": model(x).sum()}, one,
              {"a": Optim(model, lr=0.1), "b": Optim(other, lr=0.1)}, epochs=1)


def test_min_steps_adds_epochs_on_small_data_and_steps_wins_over_epochs():
    model = nn.Linear(2, 1)
    two = Batches(lambda e: [torch.ones(1, 2)] * 2, 2)
    out = train(lambda x, ctx: model(x).sum(), two, Optim(model, lr=1e-3), epochs=3, min_steps=9)
    assert (out.steps, out.planned, len(out.history)) == (9, 9, 5)  # 5 epochs, the last cut
    out = train(lambda x, ctx: model(x).sum(), two, Optim(model, lr=1e-3), epochs=3, min_steps=2)
    assert out.steps == 6
    out = train(lambda x, ctx: model(x).sum(), two, Optim(model, lr=1e-3), steps=3, epochs=9,
                min_steps=50)
    assert out.steps == 3


def test_plateau_decides_from_the_history():
    from mmsec.training import Plateau

    stop = Plateau("acc", patience=2, min_delta=0.01)
    assert stop.check([{"acc": 0.5}, {"acc": 0.6}, {"acc": 0.7}]) is None
    assert stop.check([{"acc": 0.5}, {"acc": 0.7}, {"acc": 0.705}]) is None  # 1 epoch flat
    reason = stop.check([{"acc": 0.5}, {"acc": 0.7}, {"acc": 0.705}, {"acc": 0.69}])
    assert reason and "best 0.7 at epoch 2" in reason
    assert Plateau("loss", patience=1, mode="min").check([{"loss": 2.0}, {"loss": 2.5}])
    assert Plateau("acc", patience=1, min_epochs=5).check([{"acc": 1.0}, {"acc": 0.0}]) is None
    with pytest.raises(ValueError):
        Plateau("acc", patience=0)


def test_a_plateau_stops_the_loop_and_a_resumed_run_stays_stopped(tmp_path):
    from mmsec.training import Plateau

    model = nn.Linear(2, 1)
    scores = iter([0.1, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9])

    def run_it(run):
        return train(lambda x, ctx: model(x).sum(), Batches(lambda e: [torch.ones(1, 2)] * 3, 3),
                     Optim(model, lr=1e-3), epochs=7, run=run, slot="p",
                     on_epoch_end=lambda e, m: {"score": next(scores)},
                     stop=Plateau("score", patience=2))

    with Run.create(tmp_path / "r", "test", "p", quiet=True) as run:
        out = run_it(run)
    assert out.steps == 12 and len(out.history) == 4 and out.planned == 21
    assert "score has not improved" in out.stopped_early
    with Run.create(tmp_path / "r", "test", "p", resume=True, quiet=True) as run:
        again = run_it(run)
    assert again.already_done and again.steps == 12 and again.stopped_early == out.stopped_early


def test_a_plateau_never_stops_before_min_steps():
    from mmsec.training import Plateau

    model = nn.Linear(2, 1)
    # Flat from the start: without the floor this stops after epoch 3 (6 steps).
    out = train(lambda x, ctx: model(x).sum(), Batches(lambda e: [torch.ones(1, 2)] * 2, 2),
                Optim(model, lr=1e-3), epochs=2, min_steps=14,
                on_epoch_end=lambda e, m: {"score": 0.5}, stop=Plateau("score", patience=2))
    assert out.planned == 14 and out.steps == 14 and out.stopped_early is None
    out = train(lambda x, ctx: model(x).sum(), Batches(lambda e: [torch.ones(1, 2)] * 2, 2),
                Optim(model, lr=1e-3), epochs=20, min_steps=10,
                on_epoch_end=lambda e, m: {"score": 0.5}, stop=Plateau("score", patience=2))
    assert out.steps == 10 and out.stopped_early


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    with Run.create(tmp_path / "full", "test", "lin", quiet=True) as run:
        full, _ = _fit(run, epochs=4)
    with pytest.raises(KeyboardInterrupt):
        with Run.create(tmp_path / "killed", "test", "lin", quiet=True) as run:
            _fit(run, epochs=4, crash_at=2)
    with Run.create(tmp_path / "killed", "test", "lin", resume=True, quiet=True) as run:
        resumed, out = _fit(run, epochs=4)
    assert out.steps == 16 and len(out.history) == 4 and out.resumed_at == 8
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    with Run.create(tmp_path / "full", "test", "lin", quiet=True) as run:
        full, full_out = _fit(run, epochs=3, every=1)
    with pytest.raises(KeyboardInterrupt):
        with Run.create(tmp_path / "killed", "test", "lin", quiet=True) as run:
            _fit(run, epochs=3, every=1, crash_step=6)  # in the middle of the second epoch
    with Run.create(tmp_path / "killed", "test", "lin", resume=True, quiet=True) as run:
        resumed, out = _fit(run, epochs=3, every=1)
    assert out.resumed_at == 6 and out.steps == 12
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert out.history[1]["loss"] == pytest.approx(full_out.history[1]["loss"])


def test_a_finished_stage_is_restored_not_run_again(tmp_path):
    with Run.create(tmp_path / "r", "test", "lin", quiet=True) as run:
        first, _ = _fit(run, epochs=2)
    with Run.create(tmp_path / "r", "test", "lin", resume=True, quiet=True) as run:
        calls = []
        model = nn.Linear(4, 1)
        out = train(lambda b, c: calls.append(1) or model(b).sum(), Batches(lambda e: [
            torch.zeros(1, 4)], 1), Optim(model), epochs=2, run=run, slot="lin")
        assert out.already_done and calls == [] and torch.equal(model.weight, first.weight)
        other = nn.Linear(4, 1)
        out = train(lambda b, c: other(b).sum(), Batches(lambda e: [torch.zeros(1, 4)], 1),
                    Optim(other), epochs=1, run=run, slot="another stage")
        assert out.steps == 1 and not out.already_done  # its own slot: trained from scratch


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    with Run.create(tmp_path / "r", "test", "lin", quiet=True) as run:
        _fit(run, epochs=1)
    with Run.create(tmp_path / "r", "test", "lin", resume=True, quiet=True) as run:
        wider = nn.Linear(8, 1)
        with pytest.raises(Exception, match="does not fit 'loss'.*options"):
            train(lambda b, c: wider(b).sum(), Batches(lambda e: [torch.zeros(1, 8)], 1),
                  Optim(wider), epochs=1, run=run, slot="lin")


def test_pgd_maximises_its_loss_within_the_ball():
    torch.manual_seed(0)
    w = torch.randn(3 * 4 * 4)
    x = torch.rand(5, 3, 4, 4)

    def loss(adv):
        return (adv.flatten(1) @ w).sum()

    for momentum in (None, 0.9):
        adv = pgd(loss, x, eps=4 / 255, step_size=1 / 255, steps=10, momentum=momentum,
                  generator=torch.Generator().manual_seed(0))
        assert (adv - x).abs().max() <= 4 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert loss(adv) > loss(x) + 0.5 * (4 / 255) * w.abs().sum() * 5 * 0.5
