"""Per-image attack evaluation (PGD or APGD) as a share of the raw image forward+backward rate,
both measured in this one process.

    python benchmarks/robust_eval.py --attack pgd|apgd [--device cpu|cuda] [--model M]
        [--batch 64] [--items 256] [--steps 10] [--repeat 2]

Calls the plugin's ``apply`` over the test images in batches, as ``mmsec eval --robust``
does (the ``pgd`` plugin: ``mmsec.pgd``; ``apgd``: torchattacks' APGD-CE behind mmsec's
wrapper). Figure: attack iterations x images per second (each is one forward+backward to
the pixels); ceiling: ``encode_image`` forward + backward to the pixels at the same batch.
"""

from __future__ import annotations

import _common as C

SIZES = {
    "cpu": {"attack": "pgd", "model": None, "batch": 64, "items": 256, "steps": 10,
            "image_size": None, "repeat": 2},
    "cuda": {"attack": "pgd", "model": "ViT-B-32", "batch": 256, "items": 1024, "steps": 10,
             "image_size": 224, "repeat": 2},
}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    from mmsec import Victim, load_images
    from mmsec.testing import make_registry

    model = C.load_model(args, device)
    data = C.shapes("test", args.items, args.image_size)
    registry = make_registry()
    attack = registry.attacks[args.attack]({"steps": args.steps})
    victim = Victim(model, data.classnames, data.templates)
    _ = victim.head
    artifact = attack.artifact(meta={"seed": args.seed})
    batches = [load_images(data, list(range(s, min(s + args.batch, len(data)))))
               for s in range(0, len(data), args.batch)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    ceil = C.ceilings(model, batches[0][0], to="pixels", iters=1, repeat=args.repeat)

    def sweep() -> None:
        for x, y in batches:
            attack.apply(artifact, x, y, victim=victim)

    seconds = C.best_of(sweep, args.repeat - 1, device) if args.repeat > 1 else \
        _once(sweep, device)
    rate = args.steps * len(data) / seconds
    return C.emit(args.attack + "_eval", args, model.name, figure=rate, ceiling=ceil["fp32"],
                  unit="img-steps/s", ceiling_kind="encode_image fwd+bwd to the pixels, "
                  "same batch", ceilings_=ceil, batch=args.batch, items=len(data),
                  steps=args.steps, seconds=round(seconds, 4))


def _once(fn, device) -> float:
    t0 = C.now(device)
    fn()
    return C.now(device) - t0


if __name__ == "__main__":
    main()
