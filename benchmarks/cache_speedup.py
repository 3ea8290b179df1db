"""A repeated `mmsec eval` on the same model and data: what the embedding cache saves.

    python benchmarks/cache_speedup.py [--device cpu|cuda] [--model M] [--limit 2000]
        [--knn-bank 2000] [--repeat 2]

Runs ``mmsec.api.eval`` (the command's real code: load, encode through the cache, every
probe, the run folder) against an empty cache folder, then again on the warm cache, in one
process. Figure: evaluated items per second of the warm run; reference: the same for the
cold run; ratio: the speed-up (higher is better). ``images_encoded`` of the warm run should
be 0.
"""

from __future__ import annotations

import os
import tempfile

import _common as C

SIZES = {
    "cpu": {"model": None, "limit": 2000, "knn_bank": 2000, "repeat": 2},
    "cuda": {"model": "ViT-B-32", "limit": 2000, "knn_bank": 2000, "repeat": 2},
}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    from mmsec import api

    cold, warm, rows = [], [], []
    saved = os.environ.get("MMSEC_CACHE_DIR")
    for _ in range(max(1, args.repeat)):
        with tempfile.TemporaryDirectory(prefix="mmsec-bench-eval-") as tmp:
            os.environ["MMSEC_CACHE_DIR"] = os.path.join(tmp, "cache")
            if saved and os.path.isdir(os.path.join(saved, "procedural")):
                # the rendered data only (a one-time cost), never the embeddings
                os.makedirs(os.environ["MMSEC_CACHE_DIR"])
                os.symlink(os.path.join(saved, "procedural"),
                           os.path.join(os.environ["MMSEC_CACHE_DIR"], "procedural"))
            for attempt, sink in (("cold", cold), ("warm", warm)):
                s = api.Settings(model=args.model, limit=args.limit, device=str(device),
                                 out=os.path.join(tmp, attempt), quiet=True)
                t0 = C.now(device)
                res = api.eval(s, knn_bank=args.knn_bank)
                sink.append(C.now(device) - t0)
                rows.append({"run": attempt, "images_encoded": res["images_encoded"],
                             "evaluate_wall_s": res["durations"]["evaluate"]})
    if saved is not None:
        os.environ["MMSEC_CACHE_DIR"] = saved
    items = args.limit
    return C.emit("eval_warm", args, str(args.model or "zoo:shapes"),
                  figure=items / min(warm), ceiling=items / min(cold), unit="items/s",
                  ceiling_kind="the same eval on a cold cache (ratio = speed-up)",
                  cold_s=[round(s, 3) for s in cold], warm_s=[round(s, 3) for s in warm],
                  runs=rows[-2:])


if __name__ == "__main__":
    main()
