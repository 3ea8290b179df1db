"""CleanCLIP's augmentations: AutoAugment for images (torchvision's ImageNet policy, one
draw per image) and an EDA-style edit for captions (Wei & Zou, 2019): random swap, random
deletion, random insertion of a word of the same caption. EDA's synonym replacement needs
WordNet, which mmsec does not ship: it is left out."""

from __future__ import annotations

import torch


def autoaugment(images: torch.Tensor, seed: int) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> AutoAugmented copies (reproducible from ``seed``)."""
    from torchvision.transforms import v2

    policy = v2.AutoAugment()
    u8 = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([policy(img) for img in u8])
    return out.to(images.device, torch.float32) / 255


def eda(text: str, gen: torch.Generator, p_delete: float = 0.1) -> str:
    """One EDA-style edit of a caption (swap, delete or insert), never empty."""
    words = text.split()
    if len(words) < 2:
        return text
    op = int(torch.randint(3, (1,), generator=gen))
    if op == 0:  # random swap
        i, j = torch.randperm(len(words), generator=gen)[:2].tolist()
        words[i], words[j] = words[j], words[i]
    elif op == 1:  # random deletion
        keep = [w for w in words if float(torch.rand(1, generator=gen)) >= p_delete]
        words = keep or [words[int(torch.randint(len(words), (1,), generator=gen))]]
    else:  # random insertion of one of its own words
        w = words[int(torch.randint(len(words), (1,), generator=gen))]
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=gen)), w)
    return " ".join(words)
