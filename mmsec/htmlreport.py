"""The HTML report of one or many runs: one self-contained page (``mmsec report RUN...
--html OUT.html``; ``mmsec run`` writes one for its steps).

Per run: settings, headline, notes, options, every metric, its images (patches, UAPs,
triggers, inverted triggers and masks: the PNGs in ``artifacts/``) and its training curves
(``figures/curves.png`` from ``scalars.jsonl``). Across runs: a sortable table and the
plots their data allows (:mod:`mmsec.compare`): accuracy vs eps, ASR before/after per
trigger, robust vs clean accuracy per defense, the attack x defense matrix.

Images are inlined as ``data:`` URIs and the page's one script (table sorting) is inline:
the page needs no network and its Content-Security-Policy forbids any.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import plots
from .compare import Comparison, RunRecord, compare, format_option
from .errors import UsageError
from .headline import HEADLINE_METRICS, headline
from .io import write_atomic
from .report import RESULTS_FILE, _expand_runs, read_results

__all__ = ["comparison_figures", "load_runs", "render_html", "write_html_report"]

_MAX_IMAGES = 16
_MAX_IMAGE_BYTES = 4 << 20
_SETTINGS = ("model", "pretrained", "dataset", "split", "seed", "device", "precision",
             "plugin_version", "mmsec_version", "started", "status")

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;background:#f4f4f4;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.headline td,.headline th{font-size:15px}.note{color:#8a5300}
figure{display:inline-block;margin:.4em 1em .4em 0;vertical-align:top}
figure img{border:1px solid #ccc;image-rendering:pixelated;max-width:100%}
figcaption{font-size:12px;color:#555}
.curves img{image-rendering:auto}.plots figure img{image-rendering:auto}
details{margin:.4em 0}.muted{color:#777}
.settings{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
.wide{overflow-x:auto}
"""

# Sorting: numbers by value (data-v), text alphabetically; a second click reverses.
_JS = """
(function(){
  function key(cell){var v=cell.getAttribute('data-v');
    if(v!==null&&v!==''&&!isNaN(parseFloat(v)))return [0,parseFloat(v)];
    return [1,cell.textContent.trim().toLowerCase()];}
  function cmp(a,b){if(a[0]!==b[0])return a[0]-b[0];return a[1]<b[1]?-1:a[1]>b[1]?1:0;}
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads=table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads,function(th,col){
      th.addEventListener('click',function(){
        var asc=th.getAttribute('aria-sort')!=='ascending';
        Array.prototype.forEach.call(heads,function(h){h.removeAttribute('aria-sort');});
        th.setAttribute('aria-sort',asc?'ascending':'descending');
        var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(x,y){var c=cmp(key(x.cells[col]),key(y.cells[col]));
          return asc?c:-c;});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
})();
"""


def load_runs(paths: Sequence[str | os.PathLike[str]]) -> list[RunRecord]:
    """The run folders named (a run folder, its results.json, or a folder of runs).

    A missing path or a folder without runs is a :class:`UsageError` naming it.
    """
    dirs = _expand_runs(paths)
    if not dirs:
        raise UsageError("no run folders given")
    names = [d.name for d in dirs]
    # steps of different recipes share names ("implant"): those are named recipe/step
    return [RunRecord(d, read_results(d / RESULTS_FILE),
                      f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else None)
            for d in dirs]


def comparison_figures(comp: Comparison) -> dict[str, tuple[str, bytes]]:
    """``{file stem: (caption, PNG)}`` for each plot the runs have data for (none without
    matplotlib)."""
    if not plots.available():
        return {}
    figs: dict[str, tuple[str, bytes]] = {}
    if comp.has_matrix:
        attacks, defenses, cells = comp.matrix()
        figs["matrix"] = ("attack x defense: ASR for backdoors, zero-shot top-1 under attack "
                          "otherwise (colour: attack success)",
                          plots.matrix(attacks, defenses,
                                       {k: (c.metric, c.value, c.success)
                                        for k, c in cells.items()}))
    if comp.has_eps:
        figs["accuracy-vs-eps"] = ("zero-shot top-1 against the L-inf budget (eps 0: clean)",
                                   plots.accuracy_vs_eps(comp.eps_series))
    if comp.asr_bars:
        figs["asr-before-after"] = ("ASR with the real trigger before and after each defense",
                                    plots.asr_before_after(comp.asr_bars))
    if comp.robust_points:
        figs["robust-vs-clean"] = ("robust against clean zero-shot top-1 per defense "
                                   "(the dotted line: no drop)",
                                   plots.robust_vs_clean(comp.robust_points))
    return figs


# ----------------------------------------------------------------------------- rendering


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _is_rate(key: str) -> bool:
    return any(p in key for p in ("top1", "top5", "asr", "fooling_rate", "_r1", "_r5", "_r10",
                                  "recall"))


def _cell(key: str, value: Any) -> str:
    """A table cell; numbers right-aligned with their raw value for sorting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td>{_e(value)}</td>"
    text = f"{100 * value:.1f}%" if _is_rate(key) and 0 <= value <= 1 else f"{value:.4g}"
    return f'<td class="n" data-v="{value!r}">{_e(text)}</td>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "",
           table_id: str = "") -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' id="{table_id}"' if table_id else "")
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str, caption: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure class="{cls}"><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _run_images(run_dir: Path) -> list[Path]:
    """The curves figure, then the PNGs a run saved in ``artifacts/`` (top two levels:
    a plugin's own and its child runs'; not exported datasets)."""
    found = []
    curves = run_dir / plots.FIGURES_DIR / plots.CURVES_FILE
    if curves.is_file():
        found.append(curves)
    art = run_dir / "artifacts"
    if art.is_dir():
        pngs = sorted(art.glob("*.png")) + sorted(art.glob("*/*.png"))
        found += [p for p in pngs if p.stat().st_size <= _MAX_IMAGE_BYTES][:_MAX_IMAGES]
    return found


def _headline_html(results: Mapping[str, Any]) -> str:
    h = headline(results)
    parts = []
    if h.rows:
        table = h.table()
        rows = [[f"<th>{_e(r[0])}</th>", *(f'<td class="n">{_e(c)}</td>' for c in r[1:])]
                for r in table[1:]]
        parts.append(_table(table[0], rows, "headline"))
    parts += [f'<p class="note">note: {_e(n)}</p>' for n in h.notes]
    return "".join(parts)


def _run_section(index: int, run: RunRecord, base: Path | None) -> str:
    res = run.results
    title = " ".join(str(p) for p in (res.get("kind"), res.get("plugin") or
                                      res.get("robust")) if p)
    parts = [f'<section class="run" id="run-{index}"><h2>{index}. {_e(title)} '
             f'<span class="muted">{_e(run.name)}</span></h2>']
    where = Path(os.path.relpath(run.dir, base)) if base else run.dir
    parts.append(f'<p class="muted">run folder: <code>{_e(where)}</code> '
                 f'(<a href="{_e((where / "report.md").as_posix())}">report.md</a>, with the '
                 "plugin's own sections)</p>")
    parts.append(_headline_html(res))
    settings = [[f"<th>{_e(k)}</th>", _cell(k, res.get(k))] for k in _SETTINGS
                if res.get(k) is not None]
    options = [[f"<th>{_e(k)}</th>", f"<td>{_e(format_option(k, v).split('=', 1)[1])}</td>"]
               for k, v in run.options.items()]
    parts.append('<div class="settings">' + _table(["setting", "value"], settings))
    if 0 < len(options) <= 12:
        parts.append(_table(["option", "value"], options))
    elif options:  # a long list (InverTune has 40) stays folded
        parts.append(f"<details><summary>{len(options)} options</summary>"
                     + _table(["option", "value"], options) + "</details>")
    parts.append("</div>")
    images = _run_images(run.dir)
    if images:
        parts.append("<h3>Images</h3><div>")
        for path in images:
            rel = path.relative_to(run.dir).as_posix()
            cls = "curves" if path.parent.name == plots.FIGURES_DIR else ""
            caption = "training curves" if cls else rel
            parts.append(_img(path.read_bytes(), f"{run.name}: {rel}", caption, cls))
        parts.append("</div>")
    metrics = run.metrics
    if metrics:
        rows = [[f"<td>{_e(k)}</td>", _cell(k, v)] for k, v in metrics.items()]
        parts.append(f"<details><summary>all {len(metrics)} metrics</summary>"
                     + _table(["metric", "value"], rows, "sortable") + "</details>")
    parts.append("</section>")
    return "".join(parts)


def render_html(runs: Sequence[RunRecord], figures: Mapping[str, tuple[str, bytes]], *,
                title: str = "mmsec report", base: Path | None = None,
                plots_missing: bool = False) -> str:
    """The page: the comparison table, the plots in ``figures``, one section per run.
    ``base`` is the page's folder (run folders are shown relative to it)."""
    present = {k for r in runs for k, v in r.metrics.items() if v is not None}
    metric_cols = [k for k in HEADLINE_METRICS if k in present]
    header = ["#", "run", "kind", "plugin", "model", "dataset", "status", "options",
              *metric_cols]
    rows = []
    for i, r in enumerate(runs, 1):
        res = r.results
        opts = " ".join(format_option(k, v) for k, v in r.options.items())
        short = opts if len(opts) <= 60 else opts[:57] + "..."
        rows.append([f'<td class="n" data-v="{i}">{i}</td>',
                     f'<td><a href="#run-{i}">{_e(r.name)}</a></td>',
                     f"<td>{_e(res.get('kind'))}</td>",
                     f"<td>{_e(res.get('plugin') or res.get('robust'))}</td>",
                     f"<td>{_e(res.get('model'))}</td>", f"<td>{_e(res.get('dataset'))}</td>",
                     f"<td>{_e(res.get('status'))}</td>",
                     f'<td title="{_e(opts)}">{_e(short)}</td>',
                     *(_cell(k, r.metrics.get(k)) for k in metric_cols)])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{len(runs)} run(s); written {stamp}. Click a column header to '
        "sort.</p>",
        '<section id="comparison"><h2>Runs</h2>',
        '<div class="wide">', _table(header, rows, "sortable", "runs-table"), "</div>",
        "</section>",
    ]
    if figures:
        parts.append('<section id="plots" class="plots"><h2>Plots</h2>')
        parts += [_img(png, name, caption) for name, (caption, png) in figures.items()]
        parts.append("</section>")
    elif plots_missing:
        parts.append('<p class="muted">Plots need matplotlib: pip install '
                     "'mmsec[report]'.</p>")
    parts += [_run_section(i, r, base) for i, r in enumerate(runs, 1)]
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "\n".join(parts)


def write_html_report(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                      *, title: str | None = None,
                      figures_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write the HTML report of the runs in ``paths`` to ``out`` (atomically).

    With ``figures_dir`` the comparison plots are also written there as PNGs (the recipe's
    ``summary.md`` links them). Returns ``{"html": path, "figures": {stem: path}, "runs":
    n}``.
    """
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give the HTML file to write")
    runs = load_runs(paths)
    figs = comparison_figures(compare(runs))
    page = render_html(runs, figs, title=title or "mmsec report", base=out.parent.resolve(),
                       plots_missing=not plots.available())
    written: dict[str, Path] = {}
    if figures_dir is not None:
        for stem, (_, png) in figs.items():
            written[stem] = write_atomic(Path(figures_dir) / f"{stem}.png", png)
    write_atomic(out, page)
    return {"html": out, "figures": written, "runs": len(runs)}
