"""Patch geometry: size from an area fraction, placement in relative terms, pasting.

A patch is square, ``[3, s, s]`` with pixels in [0, 1]. Its size and place are
kept relative to the image so that one saved patch applies to any image size:

- side ``s = round(sqrt(area * H * W))`` (at least 1 px, at most the shorter
  side), so the patch covers the same share of every image. At 224 px and
  3 % that is 39 px (the official code floors to 38); at 32 px it is 6 px
  (3.5 % of the image: 5 px would be 2.4 %).
- a fixed place is a corner (or the centre) with a gap of ``margin`` times the
  image side between the patch and the borders (AdvCLIP: 14 px at 224, i.e.
  0.0625);
- ``random`` draws a place per image, uniformly over every position where the
  patch fits, which makes a trained patch location-robust.

``paste`` is differentiable in the patch (it is how the generator learns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

FIXED_POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
POSITIONS = (*FIXED_POSITIONS, "random")
OFFICIAL_MARGIN = 14 / 224

Box = tuple[int, int]  # (top, left) in pixels


def patch_side(area: float, height: int, width: int) -> int:
    """Side in pixels of a square patch covering ``area`` of a ``height x width`` image."""
    return max(1, min(height, width, round(math.sqrt(area * height * width))))


def fixed_box(position: str, height: int, width: int, side: int, margin: float) -> Box:
    """``(top, left)`` of a ``side`` px patch at ``position`` with a relative ``margin``."""
    if position not in FIXED_POSITIONS:
        raise ValueError(f"unknown patch position {position!r} (one of {', '.join(POSITIONS)})")
    if position == "center":
        return (height - side) // 2, (width - side) // 2
    gap_y, gap_x = round(margin * height), round(margin * width)
    top = gap_y if position.startswith("top") else height - gap_y - side
    left = gap_x if position.endswith("left") else width - gap_x - side
    return min(max(top, 0), height - side), min(max(left, 0), width - side)


def random_boxes(n: int, height: int, width: int, side: int,
                 generator: torch.Generator) -> list[Box]:
    """``n`` places drawn uniformly over every position where the patch fits."""
    tops = torch.randint(height - side + 1, (n,), generator=generator)
    lefts = torch.randint(width - side + 1, (n,), generator=generator)
    return list(zip(tops.tolist(), lefts.tolist(), strict=True))


def resize_patch(patch: torch.Tensor, side: int) -> torch.Tensor:
    """``patch`` ``[3, s, s]`` resampled to ``[3, side, side]`` (bilinear, antialiased down)."""
    if patch.shape[-1] == side and patch.shape[-2] == side:
        return patch
    out = F.interpolate(patch[None].float(), size=(side, side), mode="bilinear",
                        align_corners=False, antialias=side < patch.shape[-1])
    return out[0].clamp(0, 1)


def paste(images: torch.Tensor, patch: torch.Tensor, boxes: Box | Sequence[Box]) -> torch.Tensor:
    """``images`` ``[B, 3|1, H, W]`` with ``patch`` ``[3, s, s]`` pasted at ``boxes``.

    ``boxes`` is one ``(top, left)`` for every image or one per image. Returns a new
    tensor (``x' = M * p + (1 - M) * x``); differentiable in ``patch`` and ``images``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    batch = images.shape[0]
    side = patch.shape[-1]
    patch = patch.to(images.device, images.dtype)
    out = images.clone()
    if isinstance(boxes, tuple) and len(boxes) == 2 and isinstance(boxes[0], int):
        top, left = boxes
        out[:, :, top:top + side, left:left + side] = patch.expand(batch, -1, -1, -1)
        return out
    if len(boxes) != batch:
        raise ValueError(f"{len(boxes)} patch places for {batch} images")
    for i, (top, left) in enumerate(boxes):
        out[i, :, top:top + side, left:left + side] = patch
    return out


def placement_meta(area: float, position: str, margin: float, height: int, width: int) -> dict:
    """JSON-able description of where the patch goes, relative to the image size."""
    side = patch_side(area, height, width)
    meta = {"area": area, "position": position, "margin": margin,
            "side_px": side, "image_size": [height, width],
            "area_actual": side * side / (height * width)}
    if position != "random":
        top, left = fixed_box(position, height, width, side, margin)
        meta["box_relative"] = {"top": top / height, "left": left / width,
                                "height": side / height, "width": side / width}
    return meta
