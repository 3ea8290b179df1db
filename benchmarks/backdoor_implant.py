"""The backdoor implant (contrastive fine-tuning of both towers on a poisoned set) as a share
of the raw forward+backward rate of the same model and batch, both measured in this process.

    python benchmarks/backdoor_implant.py [--device cpu|cuda] [--model M] [--batch 64]
        [--items 2048] [--epochs 1] [--trigger badnets] [--repeat 2]

Runs ``Backdoor.fit`` (the plugin's real code: poisoning, decoys, the shared contrastive
step, ``mmsec.train``) with only the training loop on the clock (the per-epoch held-out
ASR check is kept apart). Figure: image-caption pairs per second (steps x batch); ceiling:
``encode_image`` + ``encode_text`` of a batch of images and one caption each, forward and
backward to the weights of both towers.
"""

from __future__ import annotations

import _common as C

SIZES = {
    "cpu": {"model": None, "batch": 64, "items": 2048, "epochs": 1, "trigger": "badnets",
            "image_size": None, "repeat": 2},
    "cuda": {"model": "ViT-B-32", "batch": 128, "items": 2048, "epochs": 1,
             "trigger": "badnets", "image_size": 224, "repeat": 2},
}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    import importlib

    from mmsec_plugins.backdoor import Backdoor

    module = importlib.import_module("mmsec_plugins.backdoor.implant")

    from mmsec import load_images

    model = C.load_model(args, device)
    data = C.shapes("train", args.items, args.image_size)
    x = load_images(data, list(range(args.batch)))[0].to(device)
    tokens = model.tokenize([data.captions(i)[0] for i in range(args.batch)])
    ceil = C.ceilings(model, x, to="both", text=tokens, repeat=args.repeat)

    def fit():
        with C.timed_train(module, device) as t, C.run_context(device, seed=args.seed) as run:
            Backdoor({"trigger": args.trigger, "batch_size": args.batch, "epochs": args.epochs,
                      "min_steps": 0, "early_stop": False, "train_items": args.items,
                      "eval_items": min(64, args.items // 4)}).fit(model, data, run)
        return t

    best, runs = C.best_loop(fit, args.repeat)
    rate = best.total_steps * args.batch / best.seconds
    return C.emit("backdoor_implant", args, model.name, figure=rate, ceiling=ceil["fp32"],
                  unit="pairs/s",
                  ceiling_kind="image + text towers fwd+bwd to the weights, same batch",
                  ceilings_=ceil, batch=args.batch, steps=best.total_steps,
                  loop_s_per_run=runs, epoch_end_s=round(sum(best.epoch_end_s), 3))


if __name__ == "__main__":
    main()
