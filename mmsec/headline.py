"""The headline of a run: the few numbers that answer "did it work".

Every command ends by printing it (the full metrics stay in ``results.json`` and the
report); ``report.md`` and the HTML report open with it. It is computed from a run's
``results.json`` alone, by the kind of run and the metric keys it holds:

=========================  ====================================================  ==============
run                        rows                                                  columns
=========================  ====================================================  ==============
attack, eval of artifact   zero-shot top-1, fooling rate (R@1 with captions)     clean, attacked, control
backdoor implant, trigger  CA (clean top-1), ASR                                 implanted, before implant, control
eval ``--robust ATTACK``   zero-shot top-1, fooling rate                         clean, robust
defend                     CA and ASR (trigger), attacked top-1 (artifact),      before, after
                           clean top-1
eval                       zero-shot top-1, kNN top-1, R@1                       clean
=========================  ====================================================  ==============

plus the run's notes (a training metric that stopped moving, unreliable figures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HEADLINE_METRICS", "Headline", "headline"]

#: the metrics comparison tables show first (``mmsec run``'s console table, the HTML table)
HEADLINE_METRICS = ("clean_top1", "adv_top1", "fooling_rate", "control_fooling_rate", "asr",
                    "control_asr", "robust_top1", "before_clean_top1", "after_clean_top1",
                    "before_asr", "after_asr", "target_identified")


@dataclass
class Headline:
    """``columns`` (value headers), ``rows`` of ``(label, values...)`` (a value may be None)
    and ``notes`` (one line each)."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> list[list[str]]:
        """Header and rows as cell texts (rates as percentages)."""
        out = [["", *self.columns]]
        out += [[label, *(_fmt(v) for v in values)] for label, *values in self.rows]
        return out

    def text(self) -> str:
        """The aligned plain-text table with the title above and the notes below."""
        cells = self.table()
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = [self.title]
        if self.rows:
            lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                      for row in cells]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": list(self.columns),
                "rows": [list(r) for r in self.rows], "notes": list(self.notes)}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if 0.0 <= value <= 1.0 else f"{value:.4g}"
    return str(value)


def _row(m: Mapping[str, Any], label: str, *keys: str | None) -> tuple[Any, ...] | None:
    """``(label, m[k] for k)``, or None when none of the keys is in ``m``."""
    values = tuple(m.get(k) if k else None for k in keys)
    return (label, *values) if any(v is not None for v in values) else None


def _rows(*rows: tuple[Any, ...] | None) -> list[tuple[Any, ...]]:
    return [r for r in rows if r is not None]


def _title(res: Mapping[str, Any]) -> str:
    what = " ".join(str(p) for p in (res.get("kind"), res.get("plugin")) if p)
    if res.get("robust"):
        what += f" --robust {res['robust']}"
    n = next((r.get("n_items") for r in res.get("rows") or []
              if r.get("condition") == "clean" and r.get("task") == "zero_shot"), None)
    items = f", {n} items" if n else ""
    status = "" if res.get("status") in (None, "completed") else f" [{res['status']}]"
    return f"{what} on {res.get('model')} / {res.get('dataset')}{items}{status}"


def _retrieval(m: Mapping[str, Any], pre: str, cols: Sequence[str]) -> list:
    return _rows(*(_row(m, f"{d} R@1", *(f"{c}{d}_r1" if c is not None else None
                                        for c in cols)) for d in ("i2t", "t2i")
                   if f"{pre}{d}_r1" in m))


def headline(results: Mapping[str, Any]) -> Headline:
    """The headline of one run from its ``results.json`` content."""
    m = results.get("metrics") or {}
    kind = results.get("kind")
    h = Headline(_title(results), ("value",))
    targeted = "asr" in m or "before_asr" in m
    if kind == "defend" and not any(k.startswith("after_") for k in m):
        # a data defense (a poisoned-pair scan): the model is measured once; its own
        # detection figures are the headline
        h.rows = _rows(_row(m, "clean top-1", "before_clean_top1"))
        score = (results.get("options") or {}).get("score")
        ranked = [k for k in m if k.endswith(("_auroc", "_recall@flag"))
                  and (score is None or f"_{score}_" in k)]
        h.rows += [(k.replace("_", " "), m[k]) for k in ranked[:4]]
    elif kind == "defend":
        h.columns = ("before", "after")
        if targeted:
            h.rows = _rows(_row(m, "CA (clean top-1)", "before_clean_top1", "after_clean_top1"),
                           _row(m, "ASR", "before_asr", "after_asr"))
        else:
            h.rows = _rows(_row(m, "clean top-1", "before_clean_top1", "after_clean_top1"),
                           _row(m, "attacked top-1", "before_adv_top1", "after_adv_top1"),
                           _row(m, "fooling rate", "before_fooling_rate",
                                "after_fooling_rate"))
    elif targeted:
        if "original_asr" in m:  # an implant: the same trigger on the model before it
            h.columns = ("implanted", "before implant", "random trigger")
            h.rows = _rows(_row(m, "CA (clean top-1)", "clean_top1", "original_clean_top1",
                                None),
                           _row(m, "ASR", "asr", "original_asr", "control_asr"))
        else:
            h.columns = ("real trigger", "random trigger")
            h.rows = _rows(_row(m, "CA (clean top-1)", "clean_top1", None),
                           _row(m, "ASR", "asr", "control_asr"))
    elif "robust_top1" in m:
        h.columns = ("clean", "robust")
        h.rows = _rows(_row(m, "zero-shot top-1", "clean_top1", "robust_top1"),
                       _row(m, "fooling rate", None, "robust_fooling_rate"))
        if "clean_top1" not in m:
            h.rows += _retrieval(m, "robust_", ("clean_", "robust_"))
    elif "adv_top1" in m or "adv_i2t_r1" in m:
        h.columns = ("clean", "attacked", "control")
        h.rows = _rows(_row(m, "zero-shot top-1", "clean_top1", "adv_top1", "control_top1"),
                       _row(m, "fooling rate", None, "fooling_rate", "control_fooling_rate"))
        if "clean_top1" not in m or any(k.startswith("adv_text_") for k in m):
            # retrieval is the headline of attacks on captions too (C-PGC)
            h.rows += _retrieval(m, "adv_", ("clean_", "adv_", "control_"))
    else:
        h.columns = ("clean",)
        h.rows = _rows(_row(m, "zero-shot top-1", "clean_top1"),
                       _row(m, "kNN top-1", "clean_knn_top1"))
        h.rows += _retrieval(m, "clean_", ("clean_",))
    h.notes += [str(n) for n in results.get("notes") or []]
    for task, why in (results.get("unreliable") or {}).items():
        h.notes.append(f"{task} figures unreliable: {why}")
    if results.get("error"):
        h.notes.append(f"error: {results['error']}")
    return h
