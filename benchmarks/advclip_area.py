"""AdvCLIP patch strength against patch area, next to noise patches of the same size and place.

    python benchmarks/advclip_area.py [--model zoo:shapes] [--data procedural]
        [--areas 0.02,0.03,0.05] [--control-seeds 5] [--out DIR] [-o KEY VALUE ...]

For each area, runs ``mmsec attack --plugin advclip`` (the plugin's defaults
otherwise) and then measures the trained patch's control, a uniform-noise
patch of the same size and place, for several noise seeds: one noise draw
fools a 32 px model anywhere between ~15 % and ~30 % of the time, so a single
control is a noisy yardstick. Prints a markdown table and writes
``advclip_area.json`` to ``--out`` (default: a temporary folder).
The issue's bar: fooling rate >= 3x the control's and adv top-1 >= 40 points
below clean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("-d", "--data", default=None)
    ap.add_argument("--areas", default="0.02,0.03,0.05")
    ap.add_argument("--control-seeds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="evaluation items (default: all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("-o", "--option", nargs=2, action="append", default=[],
                    metavar=("KEY", "VALUE"), help="another advclip option")
    args = ap.parse_args()
    os.environ.setdefault("MMSEC_PROGRESS", "0")
    from mmsec_plugins.advclip import AdvCLIP

    from mmsec import Artifact, EmbeddingCache, Evaluation, api, load_dataset, load_model, subset

    out = args.out or tempfile.mkdtemp(prefix="advclip-area-")
    model = load_model(args.model, args.pretrained, device="auto")
    test = subset(load_dataset(args.data, split="test"), args.limit)
    cache = EmbeddingCache()
    rows = []
    for area in (float(a) for a in args.areas.split(",")):
        options = {**dict(args.option), "area": area}
        s = api.Settings(model=args.model, pretrained=args.pretrained, data=args.data,
                         limit=args.limit, out=os.path.join(out, f"area-{area:g}"), quiet=True)
        t0 = time.perf_counter()
        res = api.attack("advclip", s, options=options)
        wall = time.perf_counter() - t0
        m = res["metrics"]
        art = Artifact.load(res["attack_artifact"])
        atk = AdvCLIP(art.options)
        ev = Evaluation(model, test, cache)
        controls = []
        for seed in range(args.control_seeds):
            rows_ = ev.measure(ev.attacked(atk, atk.control(art, seed), condition="control"))
            controls.append({r.metric: r.value for r in rows_ if r.task == "zero_shot"})
        ctrl = statistics.mean(c["fooling_rate"] for c in controls)
        rows.append({
            "area": area, "area_actual": round(art.meta["area_actual"], 4),
            "side_px": art.meta["side_px"], "clean_top1": m["clean_top1"],
            "adv_top1": m["adv_top1"], "drop_points": 100 * (m["clean_top1"] - m["adv_top1"]),
            "fooling_rate": m["fooling_rate"], "control_fooling_rate": m["control_fooling_rate"],
            "control_fooling_mean": ctrl,
            "control_fooling_range": [min(c["fooling_rate"] for c in controls),
                                      max(c["fooling_rate"] for c in controls)],
            "ratio_vs_mean_control": m["fooling_rate"] / max(ctrl, 1e-9),
            "knn_fooling_rate": m.get("knn_fooling_rate"),
            "control_knn_fooling_rate": m.get("control_knn_fooling_rate"),
            "fit_s": res["durations"]["fit"], "wall_s": round(wall, 1), "run": res["run_dir"]})
        print(json.dumps(rows[-1]), flush=True)
    head = ("| area (actual) | px | clean | adv | drop (pts) | fooling | noise fooling "
            "(seed 0 / mean / range) | ratio | kNN fooling (noise) | fit s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lo, hi = r["control_fooling_range"]
        lines.append(
            f"| {r['area']:g} ({r['area_actual']:.1%}) | {r['side_px']} | {r['clean_top1']:.3f} "
            f"| {r['adv_top1']:.3f} | {r['drop_points']:.1f} | {r['fooling_rate']:.3f} "
            f"| {r['control_fooling_rate']:.3f} / {r['control_fooling_mean']:.3f} / "
            f"{lo:.3f}-{hi:.3f} | {r['ratio_vs_mean_control']:.2f}x "
            f"| {r['knn_fooling_rate'] or 0:.3f} ({r['control_knn_fooling_rate'] or 0:.3f}) "
            f"| {r['fit_s']:.0f} |")
    print("\n".join(lines))
    with open(os.path.join(out, "advclip_area.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(f"results: {os.path.join(out, 'advclip_area.json')}")


if __name__ == "__main__":
    main()
