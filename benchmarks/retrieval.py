"""Retrieval hits (mmsec.metrics.retrieval_hits): the top-k version against the old full-rank one.

    python benchmarks/retrieval.py [--items 4000] [--captions 5] [--dim 512] [--repeat 3]

Both run in one process on the same random embeddings (``items`` images with ``captions``
captions each, ``dim``-d); the old algorithm (about ten passes over each images x captions
block) is kept here as the reference. Prints JSON: best-of-``repeat`` wall and CPU seconds of
each, their ratios, the similarity matmuls alone (the ceiling) and each one's share of it,
and whether every hit agrees. Run it with ``OMP_NUM_THREADS=1`` for the
single-thread figures of the README.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mmsec import metrics


def _rank_of(scores, target_idx):
    target_scores = scores.gather(1, target_idx[:, None])
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    greater = (scores > target_scores).sum(dim=1)
    cols = torch.arange(scores.shape[1], device=scores.device)
    equal_before = ((scores == target_scores) & (cols[None, :] < target_idx[:, None])).sum(dim=1)
    rank = greater + equal_before
    return rank.masked_fill(target_scores.squeeze(1).isnan(), torch.iinfo(torch.long).max)


@torch.no_grad()
def old_retrieval_hits(image_emb, text_emb, t2i, ks=(1, 5, 10), chunk_size=1024):
    """mmsec.metrics.retrieval_hits before issue 16 (reference copy, checks left out)."""
    img, txt = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    n, m = img.shape[0], txt.shape[0]
    i2t_rank = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk_size):
        sims = img[start : start + chunk_size] @ txt.T
        rows = torch.arange(start, start + sims.shape[0])
        is_caption = t2i[None, :] == rows[:, None]
        masked = sims.nan_to_num(nan=float("-inf")).masked_fill(~is_caption, float("-inf"))
        best_sim = masked.max(dim=1, keepdim=True).values
        first_best = (is_caption & (masked == best_sim)).to(torch.uint8).argmax(dim=1)
        i2t_rank[start : start + sims.shape[0]] = _rank_of(sims, first_best)
    t2i_rank = torch.empty(m, dtype=torch.long)
    for start in range(0, m, chunk_size):
        sims = txt[start : start + chunk_size] @ img.T
        t2i_rank[start : start + sims.shape[0]] = _rank_of(sims, t2i[start : start + sims.shape[0]])
    return {**{f"i2t_r{k}": i2t_rank < k for k in ks}, **{f"t2i_r{k}": t2i_rank < k for k in ks}}


@torch.no_grad()
def matmul_ceiling(image_emb, text_emb, chunk_size=1024):
    """The similarity blocks alone (both directions), the floor of either algorithm."""
    img, txt = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    for a, b in ((img, txt), (txt, img)):
        for start in range(0, a.shape[0], chunk_size):
            a[start : start + chunk_size] @ b.T


def best_of(fn, repeat):
    """Best-of-``repeat`` (wall seconds, CPU seconds) of ``fn()`` and its result; CPU time is
    the steadier figure on a shared machine."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return (min(walls), min(cpus)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dup-every", type=int, default=7,
                    help="every n-th caption repeats the one before it (exact ties)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.items, args.dim, generator=g)
    t2i = torch.arange(args.items).repeat_interleave(args.captions)
    texts = images[t2i] + 6.0 * torch.randn(len(t2i), args.dim, generator=g)
    dup = texts[1 :: args.dup_every]
    dup[:] = texts[0 :: args.dup_every][: len(dup)]  # duplicated captions: exact ties
    old_s, old = best_of(lambda: old_retrieval_hits(images, texts, t2i), args.repeat)
    new_s, new = best_of(lambda: metrics.retrieval_hits(images, texts, t2i), args.repeat)
    mm_s, _ = best_of(lambda: matmul_ceiling(images, texts), args.repeat)
    print(json.dumps({
        "benchmark": "retrieval_hits", "items": args.items, "captions": len(t2i),
        "dim": args.dim, "threads": torch.get_num_threads(),
        "old_wall_s": round(old_s[0], 3), "new_wall_s": round(new_s[0], 3),
        "old_cpu_s": round(old_s[1], 3), "new_cpu_s": round(new_s[1], 3),
        "speedup_wall": round(old_s[0] / new_s[0], 2),
        "speedup_cpu": round(old_s[1] / new_s[1], 2),
        "matmul_cpu_s": round(mm_s[1], 3),
        "new_share_matmul": round(mm_s[1] / new_s[1], 2),
        "old_share_matmul": round(mm_s[1] / old_s[1], 2),
        "identical_hits": all(torch.equal(old[k], new[k]) for k in old),
        "recall": {k: round(float(v.float().mean()), 4) for k, v in new.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
