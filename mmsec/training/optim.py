"""Optimisers of the training core: named, with parameter groups and a schedule each.

An :class:`Optim` describes one optimiser of a training loop: what it updates, its kind
and learning rate, weight decay (never on gains, biases and temperatures, as open_clip_train
does), warm-up + cosine (or constant) schedule and gradient clipping. A loop may hold
several (AdvCLIP's generator and discriminator each have their own).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..errors import UsageError

__all__ = ["Optim", "build_optimizer", "lr_factor", "no_decay", "param_groups", "seed_everything"]

def no_decay(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter is exempt from weight decay, by open_clip_train's rule: gains and
    biases (fewer than 2 dimensions), batch/layer norms, and the temperature."""
    return (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
            or "logit_scale" in name)


def param_groups(params: nn.Module | Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
                 weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two groups: decayed weights, and the rest (:func:`no_decay`) at ``weight_decay=0``.

    ``params``: a module (names known), ``(name, param)`` pairs, or bare parameters (then only
    the dimension rule applies). Parameters that do not require grad are left out; a
    parameter listed twice is kept once.
    """
    if isinstance(params, nn.Module):
        named = list(params.named_parameters())
    else:
        items = list(params)
        named = [(p[0], p[1]) if isinstance(p, tuple) else ("", p) for p in items]
    seen: set[int] = set()
    decay, rest = [], []
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decay_all or not no_decay(name, p) else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


@dataclass
class Optim:
    """One optimiser of a training loop.

    ``params`` is a module or parameters (what this optimiser updates; its gradients are the
    only ones its loss computes). ``kind``: adamw | adam | sgd (momentum ``momentum``).
    The learning rate follows ``warmup_steps`` of linear warm-up, then ``schedule``
    (cosine to 0 over the loop's steps, or constant). ``grad_clip`` clips this optimiser's
    gradient norm. ``decay_all`` applies weight decay to every parameter (the old, flat rule).
    """

    params: nn.Module | Sequence[nn.Parameter]
    kind: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    decay_all: bool = False
    extra: dict = field(default_factory=dict)

    def parameters(self) -> list[nn.Parameter]:
        if isinstance(self.params, nn.Module):
            return [p for p in self.params.parameters() if p.requires_grad]
        return [p for p in self.params if p.requires_grad]

    def describe(self) -> dict:
        """JSON-able settings (for checkpoints and logs)."""
        return {"kind": self.kind, "lr": self.lr, "betas": list(self.betas),
                "momentum": self.momentum, "weight_decay": self.weight_decay,
                "schedule": self.schedule, "warmup_steps": self.warmup_steps,
                "grad_clip": self.grad_clip}


def build_optimizer(spec: Optim) -> torch.optim.Optimizer:
    """The torch optimiser of ``spec`` with its parameter groups."""
    groups = param_groups(spec.params, spec.weight_decay, spec.decay_all)
    if not groups:
        raise UsageError("an optimiser has no trainable parameters (all requires_grad=False?)")
    if spec.kind == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)
    if spec.kind == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, betas=spec.betas)
    if spec.kind == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    raise UsageError(f"unknown optimizer {spec.kind!r} (adamw, adam, sgd)")


def lr_factor(step: int, total: int, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
