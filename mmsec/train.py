"""The one training loop: optimiser, schedule, clipping, progress, checkpoint and resume.

Everything that updates weights (zoo training, backdoor implants, fine-tuning
defenses, patch and trigger optimisation) calls ``train_loop`` with its own
``step`` function, so schedules, checkpoints and ``--resume`` behave the same
everywhere.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train_loop``. ``steps`` (if set) overrides ``epochs``."""

    epochs: int = 1
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adam | sgd
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    grad_clip: float | None = None
    checkpoint_every: str = "epoch"  # epoch | never
    extra: dict = field(default_factory=dict)


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 0 (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for k, v in meta.get("scalars", {}).items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def train_loop(
    modules: dict[str, nn.Module],
    batches: Callable[[int], Iterable],
    step: Callable[[object, int], torch.Tensor | dict],
    cfg: TrainConfig,
    *,
    run=None,
    params: Sequence[nn.Parameter] | None = None,
    desc: str = "train",
    on_epoch_end: Callable[[int, dict], dict | None] | None = None,
    steps_per_epoch: int | None = None,
) -> dict:
    """Run ``cfg.epochs`` epochs of ``step(batch, global_step) -> loss`` over ``batches(epoch)``.

    ``modules`` are the trainable (and checkpointed) modules; ``params`` restricts
    the optimised parameters (default: all of ``modules`` with ``requires_grad``).
    ``step`` may return a loss tensor or a dict with a ``"loss"`` tensor plus
    scalars to log. With a ``run`` (mmsec.runs.Run), a checkpoint is written after
    every epoch and, when the run was created with resume, training continues
    from the last one. Returns ``{"history": [...per-epoch means...], "steps": n}``.
    """
    if params is None:
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    if steps_per_epoch is None:
        try:
            steps_per_epoch = len(batches(0))  # type: ignore[arg-type]
        except TypeError:
            steps_per_epoch = cfg.steps or 1
    total = cfg.steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    history: list[dict] = []
    start_epoch, global_step = 0, 0

    if run is not None and getattr(run, "resume", False):
        ckpt = run.load_checkpoint()
        if ckpt is not None and ckpt[1].get("desc") != desc:
            run.log.info("checkpoint belongs to %r, not %r: not resuming this stage",
                         ckpt[1].get("desc"), desc)
            ckpt = None
        if ckpt is not None:
            state, meta = ckpt
            for name, module in modules.items():
                sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
                module.load_state_dict(sub)
            _unflatten_optimizer(opt, state, meta["optimizer"])
            start_epoch, global_step = int(meta["epoch"]) + 1, int(meta["step"])
            history = list(meta.get("history", []))
            run.log.info("resumed %s from epoch %d (step %d)", desc, start_epoch, global_step)

    for module in modules.values():
        module.train()
    for epoch in range(start_epoch, epochs):
        sums: dict[str, float] = {}
        count = 0
        it = batches(epoch)
        if run is not None:
            it = run.progress(it, desc=f"{desc} {epoch + 1}/{epochs}", total=steps_per_epoch)
        for batch in it:
            if global_step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(global_step, total, cfg)
            out = step(batch, global_step)
            loss = out["loss"] if isinstance(out, dict) else out
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            global_step += 1
            count += 1
            logs = {"loss": float(loss.detach())}
            if isinstance(out, dict):
                logs.update({k: float(v) for k, v in out.items() if k != "loss"})
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            if hasattr(it, "set_postfix") and count % 10 == 0:
                it.set_postfix(loss=f"{sums['loss'] / count:.4f}")
        means = {k: v / max(1, count) for k, v in sums.items()}
        means["epoch"] = epoch
        if on_epoch_end is not None:
            for module in modules.values():
                module.eval()
            means.update(on_epoch_end(epoch, means) or {})
            for module in modules.values():
                module.train()
        history.append(means)
        if run is not None:
            run.log.info("%s epoch %d: %s", desc, epoch + 1,
                         ", ".join(f"{k}={v:.4g}" for k, v in means.items() if k != "epoch"))
            if cfg.checkpoint_every == "epoch":
                tensors = {f"{n}.{k}": v.detach().cpu().contiguous().clone()
                           for n, m in modules.items() for k, v in m.state_dict().items()}
                opt_tensors, opt_meta = _flatten_optimizer(opt)
                tensors.update(opt_tensors)
                run.save_checkpoint(tensors, {
                    "epoch": epoch, "step": global_step, "desc": desc, "optimizer": opt_meta,
                    "history": history, "config": json.loads(json.dumps(asdict(cfg), default=str)),
                })
        if global_step >= total:
            break
    for module in modules.values():
        module.eval()
    return {"history": history, "steps": global_step}
