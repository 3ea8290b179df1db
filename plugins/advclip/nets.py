"""The patch generator G (fixed noise z -> one patch) and the discriminator D.

Both are DCGAN-style, as in the official code, with two of its defects fixed:

- G's output does not depend on the batch size. The official generator maps a
  batch of noise vectors to a batch of images and then mixes the batch
  dimension with a convolution whose input channels equal the batch size, so
  the last, shorter batch of an epoch crashes it. Here z is one fixed vector
  and G makes one patch.
- G's batch norm always normalises with the statistics of the current
  forward pass (``track_running_stats=False``): with one z, eval-mode running
  statistics would give a different patch from the one that was trained.

G produces the patch directly at its pixel size (``[3, s, s]``, in [0, 1]); the
official G paints a whole 224 px image of which only the masked square is
used. D sees whole images of any size (adaptive pooling) and returns a logit
per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


class PatchGenerator(nn.Module):
    """``G(z)``: fixed noise ``z`` ``[1, z_dim]`` -> patch ``[3, side, side]`` in [0, 1].

    A 4x4 transposed-convolution seed followed by x2 up-sampling stages until the
    map covers ``side``, a 3x3 convolution to RGB, tanh, and a resize to ``side``.
    ``z`` is a buffer (saved with the weights), drawn from ``generator``.
    """

    def __init__(self, side: int, z_dim: int = 100, width: int = 64,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.side = int(side)
        self.register_buffer("z", torch.randn(1, z_dim, 1, 1, generator=generator))
        ups = max(0, math.ceil(math.log2(max(side, 4) / 4)))
        chans = [max(width, (width * 4) >> i) for i in range(ups + 1)]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, chans[0], 4, 1, 0),
            nn.BatchNorm2d(chans[0], track_running_stats=False), nn.ReLU(True),
        ]
        for c_in, c_out in zip(chans, chans[1:], strict=False):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1),
                       nn.BatchNorm2d(c_out, track_running_stats=False), nn.ReLU(True)]
        layers += [nn.Conv2d(chans[-1], 3, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self) -> torch.Tensor:
        out = self.net(self.z)  # [1, 3, 4 * 2^ups, same]
        if out.shape[-1] != self.side:
            out = F.interpolate(out, size=(self.side, self.side), mode="bilinear",
                                align_corners=False, antialias=out.shape[-1] > self.side)
        return (out[0] + 1) / 2


class Discriminator(nn.Module):
    """``D(x)``: images ``[B, 3, H, W]`` in [0, 1] -> real/fake logits ``[B]``.

    Strided 4x4 convolutions (LeakyReLU 0.2, batch norm after the first) down to
    about 4x4, then global average pooling and a linear layer. The number of
    stages follows the image size (at most 4), so any size works.
    """

    def __init__(self, height: int, width: int, width_base: int = 32) -> None:
        super().__init__()
        stages = max(1, min(4, int(math.log2(max(1, min(height, width)))) - 2))
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(stages):
            c_out = width_base * 2 ** i
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1))
            if i:
                layers.append(nn.BatchNorm2d(c_out, track_running_stats=False))
            layers.append(nn.LeakyReLU(0.2, True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x * 2 - 1)
        return self.head(h.mean(dim=(2, 3))).squeeze(1)

    @torch.no_grad()
    def clip_weights(self, bound: float) -> None:
        """Clamp every parameter to ``[-bound, bound]`` (the official D update does)."""
        for p in self.parameters():
            p.clamp_(-bound, bound)
