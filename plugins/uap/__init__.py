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

from mmsec import Artifact, Attack, Options, TrainConfig, hookimpl, train_loop
from mmsec.errors import MmsecError
from mmsec.evaluate import load_batch

__version__ = "0.1.0"


class UAP(Attack):
    """A universal L-inf perturbation trained on the image tower alone."""

    name = "uap"
    description = "universal L-inf perturbation, SGD over the training images (UAP)"
    universal = True

    class Options(Options):
        eps: float = Field(16 / 255, gt=0, le=1, description="L-inf budget (pixels in [0, 1])")
        loss: Literal["embedding", "ce"] = Field(
            "embedding", description="embedding: push f(x+d) away from f(x) (no labels); ce: "
                                     "raise the zero-shot cross-entropy of the clean prediction")
        epochs: int = Field(10, ge=1, description="passes over the training images")
        batch_size: int = Field(64, ge=1, description="images per step")
        lr: float | None = Field(None, gt=0, description="Adam learning rate (default eps/10)")
        train_items: int | None = Field(1000, ge=1, description="training images: a fixed "
                                                                "random sample (none: all)")

    def fit(self, model, data, run) -> Artifact:
        o = self.options
        if len(data) == 0:
            raise MmsecError(f"{self.name}: the training data is empty")
        if o.loss == "ce" and not data.classnames:
            raise MmsecError(f"{self.name}: loss ce needs a dataset with class names")
        n = len(data) if o.train_items is None else min(len(data), o.train_items)
        idx = torch.randperm(len(data), generator=run.generator(offset=1))[:n].sort().values
        x, _ = load_batch(data, idx.tolist())
        device = model.device
        head = (model.zero_shot_head(data.classnames, data.templates).detach()
                if o.loss == "ce" else None)
        with torch.no_grad():
            clean = torch.cat([model.encode_image(b.to(device)) for b in x.split(256)])
            pred = (clean @ head.t()).argmax(1) if head is not None else None
        holder = _Delta(x.shape[-2:]).to(device)
        bs = min(o.batch_size, n)
        steps_per_epoch = -(-n // bs)
        requires = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)

        def batches(epoch: int):
            perm = torch.randperm(n, generator=run.generator(offset=100 + epoch))
            for b in range(steps_per_epoch):
                sel = perm[b * bs:(b + 1) * bs]
                yield x[sel].to(device), sel

        def step(batch, _gstep):
            xb, sel = batch
            emb = model.encode_image((xb + holder.delta).clamp(0, 1))
            if head is None:
                loss = (emb * clean[sel.to(clean.device)]).sum(-1).mean()
            else:  # float64: a confident softmax at CLIP's scale rounds to one-hot in fp32
                loss = -F.cross_entropy((emb @ head.t() / 0.07).double(),
                                        pred[sel.to(pred.device)])
            return {"loss": loss}

        def project(_epoch, _means):
            holder.project(o.eps)
            return {}

        cfg = TrainConfig(epochs=o.epochs, lr=o.lr or o.eps / 10, optimizer="adam",
                          schedule="constant")
        try:
            out = train_loop({"delta": holder}, batches, _projected(step, holder, o.eps), cfg,
                             run=run, desc="uap", steps_per_epoch=steps_per_epoch,
                             on_epoch_end=project)
        finally:
            for p, r in zip(model.parameters(), requires, strict=True):
                p.requires_grad_(r)
        holder.project(o.eps)
        delta = holder.delta.detach()[0].cpu()
        with torch.no_grad():
            adv = torch.cat([model.encode_image((b.to(device) + delta.to(device)).clamp(0, 1))
                             for b in x.split(256)])
        shift = float((adv * clean).sum(-1).mean())
        if run is not None and hasattr(run, "save_image"):
            run.save_image("uap-delta", (delta / (2 * o.eps) + 0.5).clamp(0, 1), scale=8,
                           report=True)
        art = Artifact(self.name, tensors={"delta": delta},
                       meta={**o.model_dump(), "train_items": n, "height": int(x.shape[-2]),
                             "width": int(x.shape[-1])})
        art.runtime["metrics"] = {"uap_train_cosine_to_clean": shift,
                                  "uap_steps": float(out["steps"])}
        return art

    def apply(self, artifact: Artifact, images: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:
        """Add the perturbation to ``images`` ``[B, 3, H, W]`` in [0, 1] (any size)."""
        delta = artifact.tensors["delta"].to(images.device, images.dtype)
        h, w = images.shape[-2:]
        if tuple(delta.shape[-2:]) != (h, w):
            eps = float(artifact.meta.get("eps", delta.abs().max()))
            delta = F.interpolate(delta[None], size=(h, w), mode="bilinear",
                                  align_corners=False)[0].clamp(-eps, eps)
        return (images + delta).clamp(0, 1)

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact:
        """A random +-eps sign pattern of the same shape."""
        delta = artifact.tensors["delta"]
        eps = float(artifact.meta.get("eps", delta.abs().max()))
        gen = torch.Generator().manual_seed(seed)
        noise = (torch.randint(0, 2, delta.shape, generator=gen).float() * 2 - 1) * eps
        return Artifact(self.name, tensors={"delta": noise},
                        meta={**artifact.meta, "control": "random sign noise"})


class _Delta(nn.Module):
    """The perturbation ``[1, 3, H, W]`` as a trainable (and checkpointed) parameter."""

    def __init__(self, size) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(1, 3, *size))

    def project(self, eps: float) -> None:
        with torch.no_grad():
            self.delta.clamp_(-eps, eps)


def _projected(step, holder: _Delta, eps: float):
    """``step`` that first projects ``delta`` back into the L-inf ball (after each update)."""
    def wrapped(batch, gstep):
        holder.project(eps)
        return step(batch, gstep)
    return wrapped


@hookimpl
def register_attacks(register):
    register(UAP)
