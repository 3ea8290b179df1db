"""Does ``torch.channels_last`` pay for our image towers? Forward + backward to the pixels,
images per second, contiguous (NCHW) against channels-last, both measured in this process.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/channels_last.py [--device cpu|cuda]
        [--models zoo:shapes,zoo:fashion,ViT-B-32] [--batch 16] [--iters 2] [--repeat 3]

For each model (the zoo's ModifiedResNet-minis, all convolutions; an open_clip ViT, whose one
convolution is the patch embedding): the rate with the weights and the pixels as they load
(contiguous), then with ``model.to(memory_format=torch.channels_last)`` and channels-last
pixels. Figure: the channels-last rate of the last model; ceiling: its contiguous rate
(ratio > 1: channels-last pays). mmsec does not convert (see ``ClipModel.preprocess``)
because on the CPU it did not pay; this script is how to check again on other hardware.
"""

from __future__ import annotations

import _common as C

SIZES = {
    "cpu": {"models": "zoo:shapes,zoo:fashion,ViT-B-32", "batch": 16, "iters": 2, "repeat": 3},
    "cuda": {"models": "zoo:shapes,ViT-B-32,ViT-B-16", "batch": 256, "iters": 5, "repeat": 3},
}


def measure(name: str, args, device) -> dict:
    import torch

    from mmsec import load_model

    model = load_model(name, device=str(device)).eval()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 3, model.image_size, model.image_size, generator=g).to(device)
    plain = C.fwd_bwd_rate(model, x, to="pixels", iters=args.iters, repeat=args.repeat)
    with torch.no_grad():
        ref = model.encode_image(x)
    model.to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    last = C.fwd_bwd_rate(model, xcl, to="pixels", iters=args.iters, repeat=args.repeat)
    with torch.no_grad():
        diff = float((model.encode_image(xcl) - ref).abs().max())
    return {"model": name, "contiguous_img_s": round(plain, 3),
            "channels_last_img_s": round(last, 3), "speedup": round(last / plain, 3),
            "max_abs_diff": diff, "image_size": model.image_size}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    rows = C.per_model(args, measure, device)
    last = rows[-1]
    return C.emit("channels_last", args, last["model"], figure=last["channels_last_img_s"],
                  ceiling=last["contiguous_img_s"], unit="img/s",
                  ceiling_kind="contiguous (NCHW) encode_image fwd+bwd to the pixels",
                  batch=args.batch, models=rows)


if __name__ == "__main__":
    main()
