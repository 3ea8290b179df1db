"""UAP: one universal L-inf perturbation for all images (stochastic-gradient UAP).

Moosavi-Dezfooli et al., "Universal adversarial perturbations" (CVPR 2017) introduced
image-agnostic perturbations; like the later SGD variants (Shafahi et al., AAAI 2020) this
plugin optimises a single ``delta`` of L-inf norm at most ``eps`` with mini-batch gradients
over the training images instead of DeepFool iterations. For a CLIP image encoder with no
labels needed, the default objective pushes every image's embedding away from its clean
embedding (minimise the mean cosine ``cos(f(x + delta), f(x))``); ``loss: ce`` maximises
the zero-shot cross-entropy against the clean prediction instead.

It is the full-image counterpart of the ``advclip`` patch, and InverTune's simulator for
full-image backdoor triggers (Blended, SIG, WaNet), which a corner patch does not imitate.
``delta`` is stored at the training resolution and resized (bilinear) to other image sizes,
so it keeps its relative layout. The control is a random +-eps sign pattern: same budget,
no gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmsec import (
    Artifact,
    Attack,
    IndexBatches,
    MmsecError,
    Optim,
    Options,
    fields,
    hookimpl,
    load_images,
    train,
)

__version__ = "0.2.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for


class UAP(Attack):
    """A universal L-inf perturbation trained on the image tower alone."""
    changes_model = False

    name = "uap"
    description = "universal L-inf perturbation, SGD over the training images (UAP)"

    class Options(Options):
        eps: float = fields.eps(16 / 255)
        loss: Literal["embedding", "ce"] = Field(
            "embedding", description="embedding: push f(x+d) away from f(x) (no labels); ce: "
                                     "raise the zero-shot cross-entropy of the clean prediction")
        epochs: int = fields.epochs(10)
        steps: int | None = fields.total_steps()
        min_steps: int = fields.min_steps(0)
        batch_size: int = fields.batch_size(64)
        lr: float | None = fields.lr(None, "Adam learning rate (default eps/10)")
        train_items: int | None = fields.train_items(1000)

    def fit(self, model, data, run) -> Artifact:
        o = self.options
        if len(data) == 0:
            raise MmsecError(f"{self.name}: the training data is empty")
        if o.loss == "ce" and not data.classnames:
            raise MmsecError(f"{self.name}: loss ce needs a dataset with class names")
        n = len(data) if o.train_items is None else min(len(data), o.train_items)
        idx = torch.randperm(len(data), generator=run.rng("train_items"))[:n].sort().values
        x, _ = load_images(data, idx)
        device = model.device
        head = (model.zero_shot_head(data.classnames, data.templates).detach()
                if o.loss == "ce" else None)
        with torch.no_grad():
            clean = torch.cat([model.encode_image(b.to(device)) for b in x.split(256)])
            pred = (clean @ head.t()).argmax(1) if head is not None else None
        holder = _Delta(x.shape[-2:]).to(device)
        batches = IndexBatches(n, min(o.batch_size, n), seed=run.seed_for("batches"))

        def step(sel, _ctx):
            holder.project(o.eps)  # back into the L-inf ball after each update
            emb = model.encode_image((x[sel].to(device) + holder.delta).clamp(0, 1))
            if head is None:
                loss = (emb * clean[sel.to(clean.device)]).sum(-1).mean()
            else:  # float64: a confident softmax at CLIP's scale rounds to one-hot in fp32
                loss = -F.cross_entropy((emb @ head.t() / 0.07).double(),
                                        pred[sel.to(pred.device)])
            return {"loss": loss}

        out = train(step, batches, Optim(holder, kind="adam", lr=o.lr or o.eps / 10,
                                         schedule="constant"),
                    epochs=o.epochs, steps=o.steps, min_steps=o.min_steps, run=run,
                    slot="uap", desc="uap",
                    on_epoch_end=lambda *_: holder.project(o.eps))
        holder.project(o.eps)
        delta = holder.delta.detach()[0].cpu()
        with torch.no_grad():
            adv = torch.cat([model.encode_image((b.to(device) + delta.to(device)).clamp(0, 1))
                             for b in x.split(256)])
        run.metrics["uap_train_cosine_to_clean"] = float((adv * clean).sum(-1).mean())
        run.metrics["uap_steps"] = float(out.steps)
        run.save_image("uap-delta", (delta / (2 * o.eps) + 0.5).clamp(0, 1), scale=8,
                       report=True)
        return self.artifact({"delta": delta}, meta={"train_items": n,
                                                     "height": int(x.shape[-2]),
                                                     "width": int(x.shape[-1])})

    def apply(self, artifact: Artifact, images: torch.Tensor,
              labels: torch.Tensor | None = None, *, victim=None, run=None) -> torch.Tensor:
        """Add the perturbation to ``images`` ``[B, 3, H, W]`` in [0, 1] (any size)."""
        delta = artifact.tensors["delta"].to(images.device, images.dtype)
        h, w = images.shape[-2:]
        if tuple(delta.shape[-2:]) != (h, w):
            eps = self.options.eps
            delta = F.interpolate(delta[None], size=(h, w), mode="bilinear",
                                  align_corners=False)[0].clamp(-eps, eps)
        return (images + delta).clamp(0, 1)

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact:
        """A random +-eps sign pattern of the same shape."""
        delta = artifact.tensors["delta"]
        gen = torch.Generator().manual_seed(seed)
        noise = (torch.randint(0, 2, delta.shape, generator=gen).float() * 2 - 1) \
            * self.options.eps
        return artifact.variant({"delta": noise}, control="random sign noise")


class _Delta(nn.Module):
    """The perturbation ``[1, 3, H, W]`` as a trainable (and checkpointed) parameter."""

    def __init__(self, size) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(1, 3, *size))

    def project(self, eps: float) -> None:
        with torch.no_grad():
            self.delta.clamp_(-eps, eps)


@hookimpl
def register_attacks(register):
    register(UAP)
