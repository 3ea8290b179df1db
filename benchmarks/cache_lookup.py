"""What the embedding cache's first lookup costs: 2,000 vectors out of a large cache.

    python benchmarks/cache_lookup.py [--entries 100000] [--dim 128] [--lookups 2000]
                                      [--shard-items 16384] [--dir DIR]

Fills a cache folder (a temporary one, or --dir, reused when it already holds --entries
items) the way ``EmbeddingCache.encode`` does (one shard per 16,384 new items), then, in a
fresh process, times one ``get`` of --lookups random keys: wall and CPU seconds and how much
the peak resident memory rose (over the process after importing torch). Prints JSON.
To measure another checkout: PYTHONPATH=/that/checkout python benchmarks/cache_lookup.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

FP, KIND = "bench", "image"

PROBE = r"""
import json, random, resource, sys, time
import numpy as np, torch
import mmsec
from mmsec.cache import EmbeddingCache
torch.from_numpy(np.ones((4, 4), np.float32)).sum()  # torch's lazy start-up is not the cache's

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0

root, entries, lookups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keys = [f"{i:064x}" for i in random.Random(0).sample(range(entries), lookups)]
before = rss_mb()
cache = EmbeddingCache(root)
t0, c0 = time.perf_counter(), time.process_time()
vectors, found = cache.get("bench", "image", keys)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t1 = time.perf_counter()
cache.get("bench", "image", keys)
again = time.perf_counter() - t1
print(json.dumps({"mmsec": mmsec.__file__, "found": sum(found), "first_lookup_s": round(wall, 3),
                  "first_lookup_cpu_s": round(cpu, 3), "second_lookup_s": round(again, 4),
                  "peak_rss_rise_mb": round(peak - before, 1),
                  "corrupt_shards": cache.stats.corrupt_shards}))
"""


def fill(root: str, entries: int, dim: int, shard_items: int) -> None:
    import numpy as np

    from mmsec.cache import EmbeddingCache

    cache = EmbeddingCache(root, max_shards=0)
    info = cache.info()
    if info["items"] >= entries:
        return
    rng = np.random.default_rng(0)
    for start in range(0, entries, shard_items):
        stop = min(entries, start + shard_items)
        keys = [f"{i:064x}" for i in range(start, stop)]
        cache.put(FP, KIND, keys, rng.standard_normal((stop - start, dim), dtype=np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--shard-items", type=int, default=16384)
    ap.add_argument("--dir", default=None, help="cache folder to fill and keep")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or os.path.join(tmp, "cache")
        fill(root, args.entries, args.dim, args.shard_items)
        out = subprocess.run([sys.executable, "-c", PROBE, root, str(args.entries),
                              str(args.lookups)], capture_output=True, text=True, check=True)
        row = {"entries": args.entries, "dim": args.dim, "lookups": args.lookups,
               **json.loads(out.stdout)}
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
