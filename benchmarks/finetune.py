"""An adversarial fine-tuning step (FARE or TeCoA) as a share of what the same model and batch
allow, both measured in this one process.

    python benchmarks/finetune.py --method fare|tecoa [--device cpu|cuda] [--model M]
        [--batch 32] [--steps 24] [--attack-steps 2] [--repeat 2]

Runs the defense's ``apply`` (the plugin's real code: a student copy, the inner PGD in fp32,
``mmsec.train`` at the run's precision, bf16 on CUDA) with only the training loop on the
clock. One step is ``attack_steps`` forward+backward passes to the pixels (inner PGD) and one
to the image tower's weights, so the ceiling per image is
``1 / (attack_steps / R_pixels + 1 / R_weights)`` with both rates measured here at the same
batch. What a step does beyond that (the frozen teacher's forward for FARE, the logged
clean loss, the optimiser) is what the ratio misses.
"""

from __future__ import annotations

import _common as C

SIZES = {
    "cpu": {"method": "fare", "model": None, "batch": 32, "steps": 24, "attack_steps": 2,
            "image_size": None, "repeat": 2},
    "cuda": {"method": "fare", "model": "ViT-B-32", "batch": 128, "steps": 10,
             "attack_steps": 2, "image_size": 224, "repeat": 2},
}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    import mmsec_plugins.finetune.common as module
    from mmsec_plugins.finetune import FARE, TeCoA

    from mmsec import load_images

    cls = {"fare": FARE, "tecoa": TeCoA}[args.method]
    model = C.load_model(args, device)
    data = C.shapes("train", args.batch * args.steps, args.image_size)
    x = load_images(data, list(range(args.batch)))[0].to(device)
    pix = C.ceilings(model, x, to="pixels", iters=1, repeat=args.repeat)
    wts = C.ceilings(model, x, to="weights", iters=1, repeat=args.repeat)
    a = args.attack_steps
    ceil = {k: 1 / (a / pix[k] + 1 / wts[k]) for k in pix}
    precision = "bf16" if device.type == "cuda" else "fp32"

    def fit():
        with C.timed_train(module, device) as t, \
                C.run_context(device, seed=args.seed, precision=precision, kind="defend") as run:
            cls({"steps": args.steps, "batch_size": args.batch, "attack_steps": a,
                 "warmup_steps": 0}).apply(model, data, run)
        return t

    best, runs = C.best_loop(fit, args.repeat)
    rate = best.total_steps * args.batch / best.seconds
    return C.emit(args.method, args, model.name, figure=rate, ceiling=ceil["fp32"],
                  unit="img/s",
                  ceiling_kind=f"{a} fwd+bwd to the pixels + 1 to the weights per image",
                  ceilings_=ceil, batch=args.batch, steps=best.total_steps,
                  attack_steps=a, precision=precision, loop_s_per_run=runs,
                  pixels_fwd_bwd=round(pix["fp32"], 2), weights_fwd_bwd=round(wts["fp32"], 2))


if __name__ == "__main__":
    main()
