"""Zoo training (the embedded model's own contrastive training) as a share of the raw
forward+backward rate of both towers, both measured in this one process.

    python benchmarks/zoo_train.py [--device cpu|cuda] [--steps 40] [--batch 256]
        [--items 4096] [--repeat 2]

Runs ``mmsec.zoo.train.train_zoo`` for ``zoo:shapes`` (the shipped recipe, cut to
``--steps`` at ``--batch``) into a temporary folder, with only the training loop on the
clock (the per-epoch held-out score is kept apart). Figure: image-caption pairs per second;
ceiling: ``encode_image`` + ``encode_text`` forward and backward to the weights of both
towers of the same model at the same batch.
"""

from __future__ import annotations

import importlib
import tempfile

import _common as C

SIZES = {
    "cpu": {"steps": 40, "batch": 256, "items": 4096, "repeat": 2},
    "cuda": {"steps": 200, "batch": 256, "items": 20000, "repeat": 2},
}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    from mmsec import load_images

    zt = importlib.import_module("mmsec.zoo.train")
    model = C.load_model(type("A", (), {"model": "zoo:shapes"})(), device)
    data = C.shapes("train", args.batch, None)
    x = load_images(data, list(range(args.batch)))[0].to(device)
    tokens = model.tokenize([data.captions(i)[0] for i in range(args.batch)])
    ceil = C.ceilings(model, x, to="both", text=tokens, iters=1, repeat=args.repeat)

    def fit():
        with tempfile.TemporaryDirectory(prefix="mmsec-bench-zoo-") as tmp, \
                C.timed_train(zt, device, name="run_training") as t:
            zt.train_zoo("shapes", steps=args.steps, batch_size=args.batch,
                         train_items=args.items, test_items=256, out_dir=tmp,
                         device=str(device), seed=args.seed)
        return t

    best, runs = C.best_loop(fit, args.repeat)
    rate = best.total_steps * args.batch / best.seconds
    return C.emit("zoo_train", args, "zoo:shapes", figure=rate, ceiling=ceil["fp32"],
                  unit="pairs/s",
                  ceiling_kind="image + text towers fwd+bwd to the weights, same batch",
                  ceilings_=ceil, batch=args.batch, steps=best.total_steps,
                  loop_s_per_run=runs, epoch_end_s=round(sum(best.epoch_end_s), 3))


if __name__ == "__main__":
    main()
