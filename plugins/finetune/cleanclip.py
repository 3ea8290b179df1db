"""CleanCLIP: backdoor mitigation by clean contrastive fine-tuning (Bansal et al.,
"CleanCLIP: Mitigating Data Poisoning Attacks in Multimodal Contrastive Learning", ICCV
2023; code nishadsinghi/CleanCLIP).

    L = CLIP-InfoNCE(f(x), g(t)) + w * (CE_in(f(x), f(aug x)) + CE_in(g(t), g(aug t))) / 2

on clean image-caption pairs, each in-modal term one direction with the learned logit
scale (CleanCLIP's code); AutoAugment for images and EDA-style edits for captions
(``augment.py``). The in-modal terms pull each image away from the spurious trigger-target
alignment a backdoor relies on. Defaults are the paper's: AdamW lr 1e-5, wd 0.1 (none on
norms, biases, logit_scale), batch 64, 10 epochs, 50 warm-up steps, both towers, w = 1.
``loss`` swaps the cross-modal InfoNCE for focal-InfoNCE or the decoupled losses.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mmsec import CaptionTable, MmsecError, distributed, fields, losses

from .augment import autoaugment, eda
from .common import FineTune, FineTuneOptions, LossName


class CleanCLIP(FineTune):
    """Clean contrastive fine-tuning with in-modal self-supervision."""

    name = "cleanclip"
    description = ("backdoor removal by clean multimodal + in-modal contrastive fine-tuning "
                   "(CleanCLIP, ICCV 2023)")

    class Options(FineTuneOptions):
        batch_size: int = fields.batch_size(64, minimum=2)
        weight_decay: float = fields.weight(0.1, "weight decay (never on gains, biases, "
                                                 "norms or the temperature)")
        warmup_steps: int = Field(50, ge=0, description="linear warm-up steps, then cosine")
        tower: Literal["image", "text", "all"] = Field("all", description="what is "
                                                                          "fine-tuned")
        w_inmodal: float = fields.weight(1.0, "weight of the in-modal terms")
        loss: LossName = Field("infonce", description="cross-modal loss: infonce (CLIP's), "
                                                      "focal, dcl, dclw")
        tau: float | None = Field(None, gt=0, description="temperature of focal/dcl (none: "
                                                          "0.05 focal, 0.1 dcl)")

    def prepare(self, student, teacher, data, run) -> None:
        self.captions = CaptionTable(data)
        if len(self.captions) == 0:
            raise MmsecError("cleanclip needs captions or class names (image-text pairs)")

    def make_step(self, student, teacher, data, run):
        o = self.options

        def draw(idx, x, step: int):
            gen = torch.Generator().manual_seed(run.seed_for(f"captions.{step}"))
            ids, _ = self.captions.sample(idx, torch.rand(len(idx), generator=gen))
            texts = [self.captions.texts[i] for i in ids.tolist()]
            aug_texts = [eda(t, gen) for t in texts]
            return ids, texts, aug_texts, autoaugment(x, run.seed_for(f"images.{step}"))

        def step(batch, ctx):
            idx, x, _ = batch
            # under torchrun: drawn for the global batch, as one process draws them
            ids, texts, aug_texts, x_aug = distributed.on_global_batch(
                lambda i, xs: draw(i, xs, ctx.step), idx, x)
            img = student.encode_image(torch.cat([x, x_aug]))
            txt = student.encode_text(texts + aug_texts)
            img, img_aug = img.split(len(x))
            txt, txt_aug = txt.split(len(texts))
            scale = student.clip.logit_scale.exp().clamp(max=100)
            if o.loss == "infonce":
                cross = losses.clip_loss(img, txt, scale, labels=ids.to(img.device))
            elif o.loss == "focal":
                cross = losses.focal_info_nce(img, txt, tau=o.tau or 0.05, symmetric=True)
            else:
                cross = losses.decoupled_contrastive_loss(img, txt, tau=o.tau or 0.1,
                                                          symmetric=True,
                                                          weighted=o.loss == "dclw")
            inmodal = 0.5 * (losses.in_modal_loss(img, img_aug, scale)
                             + losses.in_modal_loss(txt, txt_aug, scale))
            return {"loss": cross + o.w_inmodal * inmodal, "cross": cross.detach(),
                    "inmodal": inmodal.detach()}

        return step
