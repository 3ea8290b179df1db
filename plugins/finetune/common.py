"""What the fine-tuning defenses share: options, the clean data as batches, the frozen
original as teacher, supervised losses with their variants, and the one training loop.

Every defense here fine-tunes a copy of the model (the image tower by default; ``tower``
selects text or both) with ``mmsec.train``: parameter groups without weight decay on
gains, biases and the temperature, warm-up + cosine, clipping, accumulation, autocast at
the run's precision (the attack's inner loop stays fp32), per-epoch checkpoints and
``--resume``. Batch-norm statistics stay as the pretrained model has them (the model is
kept in eval mode; its weights still train), so adversarial batches cannot drift them.
Inner maximisation is ``mmsec.pgd`` with the method's own loss, run with the model in
eval mode.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mmsec import (
    Defense,
    IndexBatches,
    MmsecError,
    Optim,
    Options,
    fields,
    load_images,
    losses,
    pgd,
    train,
)

LossName = Literal["infonce", "focal", "dcl", "dclw"]


class FineTuneOptions(Options):
    """Options every fine-tuning defense has (each sets the paper's defaults)."""

    steps: int | None = Field(None, ge=1, description="optimiser steps (none: epochs over "
                                                      "the clean data)")
    epochs: int = fields.epochs(10, "passes over the clean data (when steps is none)")
    min_steps: int = fields.min_steps(0)
    batch_size: int = fields.batch_size(128, minimum=2)
    lr: float = fields.lr(1e-5)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd "
                                                                    "(momentum 0.9)")
    weight_decay: float = fields.weight(1e-4, "weight decay (never on gains, biases, norms "
                                              "or the temperature)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps, then cosine")
    grad_clip: float | None = Field(None, gt=0, description="gradient norm clip (none: off)")
    accumulate: int = Field(1, ge=1, description="batches per optimiser step")
    tower: Literal["image", "text", "all"] = Field("image", description="what is fine-tuned")


class AdversarialOptions(FineTuneOptions):
    """The inner maximisation (PGD in the L-inf ball, pixels in [0, 1], at the images'
    resolution before the model resizes them)."""

    eps: float = fields.eps(1 / 255, "training L-inf budget (pixels in [0, 1])")
    attack_steps: int = fields.steps(2, "PGD steps of the inner maximisation")
    step_size: float = fields.eps(1 / 255, "PGD step")
    momentum: float | None = Field(None, ge=0, lt=1, description="PGD momentum (MI-FGSM); "
                                                                 "none: plain sign steps")


class SupervisedOptions(AdversarialOptions):
    """TeCoA and PMG-AFT: zero-shot classification of the (adversarial) images."""

    template: str = Field("This is a photo of a {}", description="prompt of the class texts")
    loss: LossName = Field("infonce", description="image vs class-text loss: infonce (the "
                                                  "paper's CE at scale 100), focal, dcl, dclw")
    tau: float | None = Field(None, gt=0, description="temperature of the loss (none: 0.01 "
                                                      "for infonce, 0.05 focal, 0.1 dcl)")
    hard_class_reweight: float = fields.weight(0.0, "up-weight samples of hard class pairs "
                                                    "(self-paced; 0: off)")
    preserve: Literal["none", "teacher"] = Field(
        "none", description="teacher: distil the frozen original's clean zero-shot logits")
    w_preserve: float = fields.weight(1.0, "weight of the teacher term")


class FineTune(Defense):
    """A fine-tuning defense: subclasses set ``Options`` and ``make_step``."""

    Options = FineTuneOptions

    def apply(self, model, data, run):
        o = self.options
        n = len(data)
        if n < o.batch_size:
            raise MmsecError(f"{self.name}: {n} clean items, fewer than one batch of "
                             f"{o.batch_size} (--clean-items, -o batch_size)")
        student = copy.deepcopy(model)
        student.eval()  # pretrained batch-norm statistics stay; the weights train
        self.prepare(student, model, data, run)
        device = student.device

        def load(idx: torch.Tensor):
            x, y = load_images(data, idx)
            return idx, x.to(device), y.to(device)

        batches = IndexBatches(n, o.batch_size, seed=run.seed_for("batches"),
                               drop_last=True).map(load)
        optim = Optim(student.tower_parameters(o.tower), kind=o.optimizer, lr=o.lr,
                      momentum=0.9, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
                      schedule="cosine", grad_clip=o.grad_clip)
        step = self.make_step(student, model, data, run)
        with run.timer(f"{self.name}_train"):
            out = train(step, batches, optim, steps=o.steps, epochs=o.epochs,
                        min_steps=o.min_steps, run=run,
                        slot=self.name, state={"clip": student.clip}, precision=run.precision,
                        accumulate=o.accumulate, desc=self.name)
        run.metrics[f"{self.name}_steps"] = float(out.steps)
        last = out.history[-1] if out.history else {}
        for k, v in last.items():
            if k != "epoch":
                run.metrics[f"{self.name}_{k}"] = float(v)
        self.report(run, out)
        return student

    def prepare(self, student, teacher, data, run) -> None:
        """Anything computed once before training (class heads, ...)."""

    def make_step(self, student, teacher, data, run):  # pragma: no cover - abstract
        raise NotImplementedError

    def report(self, run, out) -> None:
        o = self.options
        keys = sorted({k for h in out.history for k in h if k != "epoch"})
        lines = [f"{out.steps} {o.optimizer} steps of {o.batch_size} clean images (lr {o.lr:g}, "
                 f"wd {o.weight_decay:g}, warm-up {o.warmup_steps}, cosine), tower "
                 f"`{o.tower}`." + self.describe_attack(), "",
                 "| epoch | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for h in out.history:
            lines.append(f"| {int(h['epoch']) + 1} | "
                         + " | ".join(f"{h[k]:.4g}" if k in h else "" for k in keys) + " |")
        run.add_section(f"{self.name} fine-tuning", "\n".join(lines))

    def describe_attack(self) -> str:
        o = self.options
        if not hasattr(o, "eps"):
            return ""
        return (f" Inner PGD: eps {o.eps * 255:g}/255, {o.attack_steps} steps of "
                f"{o.step_size * 255:g}/255" + (f", momentum {o.momentum:g}" if o.momentum
                                                 else "") + ".")

    def attack(self, model, loss_fn, x: torch.Tensor, run, step: int) -> torch.Tensor:
        """The inner maximisation of ``loss_fn(x_adv)`` around ``x`` with ``model`` in eval
        mode and fp32."""
        o = self.options
        gen = torch.Generator().manual_seed(run.seed_for(f"pgd.{step}"))
        mode = model.training
        model.eval()
        with model.using_precision("fp32"), torch.autocast(x.device.type, enabled=False):
            adv = pgd(loss_fn, x, eps=o.eps, step_size=o.step_size, steps=o.attack_steps,
                      momentum=o.momentum, generator=gen)
        model.train(mode)
        return adv


class Supervised(FineTune):
    """TeCoA-style training: zero-shot logits of adversarial images against class texts."""

    Options = SupervisedOptions

    def prepare(self, student, teacher, data, run) -> None:
        o = self.options
        if not data.classnames:
            raise MmsecError(f"{self.name} needs data with class names (zero-shot labels)")
        with torch.no_grad():
            self.teacher_head = teacher.zero_shot_head(data.classnames, [o.template])
        self.num_classes = len(data.classnames)
        self.hard = losses.HardPairWeights(self.num_classes, beta=o.hard_class_reweight)

    def adversarial(self, student, data, x, y, run, step: int):
        """The class head and the inner attack's images against it (the class loss of
        ``student`` maximised around ``x``)."""
        head = self.head(student, data)
        adv = self.attack(student, lambda xa: self.class_loss(
            student.encode_image(xa), head.detach(), y), x, run, step)
        return head, adv

    def with_preserve(self, out: dict, student, teacher, x) -> dict:
        """``out`` with the teacher-preservation term added to its loss (``preserve``)."""
        keep = self.preserve_term(student, teacher, x)
        if keep is not None:
            out["loss"] = out["loss"] + keep
            out["preserve"] = keep.detach()
        return out

    def head(self, student, data) -> torch.Tensor:
        """The class text embeddings: fixed when the text tower is frozen, else live."""
        if self.options.tower == "image":
            return self.teacher_head
        texts = [self.options.template.format(c) for c in data.classnames]
        return student.encode_text(texts)

    def class_loss(self, image_emb, head, labels, weights=None) -> torch.Tensor:
        """The image vs class-text loss (``loss``), per-sample weights for hard pairs."""
        o = self.options
        if o.loss == "infonce":
            per = losses.zero_shot_ce(image_emb, head, labels, scale=1 / (o.tau or 0.01),
                                      reduction="none")
            return (per * weights).mean() if weights is not None else per.mean()
        if weights is not None and not torch.allclose(weights, torch.ones_like(weights)):
            raise MmsecError(f"{self.name}: hard_class_reweight works with loss infonce")
        if o.loss == "focal":
            return losses.focal_info_nce(image_emb, head, tau=o.tau or 0.05,
                                         positive_index=labels)
        return losses.decoupled_contrastive_loss(image_emb, head, tau=o.tau or 0.1,
                                                 positive_index=labels,
                                                 weighted=o.loss == "dclw")

    @staticmethod
    def logits(image_emb, head) -> torch.Tensor:
        return 100.0 * F.normalize(image_emb, dim=-1) @ F.normalize(head, dim=-1).t()

    def preserve_term(self, student, teacher, x) -> torch.Tensor | None:
        o = self.options
        if o.preserve != "teacher":
            return None
        with torch.no_grad():
            t = self.logits(teacher.encode_image(x), self.teacher_head)
        s = self.logits(student.encode_image(x), self.teacher_head)
        return o.w_preserve * losses.distillation_kl(s, t)
