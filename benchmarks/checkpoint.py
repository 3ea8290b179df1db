"""A training checkpoint of an image tower and its AdamW state (InverTune's tuning stage, the
fine-tuning defenses) against writing the same tensors with safetensors directly.

    python benchmarks/checkpoint.py [--device cpu|cuda] [--model ViT-B-32] [--repeat 2]

Runs ``mmsec.train`` on the model's image tower (AdamW, as InverTune's tuning does; a
step whose loss touches every weight, so every weight has optimiser state) for two steps
with a checkpoint after each, and times each ``RunContext.save_checkpoint`` (serialise +
atomic write) with the rise of the process's peak RSS during it (``/proc/self/clear_refs``;
Linux). The reference is ``safetensors.torch.save_file`` of the same tensors in the same
process. Figure: checkpoint MB per second; ceiling: the reference's MB per second; the
peak memory of both is in ``details`` (``peak_mb`` and ``reference_peak_mb``), and the
whole cost as the loop pays it (its own copy of the weights included): ``--steps`` steps
with a checkpoint after each against as many without (``loop_seconds_per_checkpoint``,
``loop_peak_mb_with_checkpoints`` / ``loop_peak_mb_without``).
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import _common as C

SIZES = {
    "cpu": {"model": "ViT-B-32", "steps": 4, "repeat": 2},
    "cuda": {"model": "ViT-B-32", "steps": 4, "repeat": 2},
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _measured(fn, device) -> tuple[float, float]:
    """(seconds, peak RSS rise in MB) of ``fn()``."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _status("VmRSS")
    t0 = C.now(device)
    fn()
    return C.now(device) - t0, (_status("VmHWM") - rss0) / 2**20


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    import torch
    from safetensors.torch import save_file

    from mmsec import Optim, train

    model = C.load_model(args, device)
    visual = model.clip.visual
    ours, ref, sizes = [], [], []

    with tempfile.TemporaryDirectory(prefix="mmsec-bench-ckpt-") as tmp:
        for attempt in range(max(1, args.repeat)):
            with C.run_context(device, seed=args.seed) as run:
                real = run.save_checkpoint

                def save(state, meta, real=real, **kw):
                    out = []
                    sec, peak = _measured(lambda: out.append(real(state, meta, **kw)), device)
                    ours.append((sec, peak))
                    sizes.append(os.path.getsize(out[0]) / 2**20)
                    flat = {k: v.detach().cpu().contiguous() for k, v in state.items()}
                    path = os.path.join(tmp, "direct.safetensors")
                    ref.append(_measured(lambda: save_file(flat, path), device))
                    os.remove(path)
                    return out[0]

                run.save_checkpoint = save

                def step(_batch, _ctx):
                    return sum(p.sum() for p in visual.parameters()) * 0.0

                train(step, lambda _e: [None], Optim(visual, kind="adamw", lr=1e-5),
                      steps=2, run=run, slot="bench", checkpoint_every=1)
                del run.save_checkpoint
            torch.manual_seed(attempt)
        # the whole checkpoint as the loop takes it (its copy of the weights included):
        # the same loop with and without a checkpoint after every step
        whole, saves = {}, [0]
        for every in ("never", 1):
            with C.run_context(device, seed=args.seed) as run:
                def counted(*a, real=run.save_checkpoint, **k):
                    saves[0] += 1
                    return real(*a, **k)

                run.save_checkpoint = counted
                whole[every] = _measured(lambda run=run, every=every: train(
                    step, lambda _e: [None], Optim(visual, kind="adamw", lr=1e-5),
                    steps=args.steps,
                    run=run, slot="bench", checkpoint_every=every), device)
    # the mid-run checkpoints (the last one of each run also marks the stage done)
    mb = max(sizes)
    best = min(s for s, _ in ours)
    best_ref = min(s for s, _ in ref)
    return C.emit("checkpoint", args, model.name, figure=mb / best, ceiling=mb / best_ref,
                  unit="MB/s", ceiling_kind="safetensors save_file of the same tensors",
                  checkpoint_mb=round(mb, 1), seconds=round(best, 3),
                  reference_seconds=round(best_ref, 3),
                  peak_mb=round(max(p for _, p in ours), 1),
                  reference_peak_mb=round(max(p for _, p in ref), 1),
                  checkpoints=len(ours),
                  loop_seconds_per_checkpoint=round(
                      (whole[1][0] - whole["never"][0]) / max(1, saves[0]), 3),
                  loop_checkpoints=saves[0],
                  loop_peak_mb_with_checkpoints=round(whole[1][1], 1),
                  loop_peak_mb_without=round(whole["never"][1], 1))


if __name__ == "__main__":
    main()
