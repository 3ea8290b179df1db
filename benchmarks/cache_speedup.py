"""How much the embedding cache saves: `mmsec eval` twice on the same model and data.

    python benchmarks/cache_speedup.py [--model zoo:shapes] [--data procedural] [--limit N]

Runs both evaluations in one process against a fresh, empty cache folder and
reports wall times of the evaluate phase, images encoded, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--knn-bank", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MMSEC_CACHE_DIR"] = os.path.join(tmp, "cache")
        os.environ.setdefault("MMSEC_PROGRESS", "0")
        from mmsec import api

        rows = []
        for attempt in ("cold", "warm"):
            s = api.Settings(model=args.model, pretrained=args.pretrained, data=args.data,
                             limit=args.limit, out=os.path.join(tmp, attempt), quiet=True)
            t0 = time.perf_counter()
            res = api.eval(s, knn_bank=args.knn_bank)
            rows.append({"run": attempt, "wall_s": round(time.perf_counter() - t0, 3),
                         "evaluate_s": res["durations"]["evaluate"],
                         "images_encoded": res["images_encoded"],
                         "clean_top1": res["metrics"].get("clean_top1")})
        speedup = rows[0]["evaluate_s"] / max(rows[1]["evaluate_s"], 1e-9)
        print(json.dumps({"rows": rows, "evaluate_speedup": round(speedup, 2)}, indent=2))


if __name__ == "__main__":
    main()
