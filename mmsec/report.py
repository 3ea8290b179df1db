"""Reports: the markdown report of one run, and many runs merged into one table.

``render_report`` writes a run's ``report.md`` (settings, options, metrics, images, sections);
``merge_runs`` / ``write_report_table`` serve ``mmsec report`` and the recipe summaries.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import MmsecError, UsageError
from .headline import headline
from .io import write_atomic

__all__ = ["merge_runs", "md_table", "read_results", "render_report", "write_report_table"]

RESULTS_FILE = "results.json"

def _cell(value: Any) -> str:
    """A markdown table cell: numbers compact, pipes and newlines escaped."""
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(results: Mapping[str, Any], images: Sequence[str] = (),
                  sections: Sequence[tuple[str, str]] = ()) -> str:
    """The markdown report of one run: settings, options, metrics, images, extra sections.

    ``images`` are paths relative to the run folder; ``sections`` are ``(title, markdown)``.
    """
    title = " ".join(str(p) for p in (results.get("kind"), results.get("plugin")) if p)
    total = (results.get("durations") or {}).get("total")
    lines = [f"# mmsec {title}", ""]
    status = f"Status: **{results.get('status')}**, started {results.get('started')}"
    if total is not None:
        status += f", took {total:.1f} s"
    lines += [status + ".", ""]
    if results.get("error"):
        lines += [f"Error: `{results['error']}`", ""]
    head = headline(results)
    if head.rows or head.notes:
        lines += ["## Headline", ""]
        if head.rows:
            table = head.table()
            lines += [md_table(table[0], table[1:]), ""]
        lines += [f"- {note}" for note in head.notes] + ([""] if head.notes else [])
    settings = [
        "model", "pretrained", "dataset", "split", "seed", "device", "precision",
        "plugin_version", "mmsec_version",
    ]  # fmt: skip
    lines += [
        "## Settings",
        "",
        md_table(["setting", "value"], [(k, results.get(k)) for k in settings]),
        "",
    ]
    options = results.get("options") or {}
    if options:
        lines += ["## Options", "", md_table(["option", "value"], options.items()), ""]
    metrics = results.get("metrics") or {}
    if metrics:
        lines += ["## Metrics", "", md_table(["metric", "value"], metrics.items()), ""]
    durations = results.get("durations") or {}
    if durations:
        timing = [(k, f"{v:.2f}") for k, v in durations.items()]
        lines += ["## Durations (s)", "", md_table(["step", "seconds"], timing), ""]
    shown = list(dict.fromkeys(images))
    if shown:
        lines += ["## Images", ""]
        lines += [f"![{Path(image).stem}]({image})" for image in shown]
        lines.append("")
    for section_title, text in sections:
        lines += [f"## {section_title}", "", text.rstrip(), ""]
    skipped = results.get("skipped_items") or []
    if skipped:
        rows = [(s.get("item"), s.get("reason")) for s in skipped]
        lines += [f"## Skipped items ({len(skipped)})", "", md_table(["item", "reason"], rows), ""]
    artifacts = results.get("artifacts") or []
    if artifacts:
        lines += ["## Artifacts", ""] + [f"- [{a}]({a})" for a in artifacts] + [""]
    env = results.get("environment") or {}
    if env:
        lines += ["## Environment", "", md_table(["package", "version"], env.items()), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- merging


def read_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MmsecError(f"{path}: corrupt results file ({exc})") from None
    if not isinstance(data, dict):
        raise MmsecError(f"{path}: corrupt results file (not a JSON object)")
    return data


def _expand_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Run folders from the arguments: a run folder, its results.json, or a folder of runs
    (such as ``mmsec-runs/``, whose recipe folders hold runs one level further down)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name == RESULTS_FILE:
            found.append(path.parent)
        elif (path / RESULTS_FILE).is_file():
            found.append(path)
        elif path.is_dir() and (children := _runs_below(path)):
            found.extend(children)
        elif not path.exists():
            raise UsageError(f"{path}: no such run folder")
        else:
            raise UsageError(f"{path}: not a run folder (no {RESULTS_FILE})")
    return found


def _runs_below(folder: Path) -> list[Path]:
    """The run folders in ``folder`` and in its sub-folders that are not runs themselves
    (a recipe folder's steps), each group in the order the runs started."""

    def in_order(dirs: list[Path]) -> list[Path]:
        return sorted(dirs, key=lambda d: (_started(d), d.name))

    runs = in_order([p.parent for p in folder.glob(f"*/{RESULTS_FILE}")])
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and p not in runs):
        runs.extend(in_order([p.parent for p in child.glob(f"*/{RESULTS_FILE}")]))
    return runs


def _started(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / RESULTS_FILE).read_text("utf-8")).get("started"))
    except (OSError, ValueError, AttributeError):
        return ""


def _format_option(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def merge_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per run for ``mmsec report``; returns ``(rows, columns)``.

    Columns: ``run, kind, plugin, model, pretrained, dataset, split, seed, status, options``
    (``k=v`` pairs) and then every metric seen, in order of first appearance. A folder of
    runs (such as ``mmsec-runs/``) expands to the runs inside it. A folder without
    ``results.json`` raises :class:`UsageError`; an unreadable one :class:`MmsecError`.
    """
    base = ["run", "kind", "plugin", "model", "pretrained", "dataset", "split", "seed", "status",
            "options"]  # fmt: skip
    rows: list[dict[str, Any]] = []
    metric_columns: dict[str, None] = {}
    for directory in _expand_runs(run_dirs):
        results = read_results(directory / RESULTS_FILE)
        options = results.get("options") or {}
        if not isinstance(options, dict):
            raise MmsecError(f"{directory / RESULTS_FILE}: corrupt results file (bad options)")
        row: dict[str, Any] = {"run": str(directory)}
        row.update({k: results.get(k) for k in base[1:-1]})
        row["options"] = " ".join(f"{k}={_format_option(v)}" for k, v in options.items())
        metrics = results.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise MmsecError(f"{directory / RESULTS_FILE}: corrupt results file (bad metrics)")
        for name, value in metrics.items():
            metric_columns.setdefault(name, None)
            row[name] = value
        rows.append(row)
    return rows, base + [m for m in metric_columns if m not in base]


def write_report_table(
    rows: Sequence[Mapping[str, Any]],
    csv_path: str | os.PathLike[str] | None = None,
    md: bool = True,
    columns: Sequence[str] | None = None,
) -> str:
    """Render merged runs; write a CSV to ``csv_path`` (atomically) when given.

    Returns the markdown table when ``md`` is true, else the CSV text. ``columns`` defaults
    to the union of the rows' keys in order of first appearance.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    csv_text = buffer.getvalue()
    if csv_path is not None:
        write_atomic(csv_path, csv_text)
    if not md:
        return csv_text
    return md_table(columns, [[row.get(c) for c in columns] for row in rows]) + "\n"
