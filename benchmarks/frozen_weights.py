"""Gradient to the pixels with the victim's weights as mmsec leaves them, against frozen weights.

    python benchmarks/frozen_weights.py [--model ViT-B-32] [--batch 4] [--iters 2] [--repeat 3]

mmsec's attack loops never freeze the victim: ``mmsec.training.pgd`` takes
``torch.autograd.grad(loss, delta)`` and the training core ``backward(inputs=...)``, so no
weight gets a gradient while every weight keeps ``requires_grad=True``. Freezing them
(``requires_grad_(False)``, ``ClipModel.lock``) makes the CPU ViT take slower kernels. This
script times the attack's ceiling, ``encode_image`` forward + backward to the pixels, both
ways in one process (random weights, no download) and checks that ``pgd`` leaves the weights
as they were. Prints JSON: best-of-``repeat`` CPU seconds, img/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mmsec.model import load_model
from mmsec.training.pgd import pgd


def rate(model, x: torch.Tensor, iters: int, repeat: int) -> float:
    """Best images per CPU second of encode_image fwd + bwd to the pixels."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(iters):
            px = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(model.encode_image(px).square().sum(), px)
        best = min(best, time.process_time() - t0)
    return iters * x.shape[0] / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    model.eval()
    x = torch.rand(args.batch, 3, model.image_size, model.image_size)
    pgd(lambda adv: model.encode_image(adv).square().sum(), x[:1], eps=4 / 255,
        step_size=1 / 255, steps=1)
    untouched = all(p.requires_grad and p.grad is None for p in model.parameters())
    as_left = rate(model, x, args.iters, args.repeat)
    model.lock("all")
    frozen = rate(model, x, args.iters, args.repeat)
    model.unlock()
    print(json.dumps({
        "benchmark": "frozen_weights", "model": args.model, "batch": args.batch,
        "threads": torch.get_num_threads(), "pgd_leaves_weights_as_they_were": untouched,
        "img_per_cpu_s_as_mmsec_leaves_them": round(as_left, 3),
        "img_per_cpu_s_frozen": round(frozen, 3),
        "frozen_over_mmsec": round(frozen / as_left, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
