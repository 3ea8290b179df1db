"""TeCoA: supervised adversarial fine-tuning for zero-shot robustness (Mao et al.,
"Understanding Zero-Shot Adversarial Robustness for Large-Scale Models", ICLR 2023; code
cvlab-columbia/ZSRobust4FoundationModel).

    min_theta  CE(100 * cos(f_theta(x + d), T), y),  d = PGD on that loss

with class texts ``T`` from the prompt "This is a photo of a {}" (fixed when only the image
tower trains). Defaults are the original's: SGD momentum 0.9, 10 epochs, warm-up 1,000,
train eps 1/255 with 2 PGD steps of 1/255 (RobustVLM's re-implementation uses FARE's
settings; set them with -o). The original's learning rate is not stated in the paper (its
code defaults to 1e-7 and marks it as suspect); 1e-5 here, RobustVLM's. ``loss`` swaps the
cross-entropy for focal-InfoNCE or the decoupled losses, ``hard_class_reweight``
up-weights hard class pairs, ``preserve: teacher`` distils the original's clean logits.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .common import Supervised, SupervisedOptions


class TeCoA(Supervised):
    """TeCoA: zero-shot cross-entropy of adversarial images."""

    name = "tecoa"
    description = "supervised adversarial fine-tuning on zero-shot logits (TeCoA, ICLR 2023)"

    class Options(SupervisedOptions):
        optimizer: Literal["adamw", "sgd"] = Field("sgd", description="adamw or sgd "
                                                                      "(momentum 0.9)")
        weight_decay: float = Field(0.0, ge=0, description="weight decay")
        warmup_steps: int = Field(1000, ge=0, description="linear warm-up steps, then cosine")
        batch_size: int = Field(128, ge=2, description="images per step")

    def make_step(self, student, teacher, data, run):
        def step(batch, ctx):
            _, x, y = batch
            head, adv = self.adversarial(student, data, x, y, run, ctx.step)
            emb = student.encode_image(adv)
            with torch.no_grad():
                pred = self.logits(emb, head).argmax(1)
            self.hard.update(y, pred)
            weights = self.hard.weights(y, pred) if self.options.hard_class_reweight else None
            loss = self.class_loss(emb, head, y, weights)
            return self.with_preserve({"loss": loss, "adv_acc": (pred == y).float().mean()},
                                      student, teacher, x)

        return step
