"""Encoding a dataset into the embedding cache, as a share of the raw forward rate of the same
model and batch, both measured in this one process.

    python benchmarks/cache_encode.py [--device cpu|cuda] [--model M] [--items 4096]
        [--batch 256] [--repeat 2]

Calls ``mmsec.encode_images`` (what every command uses: load, forward, write the cache's
shards and index) against an empty cache folder each time. Figure: images per second;
ceiling: ``encode_image`` forward (no autograd) at the cache's batch size. A second call on
the same, now warm, cache is reported too (``warm_img_per_s``: reading instead of encoding).

Folder mode (``--folder N``, N > 0; cpu default 4096, 0 turns it off) adds, under
``details.folder``, the path a big image folder takes (``mmsec cache encode``): N JPEG files
of ``--folder-px`` pixels are written to a temporary folder (``--folder-kind shapes``:
procedural shapes, square; ``photos``: scikit-image's astronaut, chelsea and coffee at
``--folder-px`` x 3/4 of it, one pixel changed in each copy) and

* ``scan_full_s``: building the dataset with every file read and decoded (no scan memo: what
  a resumed run paid before the memo), ``scan_memo_s``: building it again from the on-disk
  scan memo as a new process would (what a resumed run pays now), ``resume_noop_s``: that
  plus a ``fill_cache`` that finds everything cached;
* ``img_per_s``: ``fill_cache`` into an empty cache with 0, 1 and 2 loader workers (``--workers
  0,1,2``), best of ``--repeat``, against ``ceiling_img_per_s``: ``encode_image`` forward
  alone on a batch of the same size, in the same process; ``cpu_s``: CPU seconds of that
  (best) fill in this process (``main``: the model, and the decoding when there are no
  workers) and in its loader workers (``workers``), a machine-load-free view of where the
  time goes: with a free core per worker the wall time tends to the larger of the two.

These figures are **wall** seconds (``time.perf_counter``): the loader workers are other
processes, whose CPU time this process's clock does not see; on a shared machine they move
with its load.
"""

from __future__ import annotations

import os
import tempfile
import time

import _common as C

SIZES = {
    "cpu": {"model": None, "items": 4096, "batch": 256, "image_size": None, "repeat": 2,
            "folder": 4096, "folder_px": 64, "folder_kind": "shapes", "workers": "0,1,2"},
    "cuda": {"model": "ViT-B-32", "items": 4096, "batch": 256, "image_size": 224,
             "repeat": 2, "folder": 4096, "folder_px": 256, "folder_kind": "shapes",
             "workers": "0,1,2,4,8"},
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
    folder = _folder_mode(args, model, device) if args.folder > 0 else None
    return C.emit("cache_encode", args, model.name, figure=rate, ceiling=ceil["fp32"],
                  unit="img/s", ceiling_kind="encode_image forward, no autograd, same batch",
                  ceilings_=ceil, items=len(data), batch=args.batch,
                  cold_s=[round(s, 4) for s in cold],
                  warm_img_per_s=round(len(data) / max(min(warm), 1e-9), 1),
                  **({"folder": folder} if folder else {}))


def _write_folder(root, n: int, px: int, kind: str = "shapes") -> None:
    """``n`` JPEGs (quality 90), one folder per class, dated an hour back (the scan memo
    keeps only files that have settled): procedural shapes at ``px`` pixels, or photos."""
    import numpy as np
    from PIL import Image

    past = time.time() - 3600
    if kind == "photos":
        from skimage import data as photos

        base = [np.array(Image.fromarray(f()).convert("RGB").resize((px, px * 3 // 4)))
                for f in (photos.astronaut, photos.chelsea, photos.coffee)]
        images = ((i % 3, base[i % 3]) for i in range(n))
    elif kind == "shapes":
        data = C.shapes("train", n, px)
        images = ((int(y), (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                  for x, y in (data.load(i) for i in range(len(data))))
    else:
        raise SystemExit(f"--folder-kind {kind}: shapes or photos")
    for i, (label, arr) in enumerate(images):
        if kind == "photos":  # every file its own bytes (and hash)
            arr = arr.copy()
            arr[i % arr.shape[0], (i // arr.shape[0]) % arr.shape[1]] = (i % 251, 7, 9)
        folder = os.path.join(root, f"class{label}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:06d}.jpg")
        Image.fromarray(arr).save(path, quality=90)
        os.utime(path, (past, past))


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished children (the loader
    workers, joined when their DataLoader ends)."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _folder_mode(args, model, device) -> dict:
    import torch

    from mmsec import EmbeddingCache
    from mmsec.data import files, imagefolder
    from mmsec.evaluation.embed import fill_cache

    size = int(model.image_size)
    with tempfile.TemporaryDirectory(prefix="mmsec-bench-folder-") as tmp:
        root = os.path.join(tmp, "images")
        _write_folder(root, args.folder, args.folder_px, args.folder_kind)
        kb = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(root)
                 for f in names) / 1024 / max(1, args.folder)
        memo_env = os.environ.get("MMSEC_SCAN_MEMO")

        def build(memo: bool):
            files._SCAN_MEMO.clear()  # as a new process would start
            os.environ["MMSEC_SCAN_MEMO"] = "1" if memo else "0"
            t0 = time.perf_counter()
            ds = imagefolder(root, split="train", image_size=size)
            return ds, time.perf_counter() - t0

        try:
            full = min(build(False)[1] for _ in range(max(1, args.repeat)))
            ds, _ = build(True)  # writes the memo
            memo = min(build(True)[1] for _ in range(max(1, args.repeat)))
        finally:
            if memo_env is None:
                os.environ.pop("MMSEC_SCAN_MEMO", None)
            else:
                os.environ["MMSEC_SCAN_MEMO"] = memo_env
        x = torch.rand(min(args.batch, len(ds)), 3, size, size, device=device)
        with torch.no_grad():
            model.encode_image(x)
            best = float("inf")
            for _ in range(max(1, args.repeat)):
                t0 = C.now(device) if device.type == "cuda" else time.perf_counter()
                model.encode_image(x)
                t1 = C.now(device) if device.type == "cuda" else time.perf_counter()
                best = min(best, t1 - t0)
        ceiling = x.shape[0] / best
        rates, resume, cpu = {}, None, {}
        for workers in [int(w) for w in str(args.workers).split(",") if w.strip()]:
            times = []
            for _ in range(max(1, args.repeat)):
                cache = EmbeddingCache(os.path.join(tmp, f"cache-{workers}-{len(times)}"))
                main0, kids0 = _cpu()
                report = fill_cache(model, ds, cache, batch_size=args.batch, workers=workers,
                                    progress=False)
                main1, kids1 = _cpu()
                times.append(report.seconds)
                if report.seconds <= min(times):
                    cpu[str(workers)] = {"main": round(main1 - main0, 4),
                                         "workers": round(kids1 - kids0, 4)}
                if resume is None:  # a resumed run that finds everything cached
                    files._SCAN_MEMO.clear()
                    t0 = time.perf_counter()
                    again = imagefolder(root, split="train", image_size=size)
                    fill_cache(model, again, cache, batch_size=args.batch, workers=workers,
                               progress=False)
                    resume = time.perf_counter() - t0
            rates[str(workers)] = round(len(ds) / min(times), 1)
    return {"files": args.folder, "px": args.folder_px, "kind": args.folder_kind,
            "kb_per_file": round(kb, 1),
            "items": len(ds), "image_size": size,
            "batch": args.batch, "clock": "wall s", "scan_full_s": round(full, 4),
            "scan_memo_s": round(memo, 4), "resume_noop_s": round(resume, 4),
            "img_per_s": rates, "ceiling_img_per_s": round(ceiling, 1), "cpu_s": cpu,
            "ratio": {w: round(r / ceiling, 4) for w, r in rates.items()},
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}


if __name__ == "__main__":
    main()
