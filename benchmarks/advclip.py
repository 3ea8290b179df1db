"""AdvCLIP's training loop (G and D updates against the frozen victim) as a share of the
victim's raw image forward+backward rate, both measured in this one process.

    python benchmarks/advclip.py [--device cpu|cuda] [--model M] [--batch 16] [--items 1024]
        [--pool 4000] [--epochs 1] [--repeat 2]

Runs ``AdvCLIP.fit`` (the plugin's real code; ``topology knn``, no held-out check) on
``--items`` training images drawn from a train split of ``--pool`` images; only the training
loop is on the clock (:func:`_common.timed_train`). Figure: images per second through the
loop (steps x batch); ceiling: ``encode_image`` forward + backward to the pixels at the same
batch and image size. The preparation (clean embeddings, neighbours, caption embeddings) is
reported apart (``prepare_s``, first run, cold cache).
"""

from __future__ import annotations

import _common as C

SIZES = {
    "cpu": {"model": None, "batch": 16, "items": 1024, "pool": 4000, "epochs": 1,
            "image_size": None, "repeat": 2},
    "cuda": {"model": "ViT-B-32", "batch": 64, "items": 1024, "pool": 2048, "epochs": 2,
             "image_size": 224, "repeat": 2},
}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    from mmsec_plugins.advclip import AdvCLIP
    from mmsec_plugins.advclip import attack as module

    from mmsec import load_images

    model = C.load_model(args, device)
    data = C.shapes("train", args.pool, args.image_size)
    x = load_images(data, list(range(args.batch)))[0].to(device)
    ceil = C.ceilings(model, x, to="pixels", repeat=args.repeat)
    prepare: list[float] = []

    def fit():
        with C.timed_train(module, device) as t, C.run_context(device, seed=args.seed) as run:
            t0 = C.now(device)
            AdvCLIP({"train_items": args.items, "batch_size": args.batch,
                     "epochs": args.epochs, "val_items": 0}).fit(model, data, run)
            prepare.append(C.now(device) - t0 - t.seconds)
        return t

    best, runs = C.best_loop(fit, args.repeat)
    rate = best.total_steps * args.batch / best.seconds
    return C.emit("advclip", args, model.name, figure=rate, ceiling=ceil["fp32"],
                  unit="img/s", ceiling_kind="encode_image fwd+bwd to the pixels, same batch",
                  ceilings_=ceil, batch=args.batch, steps=best.total_steps,
                  loop_s_per_run=runs, prepare_and_rest_s_first=round(prepare[0], 3),
                  prepare_and_rest_s_warm=round(min(prepare[1:] or prepare), 3),
                  train_items=args.items, pool=len(data))


if __name__ == "__main__":
    main()
