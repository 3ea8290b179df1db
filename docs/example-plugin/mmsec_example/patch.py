"""A universal adversarial patch in one corner of the image, optimised with Adam.

The attack learns one square patch, pasted at the same corner of every image,
that minimises the zero-shot probability of the true class over the training
data: ``min_P E_(x,y) softmax(logit_scale * cos(f(paste(x, P)), T))_y``, where
``T`` are the class-text embeddings of the data's class names. This is the
objective of universal-patch attacks on CLIP zero-shot classifiers (e.g. the
patch of AdvCLIP, Zhou et al., ACM MM 2023, without its GAN and topology
terms), kept short to show the plugin contract.

Shapes: the patch is ``[3, s, s]`` with ``s = round(sqrt(area * H * W))`` for
the training images ``[B, 3, H, W]``; pixels are in [0, 1] everywhere (the
patch is ``sigmoid`` of free parameters, so it never leaves the range).

A real plugin sets its option defaults to the paper's values; these are small
so that the example runs in seconds on a CPU with the embedded 32-px model.

The control is a uniform-noise patch of the same size at the same corner, so
``fooling_rate - control_fooling_rate`` measures what the optimisation bought
beyond hiding part of the image.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from mmsec import Artifact, Attack, Batches, Optim, Options, fields, load_images, train
from pydantic import Field
from torch import nn

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]
CHUNK = 10  # optimisation steps between two checkpoints (one train_loop "epoch")


def patch_side(area: float, height: int, width: int) -> int:
    """Side in pixels of a square patch covering ``area`` of a ``height x width`` image."""
    return max(1, min(height, width, round(math.sqrt(area * height * width))))


def paste(images: torch.Tensor, patch: torch.Tensor, corner: str, area: float) -> torch.Tensor:
    """``images`` ``[B, 3|1, H, W]`` with ``patch`` ``[3, s, s]`` pasted at ``corner``.

    The patch is resized when the images' size asks for another side (the patch
    covers ``area`` of any image). Differentiable in ``patch``; ``images`` is not
    modified.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    batch, _, height, width = images.shape
    side = patch_side(area, height, width)
    patch = patch.to(images.device, images.dtype)
    if patch.shape[-1] != side or patch.shape[-2] != side:
        patch = F.interpolate(patch[None], size=(side, side), mode="bilinear",
                              align_corners=False)[0]
    top = 0 if corner.startswith("top") else height - side
    left = 0 if corner.endswith("left") else width - side
    out = images.clone()
    out[:, :, top:top + side, left:left + side] = patch.expand(batch, -1, -1, -1)
    return out


class _Patch(nn.Module):
    """The trainable patch: pixels = sigmoid(logits), so always in [0, 1]."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.logit(init.clamp(1e-3, 1 - 1e-3)))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


class NoisePatch(Attack):
    """Universal corner patch that minimises the true class's zero-shot probability."""

    name = "example-noise-patch"
    description = "universal corner patch (Adam) lowering the true class's zero-shot probability"

    class Options(Options):
        area: float = Field(0.1, gt=0, le=0.5, description="patch area / image area")
        corner: Corner = Field("bottom-right", description="where the patch goes")
        steps: int = fields.steps(50, "Adam steps")
        batch_size: int = fields.batch_size(64)
        lr: float = fields.lr(0.1, "Adam learning rate (on the patch logits)")

    def fit(self, model, data, run) -> Artifact:
        """Optimise the patch on ``data`` (an ImageDataset, pixels in [0, 1]) against ``model``."""
        if not data.classnames:
            raise ValueError(f"{self.name} needs a dataset with class names (zero-shot labels)")
        if len(data) == 0:
            raise ValueError(f"{self.name}: the training data is empty")
        o = self.options
        device = model.device
        head = model.zero_shot_head(data.classnames, data.templates)
        height, width = data[0][0].shape[-2:]
        side = patch_side(o.area, height, width)
        init = torch.rand(3, side, side, generator=run.rng("init"))
        patch = _Patch(init).to(device)

        def batches(epoch: int) -> list[list[int]]:
            # One "epoch" is CHUNK steps; each draws from its own named random stream,
            # so a resumed run sees the same batches as an uninterrupted one.
            gen = run.rng(f"batches.{epoch}")
            return [torch.randint(len(data), (o.batch_size,), generator=gen).tolist()
                    for _ in range(CHUNK)]

        def step(indices: list[int], _ctx) -> dict[str, torch.Tensor]:
            x, y = load_images(data, indices)
            x, y = x.to(device), y.to(device)
            if (y < 0).any():  # unlabelled items: attack the model's own clean prediction
                with torch.no_grad():
                    y = torch.where(y < 0, model.logits(x, head).argmax(1), y)
            probs = model.logits(paste(x, patch(), o.corner, o.area), head).softmax(-1)
            true_prob = probs.gather(1, y[:, None]).squeeze(1)
            return {"loss": true_prob.mean(), "fooled": (probs.argmax(1) != y).float().mean()}

        # Only the patch learns: the loop back-propagates into the optimiser's parameters
        # alone, so the model needs no freezing, and it checkpoints the patch for --resume.
        with run.timer("patch_optimisation"):
            out = train(step, Batches(batches, CHUNK), Optim(patch, kind="adam", lr=o.lr),
                        steps=o.steps, run=run, slot="patch", desc=self.name)

        pixels = patch().detach().cpu()
        history = out.history
        first, last = history[0], history[-1]
        run.log.info("%s: true-class probability %.3f -> %.3f over %d steps", self.name,
                     first["loss"], last["loss"], out.steps)
        run.metrics["fit_true_prob_first"] = first["loss"]
        run.metrics["fit_true_prob_last"] = last["loss"]
        run.save_image("patch", pixels, scale=max(1, 128 // side), report=True)
        run.add_section("Patch optimisation", "\n".join([
            f"A {side}x{side} px patch at the {o.corner} corner ({o.area:.0%} of the image), "
            f"{out.steps} Adam steps of {o.batch_size} images.",
            "",
            "| chunk | mean true-class probability | fooled |",
            "|---|---|---|",
            *(f"| {h['epoch'] + 1} | {h['loss']:.4f} | {h['fooled']:.3f} |" for h in history),
        ]))
        # the options are recorded with the artifact; meta holds what fitting found out
        return self.artifact({"patch": pixels},
                             meta={"side": side, "image_size": [int(height), int(width)]})

    def apply(self, artifact: Artifact, images: torch.Tensor,
              labels: torch.Tensor | None = None, *, victim=None, run=None) -> torch.Tensor:
        """Paste the patch on ``images`` ``[B, 3, H, W]`` in [0, 1]; ``labels`` are not used.

        mmsec builds this instance from the artifact's own options, so ``self.options`` is
        what the patch was trained with.
        """
        return paste(images, artifact.tensors["patch"], self.options.corner, self.options.area)

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact:
        """A uniform-noise patch of the same size at the same place."""
        shape = artifact.tensors["patch"].shape
        noise = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        return artifact.variant({"patch": noise}, control="uniform noise patch")
