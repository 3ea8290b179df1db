"""FARE: unsupervised adversarial fine-tuning of the image tower (Schlarmann et al., "Robust
CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings for Robust Large
Vision-Language Models", ICML 2024; code chs20/RobustVLM).

    min_theta  mean_b  max_{||d|| <= eps}  sum_dims (f_theta(x + d) - f_theta0(x))^2

on *unnormalised* image embeddings, ``f_theta0`` the frozen original: the robust encoder
keeps the original's embeddings, so every downstream use of them (zero-shot, retrieval,
captioning models built on it) is kept, without labels. The inner PGD maximises the same
loss: random uniform start, sign steps with momentum 0.9, 10 steps of 1/255, last iterate.
Defaults: RobustVLM's README schedule (20,000 steps, batch 128, warm-up 1,400, cosine,
AdamW lr 1e-5, wd 1e-4) at eps 2/255 (FARE^2; 4/255 is FARE^4). Only the image tower
trains.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mmsec import fields, losses

from .common import AdversarialOptions, FineTune


class FARE(FineTune):
    """FARE: keep the original's embeddings under attack."""

    name = "fare"
    description = ("unsupervised adversarial fine-tuning: embeddings of attacked images stay "
                   "those of the original model (FARE, ICML 2024)")

    class Options(AdversarialOptions):
        steps: int | None = Field(20000, ge=1, description="optimiser steps (none: epochs)")
        warmup_steps: int = Field(1400, ge=0, description="linear warm-up steps, then cosine")
        eps: float = fields.eps(2 / 255, "training L-inf budget (pixels in [0, 1])")
        attack_steps: int = fields.steps(10, "PGD steps of the inner maximisation")
        momentum: float | None = Field(0.9, ge=0, lt=1, description="PGD momentum")

    def make_step(self, student, teacher, data, run):
        def step(batch, ctx):
            _, x, _ = batch
            with torch.no_grad():
                target = teacher.encode_image(x, normalize=False)
            adv = self.attack(student, lambda xa: losses.fare_loss(
                student.encode_image(xa, normalize=False), target), x, run, ctx.step)
            loss = losses.fare_loss(student.encode_image(adv, normalize=False), target)
            with torch.no_grad():
                clean = losses.fare_loss(student.encode_image(x, normalize=False), target)
            return {"loss": loss, "clean_loss": clean}

        return step
