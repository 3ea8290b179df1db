"""Comparisons across runs: which attack and defense each run measured, and the series the
report's plots draw (accuracy vs eps, ASR before/after, robust vs clean, the attack x
defense matrix).

Runs are linked through the files they share: a defense run's ``trigger`` /
``attack_artifact`` is an attack run's ``attack_artifact``; an evaluated model's
``pretrained`` is a defense run's ``model_checkpoint``. A file that none of the given runs
wrote counts as "made elsewhere": its plugin comes from the run's own record, a model
nobody defended is ``none``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Cell", "Comparison", "RunRecord", "compare"]

#: options shown first when they tell runs of one plugin apart
_KEY_OPTIONS = ("eps", "trigger", "area", "position", "steps", "loss")


@dataclass
class RunRecord:
    """One run folder and its ``results.json`` content."""

    dir: Path
    results: dict[str, Any]
    #: how the report names the run (default: its folder's name)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.dir.name

    @property
    def metrics(self) -> dict[str, Any]:
        return self.results.get("metrics") or {}

    @property
    def kind(self) -> str | None:
        return self.results.get("kind")

    @property
    def options(self) -> dict[str, Any]:
        opts = self.results.get("options")
        return opts if isinstance(opts, dict) else {}


@dataclass(frozen=True)
class Cell:
    """One cell of the attack x defense matrix: ``value`` of ``metric`` (``asr``, or the
    zero-shot top-1 under attack) for ``attack`` against a model defended by ``defense``."""

    attack: str
    defense: str
    metric: str
    value: float
    run: str

    @property
    def success(self) -> float:
        """How well the attack did, in [0, 1]: ASR, or 1 - top-1 under attack."""
        return 1.0 - self.value if self.metric.endswith("top1") else self.value


@dataclass
class Comparison:
    """What the plots of many runs draw; each part empty when the runs lack its data."""

    cells: list[Cell] = field(default_factory=list)
    #: series label -> [(eps, top-1)] (eps 0: clean)
    eps_series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    #: (label, ASR before, ASR after)
    asr_bars: list[tuple[str, float, float]] = field(default_factory=list)
    #: (label, clean top-1, robust top-1)
    robust_points: list[tuple[str, float, float]] = field(default_factory=list)

    def matrix(self) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
        """``(attacks, defenses, {(attack, defense): cell})``; ``none`` is the first
        defense; a later run's cell replaces an earlier one's."""
        attacks = list(dict.fromkeys(c.attack for c in self.cells))
        defenses = list(dict.fromkeys(c.defense for c in self.cells))
        if "none" in defenses:
            defenses.remove("none")
            defenses.insert(0, "none")
        return attacks, defenses, {(c.attack, c.defense): c for c in self.cells}

    @property
    def has_matrix(self) -> bool:
        attacks, defenses, cells = self.matrix()
        return len(cells) >= 2 and (len(attacks) >= 2 or len(defenses) >= 2)

    @property
    def has_eps(self) -> bool:
        """Whether some attack setting was measured at two budgets or more."""
        return any(len({e for e, _ in points if e > 0}) >= 2
                   for points in self.eps_series.values())


def _norm(path: Any) -> str:
    return os.path.normpath(str(path)) if path else ""


def format_option(key: str, value: Any) -> str:
    """``eps=4/255`` for budgets in pixel units, ``key=value`` otherwise."""
    if isinstance(value, float) and ("eps" in key or key == "step_size") and value > 0:
        scaled = value * 255
        if abs(scaled - round(scaled, 2)) < 1e-6:
            return f"{key}={round(scaled, 2):g}/255"
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"


def _labeler(settings: Sequence[tuple[str, dict[str, Any]]], skip: Sequence[str] = ()):
    """A function ``(name, options) -> label``: the name, plus the options (at most two)
    that differ between settings of the same name among ``settings``."""
    differing: dict[str, list[str]] = {}
    for name in dict.fromkeys(n for n, _ in settings):
        opts = [o for n, o in settings if n == name]
        keys = list(dict.fromkeys(k for o in opts for k in o))
        diff = [k for k in keys if len({repr(o.get(k)) for o in opts}) > 1 and k not in skip]
        diff.sort(key=lambda k: (_KEY_OPTIONS.index(k) if k in _KEY_OPTIONS else 99))
        # the fewest options (at most two) that tell the settings apart
        distinct = len({repr(sorted((k, repr(o.get(k))) for k in diff)) for o in opts})
        chosen: list[str] = []
        for key in diff[:2]:
            chosen.append(key)
            if len({tuple(repr(o.get(k)) for k in chosen) for o in opts}) == distinct:
                break
        differing[name] = chosen

    def label(name: str, options: Mapping[str, Any]) -> str:
        shown = [format_option(k, options.get(k)) for k in differing.get(name, [])
                 if k in options]
        return " ".join([name, *shown])

    return label


def compare(runs: Sequence[RunRecord]) -> Comparison:
    """Link the runs and collect what the comparison plots draw."""
    attack_runs = [r for r in runs if r.kind == "attack"]
    robust_runs = [r for r in runs if r.kind == "eval" and r.results.get("robust")]
    defend_runs = [r for r in runs if r.kind == "defend"]
    attack_label = _labeler([(str(r.results.get("plugin")), r.options) for r in attack_runs]
                            + [(str(r.results["robust"]), r.options) for r in robust_runs])
    defense_label = _labeler([(str(r.results.get("plugin")), r.options) for r in defend_runs])
    attack_of = {_norm(r.results.get("attack_artifact")):
                 attack_label(str(r.results.get("plugin")), r.options)
                 for r in attack_runs if r.results.get("attack_artifact")}
    fitted_on = {_norm(r.results.get("attack_artifact")): _target(r.results)
                 for r in attack_runs if r.results.get("attack_artifact")}
    defense_of = {_norm(r.results.get("model_checkpoint")):
                  defense_label(str(r.results.get("plugin")), r.options)
                  for r in defend_runs if r.results.get("model_checkpoint")}
    eps_label = _labeler([(str(r.results.get("plugin")), r.options) for r in attack_runs]
                         + [(str(r.results["robust"]), r.options) for r in robust_runs],
                         skip=("eps", "step_size"))
    # an attack also run as --robust is a per-image one: its attack runs are robust points
    robust_names = {str(r.results["robust"]) for r in robust_runs}
    several_models = len({(r.results.get("model"), r.results.get("dataset")) for r in runs}) > 1
    out = Comparison()
    clean_of: dict[str, float] = {}
    for r in runs:
        m = r.metrics
        given = r.results.get("trigger") or r.results.get("attack_artifact")
        defense = defense_of.get(_norm(r.results.get("pretrained")), "none")

        def cell(attack: str | None, where: str, key: str, metric: str,
                 r: RunRecord = r) -> None:
            value = r.metrics.get(key)
            if attack and isinstance(value, (int, float)):
                out.cells.append(Cell(attack, where, metric, float(value), r.name))

        if r.kind == "defend" and given:
            attack = attack_of.get(_norm(given)) or _recorded_attack(r.results)
            metric = "asr" if "after_asr" in m else "adv_top1"
            after = defense_label(str(r.results.get("plugin")), r.options)
            cell(attack, defense, f"before_{metric}", metric)
            cell(attack, after, f"after_{metric}", metric)
            if metric == "asr" and "before_asr" in m and "after_asr" in m:
                out.asr_bars.append((f"{attack} / {after}", float(m["before_asr"]),
                                     float(m["after_asr"])))
        elif r.kind == "attack":
            name = str(r.results.get("plugin"))
            metric = "asr" if "asr" in m else "adv_top1"
            cell(attack_label(name, r.options), defense, metric, metric)
            if metric == "adv_top1":
                _eps_point(out, clean_of, f"{eps_label(name, r.options)} / {defense}", r,
                           "adv_top1", several_models)
                if (defense != "none" or name in robust_names) and "clean_top1" in m:
                    out.robust_points.append((f"{defense} ({attack_label(name, r.options)})",
                                              float(m["clean_top1"]), float(m["adv_top1"])))
        elif r.kind == "eval" and r.results.get("robust"):
            name = str(r.results["robust"])
            cell(attack_label(name, r.options), defense, "robust_top1", "robust_top1")
            _eps_point(out, clean_of, f"{eps_label(name, r.options)} / {defense}", r,
                       "robust_top1", several_models)
            if "clean_top1" in m and "robust_top1" in m:
                out.robust_points.append((f"{defense} ({attack_label(name, r.options)})",
                                          float(m["clean_top1"]), float(m["robust_top1"])))
        elif r.kind == "eval" and given:
            attack = attack_of.get(_norm(given)) or r.results.get("plugin")
            if attack and fitted_on.get(_norm(given), _target(r.results)) != _target(r.results):
                attack = f"{attack} -> {_target(r.results)}"  # a transfer: a row of its own
            metric = "asr" if "asr" in m else "adv_top1"
            cell(attack, defense, metric, metric)
    return out


def _eps_point(out: Comparison, clean_of: dict[str, float], label: str, r: RunRecord,
               key: str, with_model: bool) -> None:
    eps, m = r.options.get("eps"), r.metrics
    if not isinstance(eps, (int, float)) or not isinstance(m.get(key), (int, float)):
        return
    if with_model:
        label = f"{label} ({r.results.get('model')}, {r.results.get('dataset')})"
    points = out.eps_series.setdefault(label, [])
    if isinstance(m.get("clean_top1"), (int, float)) and label not in clean_of:
        clean_of[label] = float(m["clean_top1"])
        points.append((0.0, float(m["clean_top1"])))
    points.append((float(eps), float(m[key])))


def _target(results: Mapping[str, Any]) -> str:
    return f"{results.get('model')} / {results.get('dataset')}"


def _recorded_attack(results: Mapping[str, Any]) -> str | None:
    """The attack plugin among those a run recorded (the one its artifact came from)."""
    for entry in results.get("plugins") or []:
        if entry.get("kind") == "attack":
            return entry.get("name")
    return None
