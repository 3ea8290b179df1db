"""BadNets: a small patch pasted on the image (Gu et al., "BadNets", 2017).

The patch is a grid of ``cells x cells`` random saturated colours (each channel 0 or 1),
scaled by nearest neighbour to ``patch_size`` of the image's shorter side, pasted at one
place for every image (``patch_location``: a corner, ``patch_margin`` from its two edges,
or the centre) or at a random place per image (``random``). Defaults: 6x6 px at 32 px (the
3x3 trigger of the paper's MNIST setting did nothing on our 32-px CLIPs: ASR ~1% with 1-5%
poison for 2 epochs), bottom-right, 1 px from the edges.

``fixed`` is the name older specs stored for ``bottom-right``; it still loads and applies
the same pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import Trigger, generator, resize

#: the places a patch can go; ``fixed`` (mmsec <= 0.2 specs) is ``bottom-right``
LOCATIONS = ("bottom-right", "bottom-left", "top-left", "top-right", "center", "random")
ALIASES = {"fixed": "bottom-right"}


def patch_origin(location: str, height: int, width: int, side: int,
                 margin: int) -> tuple[int, int]:
    """``(top, left)`` of a ``side``-px patch at ``location`` (not ``random``) in an image."""
    location = ALIASES.get(location, location)
    if location == "center":
        return (height - side) // 2, (width - side) // 2
    if location not in LOCATIONS or location == "random":
        raise ValueError(f"badnets: no fixed place called {location!r}")
    vertical, horizontal = location.split("-")
    top = margin if vertical == "top" else height - side - margin
    left = margin if horizontal == "left" else width - side - margin
    # a margin too large for the image puts the patch against the opposite edge, never out
    return min(max(0, top), height - side), min(max(0, left), width - side)


class BadNets(Trigger):
    kind = "badnets"
    option_keys = ("patch_size", "patch_location", "patch_margin", "patch_cells")

    @classmethod
    def draw(cls, params: Mapping[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        cells = int(params["patch_cells"])
        return {"pattern": torch.randint(0, 2, (3, cells, cells), generator=gen).float()}

    def side(self, height: int, width: int) -> int:
        """The patch side in pixels at this image size."""
        return max(1, min(height, width, round(self.params["patch_size"] * min(height, width))))

    def apply(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        p = self.side(h, w)
        patch = resize(self.tensors["pattern"], p, p).to(images.device, images.dtype)
        out = images.clone()
        location = self.params["patch_location"]
        if location != "random":
            margin = round(self.params["patch_margin"] * min(h, w))
            top, left = patch_origin(location, h, w, p, margin)
            out[:, :, top:top + p, left:left + p] = patch
            return out
        gen = gen or generator(self.params["seed"])
        tops = torch.randint(0, h - p + 1, (b,), generator=gen).tolist()
        lefts = torch.randint(0, w - p + 1, (b,), generator=gen).tolist()
        for i, (top, left) in enumerate(zip(tops, lefts, strict=True)):
            out[i, :, top:top + p, left:left + p] = patch
        return out
