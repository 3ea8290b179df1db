"""``torch.compile`` of the image tower (``ClipModel.torch_compile``, ``--compile``) against
eager: forward + backward to the pixels, images per second, both measured in this process.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/compile.py [--device cpu|cuda]
        [--models zoo:shapes,ViT-B-32] [--batch 16] [--iters 2] [--repeat 3]

For each model (``zoo:NAME`` or an open_clip architecture with random weights, at its own
input size): the eager rate (:func:`_common.fwd_bwd_rate`, as every loop's ceiling), then the
same with the compiled tower. The compilation (the first forward + backward: dynamo, then
inductor, which builds C++ on the CPU and Triton kernels on CUDA) is timed apart in wall
seconds (``compile_s``) and left off the rate. ``max_abs_diff``: the largest difference
between the eager and the compiled embeddings of the batch. Figure: the compiled rate of
the last model; ceiling: its eager rate (ratio > 1: compiling pays). A compilation that
fails falls back to eager with one warning line (``fell_back`` true). ``--frozen true``
(default) measures both again with the tower's weights frozen (``frozen_*``).
"""

from __future__ import annotations

import time

import _common as C

SIZES = {
    "cpu": {"models": "zoo:shapes,ViT-B-32", "batch": 16, "iters": 2, "repeat": 3,
            "frozen": True},
    "cuda": {"models": "zoo:shapes,ViT-B-32,ViT-B-16", "batch": 256, "iters": 5, "repeat": 3,
             "frozen": True},
}


def _wall(device) -> float:
    C.now(device)  # (synchronises on CUDA)
    return time.perf_counter()


def measure(name: str, args, device) -> dict:
    import torch

    from mmsec import load_model

    model = load_model(name, device=str(device)).eval()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 3, model.image_size, model.image_size, generator=g).to(device)
    eager = C.fwd_bwd_rate(model, x, to="pixels", iters=args.iters, repeat=args.repeat)
    with torch.no_grad():
        ref = model.encode_image(x)
    model.torch_compile = True
    t0 = _wall(device)
    px = x.detach().requires_grad_(True)
    emb = model.encode_image(px)  # compiles the forward
    torch.autograd.grad(emb.square().sum(), px)  # and the backward
    compile_s = _wall(device) - t0
    fell_back = not model.torch_compile
    compiled = C.fwd_bwd_rate(model, x, to="pixels", iters=args.iters, repeat=args.repeat)
    diff = float((emb.detach() - ref).abs().max())
    row = {"model": name, "eager_img_s": round(eager, 3), "compiled_img_s": round(compiled, 3),
           "speedup": round(compiled / eager, 3), "compile_s": round(compile_s, 1),
           "max_abs_diff": diff, "fell_back": fell_back, "image_size": model.image_size}
    if args.frozen:
        # the same with the tower's weights frozen (requires_grad False): a compiled backward
        # computes the gradient of every input that requires one, the weights' too, even
        # when only the pixels' is asked for; eager autograd computes only what is asked
        params = model.tower_parameters("image")
        for p in params:
            p.requires_grad_(False)
        model.torch_compile, model._compiled_image = False, None
        row["frozen_eager_img_s"] = round(C.fwd_bwd_rate(
            model, x, to="pixels", iters=args.iters, repeat=args.repeat), 3)
        model.torch_compile = True
        row["frozen_compiled_img_s"] = round(C.fwd_bwd_rate(
            model, x, to="pixels", iters=args.iters, repeat=args.repeat), 3)
        row["frozen_speedup"] = round(row["frozen_compiled_img_s"] / row["frozen_eager_img_s"],
                                      3)
        for p in params:
            p.requires_grad_(True)
    return row


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    rows = C.per_model(args, measure, device)
    last = rows[-1]
    return C.emit("compile", args, last["model"], figure=last["compiled_img_s"],
                  ceiling=last["eager_img_s"], unit="img/s",
                  ceiling_kind="eager encode_image fwd+bwd to the pixels, same batch",
                  batch=args.batch, models=rows)


if __name__ == "__main__":
    main()
