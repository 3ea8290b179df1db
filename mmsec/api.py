"""The Python API behind every CLI command: eval, attack, defend, recipes.

Each function loads the model and data, opens one run folder, calls the plugin, measures
through the evaluation pipeline, and returns the run's ``results.json`` content::

    from mmsec import api
    res = api.attack("pgd", options={"eps": "2/255"})
    res["metrics"]["adv_top1"]
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attacks import Artifact, Attack
from .cache import EmbeddingCache
from .context import RunContext, RunInputs
from .data import ImageDataset, parse_spec, subset
from .errors import MmsecError, PluginError, UsageError
from .evaluation import Evaluation, Metric, Row, rows_to_metrics
from .headline import HEADLINE_METRICS  # the columns `mmsec run` prints per step
from .model import ClipModel
from .registry import Registry, get_registry
from .runs import Run
from .training import seed_everything

__all__ = ["HEADLINE_METRICS", "Settings", "attack", "defend", "encode_cache", "eval",
           "load_artifact", "run_recipe"]


@dataclass
class Settings:
    """What every command shares (the CLI's common options)."""

    model: str | None = None
    pretrained: str | None = None
    data: str | None = None
    split: str = "test"
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    out: str | Path | None = None
    resume: bool = False
    strict: bool = False
    limit: int | None = None
    quiet: bool = False
    image_size: int | None = None  # file-backed (and procedural) data: square side in pixels
    compile: bool = False  # the image tower through torch.compile (ClipModel.torch_compile)
    channels_last: bool = False  # the image tower channels-last (ClipModel.channels_last)
    #: scalar back-ends besides scalars.jsonl (``tensorboard``, ``wandb``); None: default
    loggers: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _culprit(reg: Registry, plugin: Any, phase: str) -> Iterator[None]:
    """Errors raised inside a plugin's ``phase`` name the plugin, its distribution and the
    phase."""
    try:
        yield
    except (KeyboardInterrupt, UsageError):
        raise
    except Exception as exc:
        kind = "attacks" if isinstance(plugin, Attack) else "defenses"
        p = reg.provenance(kind, type(plugin))
        who = f'plugin "{plugin.name}" ({p["distribution"] or "?"} {p["version"] or ""}'.rstrip()
        if isinstance(exc, MmsecError):
            err: MmsecError = type(exc)(f"{who}), {phase}: {exc}")
        else:
            err = PluginError(f"{who}) failed in {phase}: {type(exc).__name__}: {exc}")
        # the run folder records who failed where (Run.fail reads these)
        err.failure = {"plugin": plugin.name, "distribution": p["distribution"],
                       "version": p["version"], "phase": phase,
                       "exception": type(exc).__name__}
        raise err from exc


#: built-in sources that read image files and take ``image_size``
_FILE_SOURCES = ("imagefolder", "captions")


#: seeds NumPy accepts (seed_everything seeds torch, NumPy and Python with it)
MAX_SEED = 2**32 - 1


def check_settings(s: Settings) -> None:
    """Usage errors in the shared settings, as one line (exit 2) before anything loads."""
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed <= MAX_SEED:
        raise UsageError(f"--seed {s.seed}: use an integer from 0 to {MAX_SEED}")
    if s.limit is not None and (isinstance(s.limit, bool) or not isinstance(s.limit, int)
                                or s.limit < 1):
        raise UsageError(f"--limit {s.limit}: use a positive number of items")


def _open(kind: str, plugin: str | None, s: Settings, inputs: RunInputs | None = None
          ) -> tuple[RunContext, ClipModel]:
    check_settings(s)
    seed_everything(s.seed)
    started = time.perf_counter()
    reg = get_registry()
    # The model loads before the run folder exists: a wrong checkpoint leaves nothing behind.
    model = reg.load_model(s.model, s.pretrained, device=s.device, precision=s.precision,
                           compile=s.compile, channels_last=s.channels_last)
    if s.image_size is None and parse_spec(s.data)[0] in _FILE_SOURCES:
        # Image files load at the model's input size (one antialiased resize, as `zoo train`
        # trains), not at whatever size the first file happens to have.
        s.image_size = int(model.image_size)
    cache = EmbeddingCache()  # a cache folder that is a file fails here, before the run
    run = Run.create(s.out, kind, plugin, resume=s.resume, quiet=s.quiet, loggers=s.loggers)
    run.durations["load_model"] = round(time.perf_counter() - started, 3)
    ctx = RunContext(run, device=model.device, precision=s.precision, seed=s.seed,
                     cache=cache, registry=reg, strict=s.strict, inputs=inputs)
    for key, value in (("model", model.name), ("pretrained", model.pretrained),
                       ("model_fingerprint", model.fingerprint),
                       ("dataset", s.data or "procedural"), ("split", s.split),
                       ("seed", s.seed), ("device", str(ctx.device)),
                       ("precision", model.effective_precision)):
        run.set(key, value)
    if model.effective_precision != s.precision:  # bf16 asked on the CPU runs fp32: say so
        run.set("precision_requested", s.precision)
    # config.yaml: what this run really used (the resolved model, device, data)
    run.set("config", {"kind": kind, "plugin": plugin, "model": model.name,
                       "pretrained": model.pretrained, "data": s.data or "procedural",
                       "split": s.split, "limit": s.limit, "device": str(ctx.device),
                       "precision": model.effective_precision, "seed": s.seed,
                       "strict": s.strict,
                       **({"image_size": s.image_size} if s.image_size else {}),
                       **({"compile": True} if s.compile else {}),
                       **({"channels_last": True} if s.channels_last else {}), **s.extra})
    if model.info.get("source") in reg.models:
        ctx.record_plugin("models", reg.models[model.info["source"]])
    name, _ = parse_spec(s.data)
    if name in reg.datasets:
        ctx.record_plugin("datasets", reg.datasets[name])
    return ctx, model


def _configure(ctx: RunContext, plugin: Any, kind: str) -> None:
    """The plugin's version, options and provenance in results.json and config.yaml."""
    ctx.set("plugin_version", ctx.registry.provenance(kind, type(plugin))["version"])
    ctx.set("options", plugin.options_dict())
    ctx.run.fields["config"]["options"] = plugin.options_dict()
    ctx.record_plugin(kind, type(plugin))


def _size(s: Settings) -> dict[str, int]:
    """``image_size`` for the data source, only when set (third-party sources may not take
    it)."""
    return {"image_size": int(s.image_size)} if s.image_size else {}


def _data(ctx: RunContext, s: Settings, split: str | None = None,
          limit: int | None = None) -> ImageDataset:
    # ``n`` lets generated sources (procedural) render only what is used; others ignore it.
    ds = ctx.registry.load_dataset(s.data, split=split or s.split, seed=s.seed,
                                   strict=s.strict, n=limit, **_size(s))
    if (split or s.split) == "train" and getattr(ds, "shared_splits", False):
        _mark_shared_splits(ctx, ds)
    ds = subset(ds, limit, seed=s.seed)
    if ds.skipped:
        ctx.log.warning("%d corrupt item(s) skipped in %s", ds.skipped, ds.describe())
        for item, reason in ds.skipped_items:  # results.json counts these ...
            ctx.run.skipped_items.append({"item": item, "reason": reason})
        unnamed = ds.skipped - len(ds.skipped_items)  # ... and these without a name
        if unnamed:
            ctx.set("skipped_count", ctx.get("skipped_count", 0) + unnamed)
    return ds


def _mark_shared_splits(ctx: RunContext, ds: ImageDataset) -> None:
    """Something is fitted on a "train" split that is also the test split: say so, and mark
    the figures (the attack or defense is measured on the items it was fitted on)."""
    msg = (f"{ds.describe()} has no split column, so its train and test splits are the same "
           "items: what is fitted on train is measured on the pairs it saw (add a 'split' "
           "column to the file)")
    unreliable = dict(ctx.get("unreliable") or {})
    if "fit" not in unreliable:
        unreliable["fit"] = msg
        ctx.set("unreliable", unreliable)
        ctx.log.warning("%s: figures of this run are unreliable", msg)


def _bank(ctx: RunContext, s: Settings, n: int) -> ImageDataset | None:
    """A labelled train-split sample for kNN metrics (None when the data has no train split)."""
    if n <= 0:
        return None
    try:
        ds = ctx.registry.load_dataset(s.data, split="train", seed=s.seed, strict=s.strict, n=n,
                                       **_size(s))
    except (UsageError, MmsecError):
        return None
    if getattr(ds, "shared_splits", False):
        return None  # the bank would hold the queries themselves (kNN top-1 1.0)
    ds = subset(ds, n, seed=s.seed)
    return ds if ds.classnames else None


def _finish(ctx: RunContext, rows: Sequence[Row], started: float) -> dict:
    """Record rows (long form and flat, before the plugin's own metrics) and write outputs."""
    own = dict(ctx.run.metrics)
    ctx.run.metrics.clear()
    ctx.run.metrics.update(rows_to_metrics(rows))
    ctx.run.metrics.update(own)
    ctx.run.rows.extend(r.as_dict() for r in rows)
    for task in dict.fromkeys(r.task for r in rows):
        if task in ctx.registry.metrics:
            ctx.record_plugin("metrics", ctx.registry.metrics[task])
    ctx.set("images_encoded", ctx.cache.stats.encoded_by_kind.get("image", 0))
    ctx.set("texts_encoded", ctx.cache.stats.encoded_by_kind.get("text", 0))
    ctx.set("cache_hits", ctx.cache.stats.hits)
    ctx.durations["total"] = round(time.perf_counter() - started, 3)
    results = ctx.run.finish()
    ctx.run.close()
    return results


def load_artifact(path: str | Path, *, trigger: bool = False,
                  registry: Registry | None = None) -> tuple[Attack, Artifact]:
    """``(the attack plugin that made it, the artifact)`` for a saved artifact; with
    ``trigger`` it must be targeted (a backdoor's trigger spec)."""
    artifact = Artifact.load(path)
    if trigger and not artifact.targeted:
        raise UsageError(f"{path}: not a trigger spec (the artifact has no target)")
    return (registry or get_registry()).attack_for(artifact), artifact


def _measure(ev: Evaluation, ctx: RunContext, attack: Attack | None = None,
             artifact: Artifact | None = None, with_control: bool = True) -> list[Row]:
    """Clean, attacked and control views of ``ev``, measured by its probes."""
    views = [ev.clean()]
    if attack is not None and artifact is not None:
        with _culprit(ctx.registry, attack, "apply"):
            views += ev.attacked(attack, artifact, run=ctx)
        if with_control:
            with _culprit(ctx.registry, attack, "control"):
                control = attack.control(artifact, ctx.seed)
                if control is not None:
                    views += ev.attacked(attack, control, condition="control", run=ctx)
    return ev.measure(views)


# --------------------------------------------------------------------------- eval
def load_detector(path: str | Path, registry: Registry | None = None) -> Metric:
    """A probe (``Metric`` named ``detector``) around an attacked-input detector a defense
    saved (GRACE's ``grace-detector.safetensors``): ``detect_rate`` on every view (on clean
    images, the false-positive rate) at the detector's own threshold, and ``detect_auroc``
    of each attacked view against the clean one; both over the views' ``layer_items``."""
    import torch

    from .metrics import auroc

    if not Path(path).is_file():
        raise UsageError(f"--detector {path}: no such file")
    artifact = Artifact.load(path)
    reg = registry or get_registry()
    cls = reg.defense(artifact.plugin)
    if "threshold" not in artifact.meta:
        raise UsageError(f"--detector {path}: not a detector (an artifact of "
                         f"{artifact.plugin!r} without a threshold)")
    defense = cls(artifact.options)
    threshold = float(artifact.meta["threshold"])

    def probe(view) -> dict[str, Any] | None:
        if not view.layers:
            return None
        n = len(next(iter(view.layers.values())))
        scores = defense.detection_scores(artifact, view.images[:n], view.layers).cpu()
        view.memo["detector_scores"] = scores
        out: dict[str, Any] = {"detect_rate": (float((scores > threshold).float().mean()), n)}
        if not view.is_clean and view.images is not view.clean.images:
            clean = view.clean.memo.get("detector_scores")
            if clean is None:
                clean = defense.detection_scores(artifact, view.clean.images[:n],
                                                 view.clean.layers).cpu()
            truth = torch.cat([torch.zeros(len(clean)), torch.ones(len(scores))]).bool()
            out["detect_auroc"] = (auroc(torch.cat([clean, scores]), truth), n)
        return out

    return Metric("detector", probe, f"attacked-input detector {Path(path).name} "
                  f"({artifact.plugin}): detection rate and AUROC", relative=("detect_auroc",),
                  plugin=artifact.plugin, layers=True)


def eval(settings: Settings | None = None, *, attack_artifact: str | None = None,
         trigger: str | None = None, knn_bank: int = 2000, robust: str | None = None,
         options: Mapping[str, Any] | None = None, detector: str | None = None) -> dict:
    """Clean metrics of a model on a dataset; with ``attack_artifact``, its effect too.

    ``trigger`` is a targeted artifact (a backdoor's trigger spec): it is applied with its
    plugin and ``asr`` is reported next to clean top-1 (CA), always with the real trigger.
    ``robust`` names a per-image attack (``pgd``, ``apgd``, ``autoattack``) run with
    ``options`` against the model itself: ``robust_top1`` is the robust accuracy.
    ``detector`` is an attacked-input detector a defense saved (:func:`load_detector`).
    """
    if sum(bool(a) for a in (attack_artifact, trigger, robust)) > 1:
        raise UsageError("give one of --attack-artifact, --trigger and --robust")
    if options and not robust:
        raise UsageError("-o options go with --robust (the attack they configure)")
    s = settings or Settings()
    probes = [load_detector(detector)] if detector else []
    if robust:
        return _robust_eval(s, robust, options or {}, knn_bank, probes)
    started = time.perf_counter()
    loaded = load_artifact(trigger or attack_artifact, trigger=bool(trigger)) \
        if (attack_artifact or trigger) else None
    inputs = RunInputs(trigger=loaded[1] if trigger and loaded else None,
                       attack_artifact=loaded[1] if attack_artifact and loaded else None)
    ctx, model = _open("eval", None, s, inputs)
    with ctx.run:  # a failure marks the run failed before re-raising
        ds = _data(ctx, s, limit=s.limit)
        ctx.vet_texts(model, ds)
        if detector:
            ctx.set("detector", str(detector))
        ev = Evaluation(model, ds, ctx.cache, metrics=ctx.registry.metric_list() + probes,
                        bank=_bank(ctx, s, knn_bank), progress=ctx.progress)
        with ctx.timer("evaluate"):
            if loaded is None:
                rows = _measure(ev, ctx)
            else:
                atk, artifact = loaded
                ctx.set("trigger" if trigger else "attack_artifact", str(trigger or attack_artifact))
                ctx.set("plugin", artifact.plugin)
                ctx.record_plugin("attacks", type(atk))
                rows = _measure(ev, ctx, atk, artifact)
        return _finish(ctx, rows, started)


def _robust_eval(s: Settings, name: str, options: Mapping[str, Any], knn_bank: int,
                 probes: Sequence[Metric] = ()) -> dict:
    started = time.perf_counter()
    reg = get_registry()
    cls = reg.attack(name)
    if cls.universal:
        raise UsageError(f"--robust takes a per-image attack (pgd, apgd, autoattack), not "
                         f"the universal {name!r}")
    atk = cls(options)
    ctx, model = _open("eval", None, s)
    with ctx.run:
        ctx.record_plugin("attacks", cls)
        ctx.set("robust", name)
        ctx.set("options", atk.options_dict())
        ctx.run.fields["config"].update(robust=name, options=atk.options_dict())
        ds = _data(ctx, s, limit=s.limit)
        ctx.vet_texts(model, ds)
        ev = Evaluation(model, ds, ctx.cache, metrics=reg.metric_list() + list(probes),
                        bank=_bank(ctx, s, knn_bank), progress=ctx.progress)
        with ctx.timer("evaluate"), _culprit(reg, atk, "apply"):
            artifact = atk.run_fit(model, ds, ctx).artifact
            rows = ev.measure([ev.clean(), *ev.attacked(atk, artifact, condition="robust",
                                                        run=ctx)])
        return _finish(ctx, rows, started)


# --------------------------------------------------------------------------- attack
def attack(plugin: str, settings: Settings | None = None, *,
           options: Mapping[str, Any] | None = None, knn_bank: int = 2000) -> dict:
    """Fit attack ``plugin`` on the train split, save its artifact, measure it on ``split``."""
    s = settings or Settings()
    started = time.perf_counter()
    reg = get_registry()
    cls = reg.attack(plugin)
    atk = cls(options or {})  # bad options fail here, before any heavy work
    ctx, model = _open("attack", plugin, s)
    with ctx.run:  # a failure marks the run failed before re-raising
        _configure(ctx, atk, "attacks")
        train = _data(ctx, s, "train") if cls.universal else _data(ctx, s, limit=s.limit)
        test = _data(ctx, s, limit=s.limit)
        ctx.vet_texts(model, test)
        with ctx.timer("fit"), _culprit(reg, atk, "fit"):
            result = atk.run_fit(model, train, ctx)
        artifact = result.artifact
        artifact.source = {k: v for k, v in reg.provenance("attacks", cls).items()
                           if k in ("distribution", "version", "qualified")}
        path = artifact.save(ctx.artifacts_dir / f"{plugin}.safetensors")
        ctx.set("attack_artifact", str(path))
        victim = result.model
        if victim is not None:  # the attack changed the model itself (a backdoor implant)
            ctx.set("model_checkpoint", str(victim.save(ctx.artifacts_dir / "model.safetensors")))
        with ctx.timer("evaluate"):
            ev = Evaluation(victim or model, test, ctx.cache, metrics=reg.metric_list(),
                            bank=_bank(ctx, s, knn_bank), progress=ctx.progress)
            rows = _measure(ev, ctx, atk, artifact)
            if victim is not None:
                # the same trigger on the original model: the backdoor's baseline
                zero_shot = [m for m in reg.metric_list() if m.name == "zero_shot"]
                base = Evaluation(model, test, ctx.cache, metrics=zero_shot, label="original",
                                  progress=ctx.progress)
                rows += _measure(base, ctx, atk, artifact, with_control=False)
        return _finish(ctx, rows, started)


# --------------------------------------------------------------------------- defend
def defend(plugin: str, settings: Settings | None = None, *,
           options: Mapping[str, Any] | None = None, clean_items: int = 1000,
           trigger: str | None = None, attack_artifact: str | None = None) -> dict:
    """Apply defense ``plugin`` with a small clean train sample; save and measure the result.

    With ``trigger`` (a backdoor's trigger spec), clean top-1 (CA) and ASR with the real
    trigger are measured before and after; with ``attack_artifact`` (a patch, a UAP, ...),
    the attack's effect before and after. The defense receives either as
    ``run.inputs`` (a defense must not train on a trigger it is meant to find).
    """
    if attack_artifact and trigger:
        raise UsageError("give either --attack-artifact or --trigger, not both")
    s = settings or Settings()
    started = time.perf_counter()
    reg = get_registry()
    cls = reg.defense(plugin)
    dfn = cls(options or {})
    if clean_items < 1:
        raise UsageError(f"--clean-items {clean_items}: use a positive number of items")
    given = load_artifact(trigger or attack_artifact, trigger=bool(trigger), registry=reg) \
        if (trigger or attack_artifact) else None
    inputs = RunInputs(trigger=given[1] if trigger and given else None,
                       attack_artifact=given[1] if attack_artifact and given else None)
    ctx, model = _open("defend", plugin, s, inputs)
    with ctx.run:  # a failure marks the run failed before re-raising
        _configure(ctx, dfn, "defenses")
        ctx.run.fields["config"]["clean_items"] = clean_items
        if given is not None:
            ctx.set("trigger" if trigger else "attack_artifact", str(trigger or attack_artifact))
            ctx.record_plugin("attacks", type(given[0]))
        # a data defense cleans the training data itself: it gets the whole train split
        data_defense = getattr(cls, "kind", "repair") == "data"
        clean = _data(ctx, s, "train", None if data_defense else clean_items)
        test = _data(ctx, s, limit=s.limit)
        ctx.vet_texts(model, test)
        metrics = reg.metric_list()
        before = Evaluation(model, test, ctx.cache, metrics=metrics, label="before",
                            progress=ctx.progress)
        rows = _measure(before, ctx, *(given or (None, None)))
        with ctx.timer("defend"), _culprit(reg, dfn, "apply"):
            repaired = dfn.run_apply(model, clean, ctx)
        if data_defense:  # the model is unchanged: no copy of it, no second measurement
            return _finish(ctx, rows, started)
        ctx.set("model_checkpoint", str(repaired.save(ctx.artifacts_dir / "model.safetensors")))
        after = Evaluation(repaired, test, ctx.cache, metrics=metrics, label="after",
                           progress=ctx.progress)
        rows += _measure(after, ctx, *(given or (None, None)))
        return _finish(ctx, rows, started)


# --------------------------------------------------------------------------- recipes


def _recipe_root(out: str | Path | None, name: str) -> Path:
    """The recipe folder: ``--out`` (new or empty), else a fresh folder inside ./mmsec-runs.

    A folder that already holds files is refused: the steps' run folders and summary.md
    would overwrite what is there.
    """
    import re

    from .runs import DEFAULT_ROOT

    if out is not None:
        root = Path(out)
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root}: exists and is not a folder")
        if root.is_dir() and any(root.iterdir()):
            what = "a recipe run" if (root / "summary.md").exists() else "files"
            raise UsageError(f"{root}: already holds {what}; choose a new or empty --out")
        root.mkdir(parents=True, exist_ok=True)
        return root
    # the name comes from the file: keep only safe characters, so it stays one folder name
    # inside the runs root whatever the recipe says (no "..", no "/")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")[:64] or "recipe"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    DEFAULT_ROOT.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        suffix = "" if attempt == 1 else f"-{attempt}"
        root = DEFAULT_ROOT / f"{stamp}-recipe-{slug}{suffix}"
        try:
            root.mkdir()
        except FileExistsError:
            continue
        return root
    raise MmsecError(f"{DEFAULT_ROOT}: cannot make a fresh recipe folder")


def run_recipe(path: str | Path, *, out: str | Path | None = None, quiet: bool = False,
               loggers: Sequence[str] | None = None) -> dict:
    """Run every step of a YAML recipe in order; returns ``{"dir", "steps": [results...],
    "summary", "html"}`` (``html``: the recipe folder's report.html). ``loggers``: the
    steps' scalar back-ends (see :class:`Settings`)."""
    from .htmlreport import write_html_report
    from .options import validate_options
    from .recipes import load_recipe
    from .report import merge_runs, write_report_table

    recipe = load_recipe(path)
    reg = get_registry()
    steps = list(recipe.resolved_steps())
    kinds = {st.id: st for st in steps}
    for st in steps:  # validate everything before running anything
        source = kinds.get(st.model_from) if st.model_from else None
        if source is not None and source.kind == "attack" \
                and getattr(reg.attack(source.plugin), "changes_model", None) is False:
            raise UsageError(f'{st.label}: model_from names step "{source.id}", whose attack '
                             f'"{source.plugin}" writes no model (only attacks that change the '
                             "model, such as backdoor, and defenses do)")
        if st.kind in ("attack", "defend") or st.robust:
            name = st.robust or st.plugin
            cls = reg.defense(name) if st.kind == "defend" else reg.attack(name)
            validate_options(cls.Options, st.options, owner=f'{st.label}: plugin "{name}"')
    root = _recipe_root(out, recipe.name or Path(path).stem)
    produced: dict[str, dict] = {}
    results = []
    done: list[Path] = []
    failure: tuple[Any, BaseException] | None = None
    for st in steps:
        model, pretrained = st.model, st.pretrained
        if st.model_from:
            ckpt = produced[st.model_from].get("model_checkpoint")
            if not ckpt:
                raise UsageError(f"{st.label}: step {st.model_from!r} wrote no model")
            model, pretrained = None, ckpt
        s = Settings(model=model, pretrained=pretrained, data=st.data, split=st.split,
                     device=st.device, precision=st.precision, seed=st.seed, limit=st.limit,
                     out=root / st.id, quiet=quiet, image_size=st.image_size,
                     compile=st.compile, channels_last=st.channels_last,
                     loggers=None if loggers is None else tuple(loggers))
        art = produced[st.artifact_from].get("attack_artifact") if st.artifact_from else None
        trig = produced[st.trigger_from].get("attack_artifact") if st.trigger_from else None
        try:
            if st.kind == "attack":
                res = attack(st.plugin, s, options=st.options, knn_bank=st.knn_bank)
            elif st.kind == "defend":
                res = defend(st.plugin, s, options=st.options, trigger=trig,
                             attack_artifact=art, clean_items=st.clean_items)
            else:
                res = eval(s, attack_artifact=art, trigger=trig, knn_bank=st.knn_bank,
                           robust=st.robust, options=st.options or None)
        except (KeyboardInterrupt, Exception) as exc:  # the summary still gets written
            failure = (st, exc)
            if (root / st.id / "results.json").is_file():
                done.append(root / st.id)
            break
        produced[st.id] = res
        results.append(res)
        done.append(root / st.id)
    rows, columns = merge_runs(done) if done else ([], ["run", "kind", "plugin", "status"])
    table = write_report_table(rows, root / "summary.csv", md=True, columns=columns)
    from .io import write_atomic

    title = f"Recipe {recipe.name or Path(path).name}"
    html = None
    links = ""
    if done:  # the HTML comparison of the steps; summary.md links the same plots
        written = write_html_report(done, root / "report.html", title=title,
                                    figures_dir=root / "figures")
        html = str(written["html"])
        links = "".join(f"\n![{stem}](figures/{stem}.png)\n" for stem in written["figures"])
        links += "\nThe same with every run's images and curves: [report.html](report.html)\n"
    write_atomic(root / "summary.md", f"# {title}\n\n{table}\n{links}")
    # the console gets the headline columns only; summary.md/.csv keep every metric
    present = {k for row in rows for k, v in row.items() if v not in (None, "")}
    short = [c for c in ("run", "kind", "plugin", "status") if c in columns]
    short += [c for c in HEADLINE_METRICS if c in present]
    headline = write_report_table(rows, None, md=True, columns=short)
    if failure is not None:
        st, exc = failure
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        raise (type(exc) if isinstance(exc, MmsecError) else MmsecError)(
            f"{st.label} failed ({len(results)} of {len(steps)} steps done; summary in "
            f"{root / 'summary.md'}): {exc}") from exc
    return {"dir": str(root), "steps": results, "summary": headline, "summary_full": table,
            "html": html}


def encode_cache(settings: Settings | None = None, *, workers: int | None = None,
                 batch_size: int = 256, flush_every: int = 16384, progress: bool = True):
    """Fill the embedding cache with the image embeddings of ``settings``' model and data
    (all of the split, or ``limit`` items); no run folder. Returns an
    :class:`mmsec.evaluation.embed.EncodeReport` (items, encoded now, already cached,
    skipped corrupt, img/s). A run killed part-way keeps every shard it wrote: running it
    again encodes the rest."""
    from .evaluation.embed import fill_cache

    s = settings or Settings()
    check_settings(s)
    reg = get_registry()
    model = reg.load_model(s.model, s.pretrained, device=s.device, precision=s.precision)
    if s.image_size is None and parse_spec(s.data)[0] in _FILE_SOURCES:
        s.image_size = int(model.image_size)  # as every other command loads them
    cache = EmbeddingCache()
    ds = reg.load_dataset(s.data, split=s.split, seed=s.seed, strict=s.strict, n=s.limit,
                          **_size(s))
    ds = subset(ds, s.limit, seed=s.seed)
    return fill_cache(model, ds, cache, batch_size=batch_size, workers=workers,
                      progress=progress and not s.quiet, flush_every=flush_every,
                      strict=s.strict)
