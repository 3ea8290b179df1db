"""Figures of the reports, drawn with matplotlib (``pip install 'mmsec[report]'``).

Each function takes plain numbers and returns PNG bytes; nothing here reads run folders
except :func:`write_curves`. Figures are drawn on a bare ``matplotlib.figure.Figure``
(the Agg canvas), so no GUI back-end and no global pyplot state are involved.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["accuracy_vs_eps", "asr_before_after", "available", "curves", "matrix",
           "robust_vs_clean", "write_curves"]

FIGURES_DIR = "figures"
CURVES_FILE = "curves.png"
_MAX_PANELS = 24


def available() -> bool:
    """Whether matplotlib can be imported (the report's figures need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def curves(series: Mapping[tuple[str, str], Mapping[str, Sequence[tuple[int, float]]]]
           ) -> bytes | None:
    """Training curves: one panel per (loop, scalar) over optimiser steps; the per-step
    values as a thin line, the epoch means as dots. ``series`` is
    :func:`mmsec.scalars.read_scalars`'s result; None when it holds nothing."""
    panels: dict[tuple[str, str], dict[str, Sequence[tuple[int, float]]]] = {}
    for (tag, scope), named in series.items():
        for name, points in named.items():
            if name in ("epoch",) or not points:
                continue
            panels.setdefault((tag, name), {})[scope] = points
    if not panels:
        return None
    keys = list(panels)[:_MAX_PANELS]
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(3.2 * cols, 2.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        scopes = panels[key]
        if "step" in scopes:
            xs, ys = zip(*scopes["step"], strict=True)
            ax.plot(xs, ys, lw=0.8, alpha=0.6, color="tab:blue", label="step")
        if "epoch" in scopes:
            xs, ys = zip(*scopes["epoch"], strict=True)
            ax.plot(xs, ys, "o-", ms=3, lw=1.2, color="tab:orange", label="epoch mean")
        ax.set_title(f"{key[0]}: {key[1]}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)  # a flat curve must look flat
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    return _png(fig)


def write_curves(run_dir: str | os.PathLike[str]) -> Path | None:
    """Draw ``figures/curves.png`` in a run folder from its ``scalars.jsonl`` (atomically);
    None when the run logged no scalars or matplotlib is not installed."""
    from .io import write_atomic
    from .scalars import read_scalars

    series = read_scalars(run_dir)
    if not series or not available():
        return None
    png = curves(series)
    if png is None:
        return None
    return write_atomic(Path(run_dir) / FIGURES_DIR / CURVES_FILE, png)


def accuracy_vs_eps(series: Mapping[str, Sequence[tuple[float, float]]]) -> bytes:
    """Zero-shot top-1 against the L-inf budget (in /255), one line per attack setting."""
    fig = _figure(6, 4)
    ax = fig.subplots()
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot([x * 255 for x in xs], [100 * y for y in ys], "o-", label=label)
    ax.set_xlabel("eps (x/255, L-inf)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs eps")
    return _png(fig)


def asr_before_after(bars: Sequence[tuple[str, float, float]]) -> bytes:
    """ASR before and after a defense, one pair of bars per (trigger, defense)."""
    fig = _figure(max(4.0, 1.3 * len(bars) + 2), 4)
    ax = fig.subplots()
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [100 * b for _, b, _ in bars], 0.4, label="before",
           color="tab:red")
    ax.bar([x + 0.2 for x in xs], [100 * a for _, _, a in bars], 0.4, label="after",
           color="tab:green")
    ax.set_xticks(list(xs), [_wrap(label) for label, _, _ in bars], fontsize=8)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 118)  # room for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("ASR before / after defense, per trigger")
    return _png(fig)


def robust_vs_clean(points: Sequence[tuple[str, float, float]]) -> bytes:
    """Robust against clean zero-shot top-1, one point per (defense, attack)."""
    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    markers = "osD^v<>Pp*"
    grouped: dict[str, list[tuple[float, float]]] = {}
    for label, clean, robust in points:  # one legend entry per label
        grouped.setdefault(label, []).append((100 * clean, 100 * robust))
    for i, (label, xy) in enumerate(grouped.items()):
        xs, ys = zip(*xy, strict=True)
        ax.scatter(xs, ys, marker=markers[i % len(markers)], s=50, label=label)
    ax.plot([0, 100], [0, 100], ls=":", color="grey", lw=0.8)
    ax.set_xlabel("clean top-1 (%)")
    ax.set_ylabel("robust top-1 (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("robust vs clean accuracy, per defense")
    return _png(fig)


def matrix(attacks: Sequence[str], defenses: Sequence[str],
           cells: Mapping[tuple[str, str], tuple[str, float, float]]) -> bytes:
    """The attack x defense matrix: rows attacks, columns defenses; ``cells[(attack,
    defense)] = (metric, value, success)`` with ``success`` in [0, 1] for the colour (red:
    the attack wins) and ``metric value`` written in the cell."""
    import numpy as np

    grid = np.full((len(attacks), len(defenses)), np.nan)
    for (a, d), (_, _, success) in cells.items():
        grid[attacks.index(a), defenses.index(d)] = success
    fig = _figure(1.6 * len(defenses) + 2.8, max(3.2, 0.7 * len(attacks) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn_r", vmin=0, vmax=1,
                      aspect="auto")
    for (a, d), (metric, value, _) in cells.items():
        shown = f"{100 * value:.1f}%" if 0 <= value <= 1 else f"{value:.3g}"
        ax.text(defenses.index(d), attacks.index(a), f"{_metric_label(metric)}\n{shown}",
                ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(defenses)), defenses, fontsize=8)
    ax.set_yticks(range(len(attacks)), [_wrap(a, 28) for a in attacks], fontsize=8)
    ax.set_xlabel("defense")
    ax.set_ylabel("attack")
    fig.colorbar(image, ax=ax, label="attack success")  # ASR, or 1 - top-1 under attack
    ax.set_title("attack x defense")
    return _png(fig)


def _wrap(label: str, width: int = 22) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width)) or label


def _metric_label(metric: str) -> str:
    return {"asr": "ASR", "adv_top1": "top-1", "robust_top1": "robust top-1"}.get(metric,
                                                                                  metric)

