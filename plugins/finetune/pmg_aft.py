"""PMG-AFT: pre-trained-model-guided adversarial fine-tuning (Wang et al., "Pre-trained
Model Guided Fine-Tuning for Zero-Shot Adversarial Robustness", CVPR 2024).

    CE(z_theta(x_adv), y) + w_orig * KL(p_theta0(x_adv) || p_theta(x_adv))
                          + w_clean * KL(p_theta(x) || p_theta(x_adv))

``z`` zero-shot logits (100 * cos against "This is a photo of a {}"), ``theta0`` the frozen
original, ``x_adv`` from PGD on the CE of the model being trained. The official code sums
the KL terms over the batch (``reduction='sum'``), so they weigh about batch-size times the
mean CE; here each term is a per-sample mean (``kl_reduction: batchmean``) with weights 1,
and ``kl_reduction: sum`` gives the official weighting. Defaults: SGD lr 5e-5 momentum 0.9,
10 epochs, train eps 1/255 with 2 steps.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mmsec import fields, losses

from .common import Supervised, SupervisedOptions


class PMGAFT(Supervised):
    """PMG-AFT: adversarial CE guided by the original model and the clean predictions."""

    name = "pmg-aft"
    description = ("adversarial fine-tuning guided by the pre-trained model "
                   "(PMG-AFT, CVPR 2024)")

    class Options(SupervisedOptions):
        optimizer: Literal["adamw", "sgd"] = Field("sgd", description="adamw or sgd "
                                                                      "(momentum 0.9)")
        lr: float = fields.lr(5e-5)
        weight_decay: float = Field(0.0, ge=0, description="weight decay")
        w_orig: float = fields.weight(1.0, "weight of KL(p_orig(x_adv) || p(x_adv))")
        w_clean: float = fields.weight(1.0, "weight of KL(p(x) || p(x_adv))")
        kl_reduction: Literal["batchmean", "sum"] = Field(
            "batchmean", description="batchmean: per-sample KL; sum: the official weighting")

    def make_step(self, student, teacher, data, run):
        o = self.options

        def step(batch, ctx):
            _, x, y = batch
            head, adv = self.adversarial(student, data, x, y, run, ctx.step)
            emb = student.encode_image(adv)
            adv_logits = self.logits(emb, head)
            clean_logits = self.logits(student.encode_image(x), head)
            with torch.no_grad():
                orig_logits = self.logits(teacher.encode_image(adv), self.teacher_head)
                pred = adv_logits.argmax(1)
            terms = losses.pmg_aft_loss(adv_logits, clean_logits, orig_logits, y,
                                        w_orig=o.w_orig, w_clean=o.w_clean,
                                        kl_reduction=o.kl_reduction)
            self.hard.update(y, pred)
            ce = terms["ce"]
            if o.loss != "infonce" or o.hard_class_reweight:
                weights = self.hard.weights(y, pred) if o.hard_class_reweight else None
                ce = self.class_loss(emb, head, y, weights)
            loss = ce + o.w_orig * terms["kl_orig"] + o.w_clean * terms["kl_clean"]
            out = {"loss": loss, "ce": ce.detach(), "kl_orig": terms["kl_orig"].detach(),
                   "kl_clean": terms["kl_clean"].detach(),
                   "adv_acc": (pred == y).float().mean()}
            return self.with_preserve(out, student, teacher, x)

        return step
