"""UAP's training loop as a share of the victim's raw image forward+backward rate, both
measured in this one process.

    python benchmarks/uap.py [--device cpu|cuda] [--model M] [--batch 64] [--items 2048]
        [--epochs 1] [--repeat 2]

Runs ``UAP.fit`` (the plugin's real code) with only its training loop on the clock.
Figure: images per second through the loop (steps x batch); ceiling: ``encode_image``
forward + backward to the pixels at the same batch and image size.
"""

from __future__ import annotations

import _common as C

SIZES = {
    "cpu": {"model": None, "batch": 64, "items": 2048, "epochs": 1, "image_size": None,
            "repeat": 2},
    "cuda": {"model": "ViT-B-32", "batch": 128, "items": 2048, "epochs": 2,
             "image_size": 224, "repeat": 2},
}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    import mmsec_plugins.uap as module
    from mmsec_plugins.uap import UAP

    from mmsec import load_images

    model = C.load_model(args, device)
    data = C.shapes("train", args.items, args.image_size)
    x = load_images(data, list(range(args.batch)))[0].to(device)
    ceil = C.ceilings(model, x, to="pixels", repeat=args.repeat)

    def fit():
        with C.timed_train(module, device) as t, C.run_context(device, seed=args.seed) as run:
            UAP({"train_items": args.items, "batch_size": args.batch,
                 "epochs": args.epochs}).fit(model, data, run)
        return t

    best, runs = C.best_loop(fit, args.repeat)
    rate = best.total_steps * args.batch / best.seconds
    return C.emit("uap", args, model.name, figure=rate, ceiling=ceil["fp32"], unit="img/s",
                  ceiling_kind="encode_image fwd+bwd to the pixels, same batch",
                  ceilings_=ceil, batch=args.batch, steps=best.total_steps,
                  loop_s_per_run=runs)


if __name__ == "__main__":
    main()
