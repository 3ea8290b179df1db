"""Run the benchmark suite and print one markdown table of every loop's share of its ceiling.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/run_all.py [--device cpu|cuda]
        [--model M] [--only advclip,uap] [--out DIR] [--tiny]

Each benchmark runs in its own process (``SUITE`` below: script and arguments) with the
device's default sizes; its JSON goes to ``--out`` (default: a temporary folder) as
``NAME.json`` and into the table. ``--tiny`` runs the smoke-test sizes instead (seconds each,
figures meaningless). ``--model`` (cuda only) sets the open_clip model of every loop that
takes one (the zoo training always trains the zoo model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: (name, script, arguments) in the order of the table
SUITE: list[tuple[str, str, list[str]]] = [
    ("advclip", "advclip.py", []),
    ("cpgc", "cpgc_throughput.py", []),
    ("uap", "uap.py", []),
    ("backdoor_implant", "backdoor_implant.py", []),
    ("fare", "finetune.py", ["--method", "fare"]),
    ("tecoa", "finetune.py", ["--method", "tecoa"]),
    ("pgd_eval", "robust_eval.py", ["--attack", "pgd"]),
    ("apgd_eval", "robust_eval.py", ["--attack", "apgd"]),
    ("cache_encode", "cache_encode.py", []),
    ("eval_warm", "cache_speedup.py", []),
    ("zoo_train", "zoo_train.py", []),
    ("checkpoint", "checkpoint.py", []),
    ("main_job", "main_job.py", []),
]

#: the smoke-test sizes (tests/test_benchmarks.py uses the same table)
TINY: dict[str, list[str]] = {
    "advclip": ["--items", "32", "--pool", "64", "--batch", "8"],
    "cpgc": ["--steps", "2", "--batch", "2"],
    "uap": ["--items", "64", "--batch", "32"],
    "backdoor_implant": ["--items", "64", "--batch", "16"],
    "fare": ["--steps", "1", "--batch", "4", "--attack-steps", "1"],
    "tecoa": ["--steps", "1", "--batch", "4", "--attack-steps", "1"],
    "pgd_eval": ["--items", "16", "--batch", "8", "--steps", "2"],
    "apgd_eval": ["--items", "16", "--batch", "8", "--steps", "2"],
    "cache_encode": ["--items", "64", "--batch", "32", "--folder", "48", "--folder-px", "40",
                     "--workers", "0,1"],
    "eval_warm": ["--limit", "32", "--knn-bank", "32"],
    "zoo_train": ["--steps", "2", "--batch", "16", "--items", "64"],
    "checkpoint": ["--model", "zoo:shapes", "--steps", "1"],
    "main_job": ["--option", "epochs=1,train_items=16,val_items=0,batch_size=8",
                 "--limit", "32"],
}

_NO_MODEL = {"zoo_train"}


def table(rows: list[dict]) -> str:
    """The markdown table of benchmark results (``ratio`` as a percentage of the ceiling)."""
    lines = ["| loop | model | figure | ceiling (same process) | % of ceiling | bf16 ceiling "
             "(CUDA) | % of bf16 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["details"]
        bf16 = d.get("ceiling_bf16")
        b_ceil = "" if bf16 is None else f"{bf16:.4g}"
        b_pct = "" if bf16 is None else f"{100 * d['ratio_to_bf16']:.0f}%"
        lines.append(
            f"| {r['benchmark']} | {r['model']} | {r['figure']:.4g} {r['unit']} | "
            f"{r['ceiling']:.4g} ({r['ceiling_kind']}) | {100 * r['ratio']:.0f}% | "
            f"{b_ceil} | {b_pct} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--only", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="mmsec-bench-")
    os.makedirs(out, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    rows, failed = [], []
    for name, script, extra in SUITE:
        if only is not None and name not in only:
            continue
        cmd = [sys.executable, os.path.join(HERE, script), "--device", args.device, *extra]
        if args.tiny:
            cmd += TINY[name] + ["--repeat", "1"]
        elif args.repeat:
            cmd += ["--repeat", str(args.repeat)]
        if args.model and name not in _NO_MODEL:
            cmd += ["--model", args.model]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            failed.append(name)
            print(f"{name}: TIMED OUT after {args.timeout:g} s", file=sys.stderr, flush=True)
            continue
        wall = time.perf_counter() - t0
        text = proc.stdout
        start = text.rfind("\n{")
        if proc.returncode != 0 or text.lstrip()[:1] != "{" and start < 0:
            failed.append(name)
            print(f"{name}: FAILED ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(text[start + 1:] if start >= 0 else text)
        row["details"]["bench_wall_s"] = round(wall, 1)
        rows.append(row)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(row, f, indent=2)
        print(f"{name}: {100 * row['ratio']:.0f}% of its ceiling ({wall:.0f} s wall)",
              file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\nJSON: {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
