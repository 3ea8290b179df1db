"""Encoding a dataset into the embedding cache, as a share of the raw forward rate of the same
model and batch, both measured in this one process.

    python benchmarks/cache_encode.py [--device cpu|cuda] [--model M] [--items 4096]
        [--batch 256] [--repeat 2]

Calls ``mmsec.encode_images`` (what every command uses: load, forward, write the cache's
shards and index) against an empty cache folder each time. Figure: images per second;
ceiling: ``encode_image`` forward (no autograd) at the cache's batch size. A second call on
the same, now warm, cache is reported too (``warm_img_per_s``: reading instead of encoding).
"""

from __future__ import annotations

import os
import tempfile

import _common as C

SIZES = {
    "cpu": {"model": None, "items": 4096, "batch": 256, "image_size": None, "repeat": 2},
    "cuda": {"model": "ViT-B-32", "items": 4096, "batch": 256, "image_size": 224,
             "repeat": 2},
}


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    device = C.setup(args)
    from mmsec import EmbeddingCache, encode_images, load_images

    model = C.load_model(args, device)
    data = C.shapes("train", args.items, args.image_size)
    x = load_images(data, list(range(min(args.batch, len(data)))))[0].to(device)
    ceil = C.ceilings(model, x, forward=True, iters=1, repeat=args.repeat)
    cold, warm = [], []
    for _ in range(max(1, args.repeat)):
        with tempfile.TemporaryDirectory(prefix="mmsec-bench-cache-") as tmp:
            cache = EmbeddingCache(os.path.join(tmp, "cache"))
            t0 = C.now(device)
            encode_images(model, data, cache, batch_size=args.batch, progress=False)
            cold.append(C.now(device) - t0)
            t0 = C.now(device)
            encode_images(model, data, cache, batch_size=args.batch, progress=False)
            warm.append(C.now(device) - t0)
    rate = len(data) / min(cold)
    return C.emit("cache_encode", args, model.name, figure=rate, ceiling=ceil["fp32"],
                  unit="img/s", ceiling_kind="encode_image forward, no autograd, same batch",
                  ceilings_=ceil, items=len(data), batch=args.batch,
                  cold_s=[round(s, 4) for s in cold],
                  warm_img_per_s=round(len(data) / max(min(warm), 1e-9), 1))


if __name__ == "__main__":
    main()
