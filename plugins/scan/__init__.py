"""Scan: find the poisoned image-caption pairs of a training set from its embeddings alone.

Huang et al., "Detecting Backdoor Samples in Contrastive Language Image Pretraining"
(ICLR 2025; github HanxunH/Detect-CLIP-Backdoor-Samples): in a CLIP trained on poisoned
pairs, the backdoor images' local neighbourhoods among the training images' embeddings
look unlike clean ones, and cheap local outlier scores over k nearest neighbours find
them: k-distance, SLOF, LID and DAO (``scores.py`` has the definitions; higher = more
suspicious for each, as in the paper). k = 16 is the official detection script's default.
Two more: ``density`` (k-distance the other way round: the poison of a heavily poisoned
set is its densest region) and, when the items have captions, ``misalignment`` (minus the
image-caption cosine similarity: the paper's CLIPScore baseline).

``mmsec defend -p scan -m MODEL -d DATA [--pretrained FILE]`` embeds the whole train split
with the (suspect) model through the embedding cache, scores every item against a
reference set (``reference``: every item, or a seeded sample for very large sets, as the
official code scores within a batch) through the shared vector index, and writes:

``artifacts/suspicious.csv``
    every item ranked by ``score`` (rank, index, image path or content key, captions, label,
    each score, and ``poisoned`` when the ground truth is known);
``artifacts/cleaned.csv``
    a captions file without the top ``flag_rate`` share: for a captions file, its own rows
    minus the flagged ones (other splits kept), each image linked into ``artifacts/cleaned/``
    (a captions file names images inside its folder); for other data, the kept training
    images as PNGs (``artifacts/cleaned/``) with their captions, split ``train``.

Defaults, measured on the backdoor plugin's default implants of both zoo models (10-20%
poisoned; README): the paper's neighbourhood scores assume the poison is rare. Here the
triggered images are the *densest* region on zoo:shapes (k-distance AUROC ~0, its reverse
``density`` ~1) and no neighbourhood score separates them on zoo:fashion, while
``misalignment`` had the highest mean AUROC (0.90 over ten implants), hence the default
``score``; ``flag_rate`` 0.4 caught all of that poison on all eight default implants (0.3:
94.5-100%). At 1% poison on zoo:fashion nothing here finds it (best: k-distance in the
paper's direction, AUROC 0.87; misalignment 0.54).

It returns the model unchanged (a ``mmsec.DataDefense``). Ground truth: a captions file
with a ``poisoned`` column (what ``mmsec attack -p backdoor -o export_poisoned DIR``
writes), or ``-o truth FILE`` (CSV/JSONL with ``image`` and ``poisoned``); then the run
reports, per score, ``scan_<score>_auroc`` and the recall of poisoned pairs among the top
1% and 5% (``scan_<score>_recall@1``, ``@5``) and at ``flag_rate``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from mmsec import (
    DataDefense,
    Options,
    UsageError,
    encode_images,
    encode_texts,
    hookimpl,
    write_atomic,
)

from .scores import auroc, misalignment, neighbourhoods, recall_at, score_all

__version__ = "0.1.0"
mmsec_api_version = 2

RECALL_RATES = (0.01, 0.05)


class Scan(DataDefense):
    """Rank the training items by a local outlier score of their image embeddings."""

    name = "scan"
    description = ("poisoned-pair detection by local outlier scores over image embeddings "
                   "(k-distance, LID, SLOF, DAO; Huang et al. 2025)")

    class Options(Options):
        k: int = Field(16, ge=1, description="nearest neighbours per item (official default 16)")
        score: Literal["k_distance", "lid", "slof", "dao", "density", "misalignment"] = Field(
            "misalignment", description="the score that ranks the items and picks what is "
                                        "flagged (all are computed and reported; the default "
                                        "had the highest mean AUROC on the implants, README)")
        flag_rate: float = Field(0.4, gt=0, lt=1,
                                 description="share of the items left out of cleaned.csv (0.4 "
                                             "caught all of the default implants' 10-20% "
                                             "poison; lower it when less poison is expected)")
        reference: int | None = Field(
            20000, ge=2, description="score against a seeded random sample of this many items "
                                     "(all of a smaller set: exact kNN); none: every item")
        batch_size: int = Field(256, ge=1, description="images per encoder call")
        truth: str | None = Field(
            None, description="ground truth FILE (CSV/JSONL: image, poisoned); default: the "
                              "captions file's own 'poisoned' column when it has one")

    def apply(self, model, data, run):
        opts = self.options
        n = len(data)
        if n == 0:
            raise UsageError("scan: the training data is empty")
        m = n if opts.reference is None else min(n, opts.reference)
        if opts.k >= m:
            raise UsageError(f"scan: k={opts.k} needs more than k items to compare with; the "
                             f"reference set has {m} (lower -o k)")
        started = time.perf_counter()
        emb = encode_images(model, data, run.cache, batch_size=opts.batch_size)
        run.durations["scan_embed"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        nb = neighbourhoods(emb, opts.k, reference=opts.reference, seed=run.seed_for("scan"),
                            device=run.device)
        scores = score_all(nb)
        scores.update(self._misalignment(model, data, emb, run))
        if opts.score not in scores:
            raise UsageError(f"scan: -o score {opts.score} needs captions; this data has none")
        run.durations["scan_score"] = round(time.perf_counter() - started, 3)
        order = torch.argsort(scores[opts.score], descending=True, stable=True)
        n_flag = min(n - 1, max(1, round(opts.flag_rate * n)))
        flagged = order[:n_flag]
        truth = self._truth(data, run)
        run.metrics.update({"scan_items": n, "scan_flagged": n_flag,
                            "scan_reference": int(len(nb.reference))})
        if truth is not None:
            self._measure(scores, truth, n_flag / n, run)
        self._write_ranking(data, scores, order, truth, run)
        cleaned = self._write_cleaned(data, flagged, run)
        run.set("cleaned_captions", str(cleaned))
        self._report(data, scores, order, truth, n_flag, cleaned, run)
        return model

    @staticmethod
    def _misalignment(model, data, emb, run) -> dict[str, torch.Tensor]:
        """``{"misalignment": [N]}`` when the items have captions, else ``{}``."""
        caps = [data.captions(i) for i in range(len(data))]
        if not any(caps):
            return {}
        texts = list(dict.fromkeys(c for cs in caps for c in cs))
        row = {t: j for j, t in enumerate(texts)}
        owner = torch.tensor([i for i, cs in enumerate(caps) for _ in cs], dtype=torch.long)
        which = torch.tensor([row[c] for cs in caps for c in cs], dtype=torch.long)
        temb = encode_texts(model, texts, run.cache)
        return {"misalignment": misalignment(emb, temb, owner, which, len(data))}

    # ------------------------------------------------------------------ ground truth
    def _truth(self, data, run) -> torch.Tensor | None:
        """Boolean ``[N]``: which items are poisoned, when a ground-truth file says so."""
        path = Path(self.options.truth) if self.options.truth else getattr(data, "path", None)
        files = getattr(data, "files", None)
        if self.options.truth and not Path(path).is_file():
            raise UsageError(f"scan: ground-truth file not found: {path}")
        if self.options.truth and files is None:
            raise UsageError("scan: -o truth matches items by image file; this data has none")
        if path is None or files is None:
            return None
        rows = _read_rows(Path(path))
        if not rows or "poisoned" not in rows[0]:
            if self.options.truth:
                raise UsageError(f"scan: {path} has no 'poisoned' column")
            return None
        base = Path(path).parent
        known = {str((base / str(r["image"]).strip()).resolve()):
                 str(r["poisoned"]).strip().lower() in ("1", "true", "yes") for r in rows}
        flags = [known.get(str(Path(f).resolve())) for f in files]
        missing = sum(v is None for v in flags)
        if missing:
            run.log.warning("scan: %d of %d items are not in the ground truth %s; no "
                            "detection figures", missing, len(flags), path)
            return None
        return torch.tensor(flags, dtype=torch.bool)

    def _measure(self, scores, truth, flag_share, run) -> None:
        if not truth.any() or truth.all():
            run.log.warning("scan: the ground truth marks %s items poisoned; no detection "
                            "figures", "all" if truth.all() else "no")
            return
        run.metrics["scan_poisoned"] = int(truth.sum())
        for name, s in scores.items():
            run.metrics[f"scan_{name}_auroc"] = round(auroc(s, truth), 4)
            for rate in RECALL_RATES:
                run.metrics[f"scan_{name}_recall@{round(rate * 100)}"] = round(
                    recall_at(s, truth, rate), 4)
            run.metrics[f"scan_{name}_recall@flag"] = round(recall_at(s, truth, flag_share), 4)

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def _where(data, i: int) -> str:
        files = getattr(data, "files", None)
        return str(files[i]) if files is not None else data.key(i)

    def _write_ranking(self, data, scores, order, truth, run) -> Path:
        labels = data.labels()
        names = list(data.classnames or [])
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        names_ = list(scores)
        w.writerow(["rank", "index", "path", "captions", "label", *names_,
                    *(["poisoned"] if truth is not None else [])])
        cols = {name: scores[name].tolist() for name in names_}
        for rank, i in enumerate(order.tolist(), 1):
            y = int(labels[i])
            w.writerow([rank, i, self._where(data, i), "|".join(data.captions(i)),
                        names[y] if 0 <= y < len(names) else y,
                        *(f"{cols[name][i]:.6g}" for name in names_),
                        *([int(truth[i])] if truth is not None else [])])
        return write_atomic(run.artifacts_dir / "suspicious.csv", buf.getvalue())

    def _write_cleaned(self, data, flagged, run) -> Path:
        """The captions file of the items not flagged (see the module docstring)."""
        drop = set(flagged.tolist())
        out = run.artifacts_dir / "cleaned.csv"
        source = getattr(data, "path", None)
        files = getattr(data, "files", None)
        if source is not None and files is not None:
            gone = {str(Path(files[i]).resolve()) for i in drop}
            rows = _read_rows(Path(source))
            base = Path(source).parent
            kept = []
            links = run.artifacts_dir / "cleaned"
            links.mkdir(parents=True, exist_ok=True)
            for n, r in enumerate(rows):
                img = (base / str(r["image"]).strip()).resolve()
                if str(img) in gone and str(r.get("split") or "train").strip() == "train":
                    continue
                # a captions file names images inside its own folder (mmsec refuses absolute
                # and ../ paths), so each kept image is linked (copied where links fail) there
                name = f"cleaned/{n:07d}{img.suffix}"
                _link_or_copy(img, run.artifacts_dir / name)
                kept.append({**r, "image": name})
            fields = list(dict.fromkeys(k for r in rows for k in r))
        else:
            from mmsec import load_images

            folder = run.artifacts_dir / "cleaned"
            folder.mkdir(parents=True, exist_ok=True)
            keep = [i for i in range(len(data)) if i not in drop]
            names = list(data.classnames or [])
            kept = []
            for s in range(0, len(keep), 256):
                idx = keep[s:s + 256]
                x, y = load_images(data, idx)
                for j, i in enumerate(idx):
                    name = f"cleaned/{i:07d}.png"
                    _save_png(x[j], run.artifacts_dir / name)
                    label = int(y[j])
                    kept.append({"image": name, "captions": "|".join(data.captions(i)),
                                 "label": names[label] if 0 <= label < len(names) else "",
                                 "split": "train"})
            fields = ["image", "captions", "label", "split"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(kept)
        return write_atomic(out, buf.getvalue())

    def _report(self, data, scores, order, truth, n_flag, cleaned, run) -> None:
        opts = self.options
        lines = [f"{len(order)} training items scored with k={opts.k} against "
                 f"{run.metrics['scan_reference']} reference items; ranked by `{opts.score}`; "
                 f"the top {n_flag} ({100 * opts.flag_rate:g}%) are left out of "
                 f"`{cleaned.name}`.", ""]
        if truth is not None and "scan_poisoned" in run.metrics:
            lines += [f"Ground truth: {run.metrics['scan_poisoned']} poisoned items.", "",
                      "| score | AUROC | recall@1% | recall@5% | recall@flagged |",
                      "|---|---|---|---|---|"]
            g = run.metrics
            for name in scores:
                lines.append(f"| {name} | {g[f'scan_{name}_auroc']:.3f} | "
                             f"{g[f'scan_{name}_recall@1']:.3f} | "
                             f"{g[f'scan_{name}_recall@5']:.3f} | "
                             f"{g[f'scan_{name}_recall@flag']:.3f} |")
            lines.append("")
        lines += ["Most suspicious items:", "", "| rank | item | captions | score |",
                  "|---|---|---|---|"]
        for rank, i in enumerate(order[:10].tolist(), 1):
            caps = "; ".join(data.captions(i))[:80].replace("|", "/")
            lines.append(f"| {rank} | {i} | {caps} | {float(scores[opts.score][i]):.4g} |")
        run.add_section("Poisoned-pair scan", "\n".join(lines) + "\n")


def _read_rows(path: Path) -> list[dict]:
    """Rows of a CSV, JSONL or JSON-list file as dicts (the captions-file formats)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return [{(k or "").strip(): v for k, v in row.items()}
                for row in csv.DictReader(io.StringIO(text))]
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _link_or_copy(target: Path, link: Path) -> None:
    """``link`` -> ``target`` as a symlink; a copy where links are not allowed."""
    import os
    import shutil

    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        os.symlink(target, link)
    except OSError:
        if target.is_file():
            shutil.copy2(target, link)


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path, format="PNG")


@hookimpl
def register_defenses(register):
    register(Scan)


__all__ = ["Scan"]
