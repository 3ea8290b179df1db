"""C-PGC's generators: one image perturbation and one word embedding, each conditioned by
cross-attention on the other modality, each independent of the batch size.

The official generator ends in a convolution over ``batch_size * 5`` channels, so its one
perturbation is tied to the batch size and the number of scales, and it crashes on a short
last batch. Here the condition is a *set* of tokens (one per image or caption of the batch)
that the generator's features attend to: attention averages over the set, so the output is
one perturbation (one word) whatever the set's size, and at the end of training the
condition can be the whole training set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Features ``[1, C, h, w]`` (or ``[1, C]``) attend to condition tokens ``[N, D]``;
    residual, with a normalised query and a zero-initialised output projection."""

    def __init__(self, channels: int, context_dim: int, heads: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(1, channels)
        self.q = nn.Linear(channels, channels, bias=False)
        self.k = nn.Linear(context_dim, channels, bias=False)
        self.v = nn.Linear(context_dim, channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        spatial = x.ndim == 4
        b, c = x.shape[:2]
        feats = self.norm(x if spatial else x[..., None]).flatten(2).transpose(1, 2)  # [B, L, C]
        q = self.q(feats)
        k, v = self.k(context), self.v(context)  # [N, C]
        h = self.heads
        q = q.view(b, -1, h, c // h).transpose(1, 2)  # [B, h, L, c/h]
        k = k.view(-1, h, c // h).transpose(0, 1)  # [h, N, c/h]
        v = v.view(-1, h, c // h).transpose(0, 1)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(c // h)).softmax(-1)  # [B, h, L, N]
        out = (attn @ v).transpose(1, 2).reshape(b, -1, c)
        out = self.out(out).transpose(1, 2)
        out = out.reshape(x.shape) if spatial else out[..., 0]
        return x + out


class ImageGenerator(nn.Module):
    """Fixed noise ``z`` -> one perturbation ``[3, size, size]`` in ``[-eps, eps]``.

    Transposed convolutions double the resolution from 4x4 to ``size`` (a power of two,
    at least 8); after each but the last stage the features attend to the condition (the
    batch's caption embeddings). ``eps * tanh`` bounds the output smoothly (the official
    generator is unbounded before its clamp and saturates).
    """

    def __init__(self, size: int, context_dim: int, z_dim: int = 100, width: int = 32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        stages = int(math.log2(size // 4))
        if size != 4 * 2 ** stages or stages < 1:
            raise ValueError(f"generator size must be 4 * 2**k >= 8, got {size}")
        self.size = size
        self.register_buffer("z", torch.randn(1, z_dim, 1, 1, generator=generator))
        chans = [min(width * 2 ** (stages - 1 - i), 512) for i in range(stages)]
        self.stem = nn.Sequential(nn.ConvTranspose2d(z_dim, chans[0], 4), nn.BatchNorm2d(chans[0]),
                                  nn.ReLU())
        self.blocks = nn.ModuleList()
        self.attend = nn.ModuleList()
        for i in range(stages):
            out = chans[i + 1] if i + 1 < stages else width // 2
            self.attend.append(CrossAttention(chans[i], context_dim))
            self.blocks.append(nn.Sequential(nn.ConvTranspose2d(chans[i], out, 4, 2, 1),
                                             nn.BatchNorm2d(out), nn.ReLU()))
        self.head = nn.Conv2d(width // 2, 3, 3, padding=1)
        for m in self.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, context: torch.Tensor, eps: float) -> torch.Tensor:
        x = self.stem(self.z)
        for attend, block in zip(self.attend, self.blocks, strict=True):
            x = block(attend(x, context))
        return eps * torch.tanh(self.head(x))[0]


class WordGenerator(nn.Module):
    """Fixed noise -> one word embedding ``[W]`` whose norm stays in the vocabulary's range;
    conditioned by cross-attention on image embeddings (the batch's, or the training set's)."""

    def __init__(self, width: int, context_dim: int, z_dim: int = 32, hidden: int = 128,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.register_buffer("z", torch.randn(1, z_dim, generator=generator))
        self.inp = nn.Linear(z_dim, hidden)
        self.attend = CrossAttention(hidden, context_dim)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, width))

    def forward(self, context: torch.Tensor, min_norm: float, max_norm: float) -> torch.Tensor:
        h = self.attend(self.inp(self.z), context)
        e = self.mlp(h)[0]
        norm = e.norm().clamp_min(1e-8)
        return e * norm.clamp(min_norm, max_norm) / norm


def resize_perturbation(delta: torch.Tensor, height: int, width: int, eps: float) -> torch.Tensor:
    """``[3, h, w]`` -> ``[3, height, width]`` (bilinear), kept in ``[-eps, eps]``."""
    if tuple(delta.shape[-2:]) == (height, width):
        return delta
    return F.interpolate(delta[None], size=(height, width), mode="bilinear",
                         align_corners=False)[0].clamp(-eps, eps)
