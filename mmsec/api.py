"""The Python API behind every CLI command: eval, attack, defend, recipes.

Each function loads the model and data, opens one run folder, calls the plugin,
measures, and returns the run's ``results.json`` content::

    from mmsec import api
    res = api.attack("pgd", options={"eps": "2/255"})
    res["metrics"]["adv_top1"]
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import evaluate
from .attacks import Artifact
from .cache import EmbeddingCache
from .context import RunContext
from .data import ImageDataset, load_dataset, subset
from .errors import MmsecError, UsageError
from .model import ClipModel, load_model, pick_device
from .plugins import get_registry
from .runs import Run
from .train import seed_everything


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
    extra: dict[str, Any] = field(default_factory=dict)


def _plugin_version(cls: type) -> str | None:
    reg = get_registry()
    for kind in ("attacks", "defenses"):
        owner = reg.owner.get((kind, cls.name))
        if owner:
            return cls.version or reg.plugins[owner].version
    return cls.version


def _open(kind: str, plugin: str | None, s: Settings) -> tuple[RunContext, ClipModel]:
    seed_everything(s.seed)
    started = time.perf_counter()
    # The model loads before the run folder exists: a wrong checkpoint leaves nothing behind.
    model = load_model(s.model, s.pretrained, device=s.device, precision=s.precision)
    run = Run.create(s.out, kind, plugin, resume=s.resume, quiet=s.quiet)
    run.durations["load_model"] = round(time.perf_counter() - started, 3)
    ctx = RunContext(run, device=pick_device(s.device), precision=s.precision, seed=s.seed,
                     cache=EmbeddingCache(), registry=get_registry(), strict=s.strict)
    for key, value in (("model", model.name), ("pretrained", model.pretrained),
                       ("model_fingerprint", model.fingerprint), ("dataset", s.data or "procedural"),
                       ("split", s.split), ("seed", s.seed), ("device", str(ctx.device)),
                       ("precision", s.precision)):
        run.set(key, value)
    return ctx, model


def _data(s: Settings, split: str | None = None, limit: int | None = None,
          ctx: RunContext | None = None) -> ImageDataset:
    # ``n`` lets generated sources (procedural) render only what is used; others ignore it.
    ds = load_dataset(s.data, split=split or s.split, seed=s.seed, strict=s.strict, n=limit)
    ds = subset(ds, limit, seed=s.seed)
    if ctx is not None and ds.skipped:
        ctx.set("skipped_count", ctx.get("skipped_count", 0) + ds.skipped)
        ctx.log.warning("%d corrupt item(s) skipped in %s", ds.skipped, ds.describe())
    return ds


def _finish(ctx: RunContext, metrics: Mapping[str, float], started: float) -> dict:
    ctx.set("images_encoded", ctx.cache.stats.encoded_by_kind.get("image", 0))
    ctx.set("texts_encoded", ctx.cache.stats.encoded_by_kind.get("text", 0))
    ctx.set("cache_hits", ctx.cache.stats.hits)
    ctx.durations["total"] = round(time.perf_counter() - started, 3)
    results = ctx.run.finish(dict(metrics))
    ctx.run.close()
    return results


def _bank(s: Settings, ctx: RunContext, n: int) -> ImageDataset | None:
    """A labelled train-split sample for kNN metrics (None when the data has no train split)."""
    if n <= 0:
        return None
    try:
        ds = _data(s, "train", n)
    except (UsageError, MmsecError):
        return None
    return ds if ds.classnames else None


def _load_artifact(path: str | Path, *, trigger: bool = False) -> tuple[Any, Artifact]:
    """``(attack plugin instance, artifact)`` for a saved artifact; ``trigger``: must be targeted."""
    artifact = Artifact.load(path)
    if trigger and "target_name" not in artifact.meta and "target" not in artifact.meta:
        raise UsageError(f"{path}: not a trigger spec (the artifact has no target)")
    return get_registry().attack(artifact.plugin)(artifact.meta.get("options", {})), artifact


# --------------------------------------------------------------------------- eval
def eval(settings: Settings | None = None, *, attack_artifact: str | None = None,
         trigger: str | None = None, knn_bank: int = 2000) -> dict:
    """Clean metrics of a model on a dataset; with ``attack_artifact``, its effect too.

    ``trigger`` is a targeted artifact (a backdoor's trigger spec): it is applied with
    its plugin and ``clean_acc`` (CA) and ``asr`` are reported, always with the real trigger.
    """
    if attack_artifact and trigger:
        raise UsageError("give either --attack-artifact or --trigger, not both")
    s = settings or Settings()
    started = time.perf_counter()
    ctx, model = _open("eval", None, s)
    with ctx.run:  # a failure marks the run failed before re-raising
        ds = _data(s, limit=s.limit, ctx=ctx)
        bank = _bank(s, ctx, knn_bank)
        with ctx.timer("evaluate"):
            metrics = evaluate.evaluate_model(model, ds, ctx.cache, bank=bank,
                                              progress=not s.quiet)
        if attack_artifact or trigger:
            atk, artifact = _load_artifact(trigger or attack_artifact, trigger=bool(trigger))
            ctx.set("trigger" if trigger else "attack_artifact", str(attack_artifact or trigger))
            ctx.set("plugin", artifact.plugin)
            with ctx.timer("attack_eval"):
                metrics.update(evaluate.evaluate_attack(
                    model, ds, atk, artifact, ctx.cache, control=atk.control(artifact, s.seed),
                    bank=bank, progress=ctx.progress))
        return _finish(ctx, metrics, started)


# --------------------------------------------------------------------------- attack
def attack(plugin: str, settings: Settings | None = None, *,
           options: Mapping[str, Any] | None = None, knn_bank: int = 2000) -> dict:
    """Fit attack ``plugin`` on the train split, save its artifact, measure it on ``split``."""
    s = settings or Settings()
    started = time.perf_counter()
    cls = get_registry().attack(plugin)
    atk = cls(options or {})  # bad options fail here, before any heavy work
    ctx, model = _open("attack", plugin, s)
    with ctx.run:  # a failure marks the run failed before re-raising
        ctx.set("plugin_version", _plugin_version(cls))
        ctx.set("options", atk.options.model_dump())
        ctx.set("config", {"kind": "attack", "plugin": plugin, "options": atk.options.model_dump(),
                           **{k: v for k, v in vars(s).items() if k not in ("extra",)}})
        train = _data(s, "train", ctx=ctx) if cls.universal else _data(s, limit=s.limit, ctx=ctx)
        test = _data(s, limit=s.limit, ctx=ctx)
        with ctx.timer("fit"):
            artifact = atk.fit(model, train, ctx)
        if artifact.tensors or cls.universal:
            artifact.meta.setdefault("options", atk.options.model_dump())
            path = artifact.save(ctx.artifacts_dir / f"{plugin}.safetensors")
            ctx.set("attack_artifact", str(path))
        bank = _bank(s, ctx, knn_bank)
        control = atk.control(artifact, s.seed)
        victim = artifact.runtime.get("backdoored_model")
        if victim is not None:  # the attack changed the model itself (a backdoor implant)
            path = victim.save(ctx.artifacts_dir / "model.safetensors")
            ctx.set("model_checkpoint", str(path))
        with ctx.timer("evaluate"):
            metrics = evaluate.evaluate_attack(victim or model, test, atk, artifact, ctx.cache,
                                               control=control, bank=bank, progress=ctx.progress)
            if victim is not None:
                # the same trigger on the original model: the backdoor's baseline
                base = evaluate.evaluate_attack(model, test, atk, artifact, ctx.cache,
                                                progress=ctx.progress)
                metrics.update({f"original_{k}": v for k, v in base.items()
                                if k in ("clean_acc", "asr", "clean_top1", "adv_top1")})
        metrics.update(artifact.runtime.get("metrics", {}))
        return _finish(ctx, metrics, started)


# --------------------------------------------------------------------------- defend
def defend(plugin: str, settings: Settings | None = None, *,
           options: Mapping[str, Any] | None = None, clean_items: int = 1000,
           trigger: str | None = None) -> dict:
    """Apply defense ``plugin`` with a small clean train sample; save and measure the result.

    With ``trigger`` (a backdoor's trigger spec), CA and ASR with the real trigger are
    measured before and after. The defense itself never sees the trigger.
    """
    s = settings or Settings()
    started = time.perf_counter()
    cls = get_registry().defense(plugin)
    dfn = cls(options or {})
    ctx, model = _open("defend", plugin, s)
    with ctx.run:  # a failure marks the run failed before re-raising
        ctx.set("plugin_version", _plugin_version(cls))
        ctx.set("options", dfn.options.model_dump())
        ctx.set("config", {"kind": "defend", "plugin": plugin, "options": dfn.options.model_dump(),
                           **{k: v for k, v in vars(s).items() if k not in ("extra",)}})
        clean = _data(s, "train", clean_items, ctx=ctx)
        test = _data(s, limit=s.limit, ctx=ctx)
        before = evaluate.evaluate_model(model, test, ctx.cache, progress=not s.quiet)
        trig = _load_artifact(trigger, trigger=True) if trigger else None
        if trig is not None:
            ctx.set("trigger", str(trigger))
            before.update(evaluate.evaluate_attack(model, test, *trig, ctx.cache,
                                                   progress=ctx.progress))
        with ctx.timer("defend"):
            repaired = dfn.apply(model, clean, ctx)
        path = repaired.save(ctx.artifacts_dir / "model.safetensors")
        ctx.set("model_checkpoint", str(path))
        after = evaluate.evaluate_model(repaired, test, ctx.cache, progress=not s.quiet)
        if trig is not None:
            after.update(evaluate.evaluate_attack(repaired, test, *trig, ctx.cache,
                                                  progress=ctx.progress))
        metrics = {**{f"before_{k}": v for k, v in before.items()},
                   **{f"after_{k}": v for k, v in after.items()}, **ctx.metrics}
        return _finish(ctx, metrics, started)


# --------------------------------------------------------------------------- recipes
def run_recipe(path: str | Path, *, out: str | Path | None = None, quiet: bool = False) -> dict:
    """Run every step of a YAML recipe in order; returns ``{"dir", "steps": [results...]}``."""
    from .options import validate_options
    from .recipes import load_recipe
    from .runs import DEFAULT_ROOT, merge_runs, write_report_table

    recipe = load_recipe(path)
    reg = get_registry()
    steps = list(recipe.resolved_steps())
    for st in steps:  # validate everything before running anything
        if st.kind in ("attack", "defend"):
            cls = reg.attack(st.plugin) if st.kind == "attack" else reg.defense(st.plugin)
            validate_options(cls.Options, st.options, owner=f'{st.label}: plugin "{st.plugin}"')
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    root = Path(out) if out else DEFAULT_ROOT / f"{stamp}-recipe-{recipe.name or Path(path).stem}"
    root.mkdir(parents=True, exist_ok=True)
    produced: dict[str, dict] = {}
    results = []
    for st in steps:
        model, pretrained = st.model, st.pretrained
        if st.model_from:
            ckpt = produced[st.model_from].get("model_checkpoint")
            if not ckpt:
                raise UsageError(f"{st.label}: step {st.model_from!r} wrote no model")
            model, pretrained = None, ckpt
        s = Settings(model=model, pretrained=pretrained, data=st.data, split=st.split,
                     device=st.device, precision=st.precision, seed=st.seed,
                     out=root / st.id, quiet=quiet)
        art = produced[st.artifact_from].get("attack_artifact") if st.artifact_from else None
        trig = produced[st.trigger_from].get("attack_artifact") if st.trigger_from else None
        if st.kind == "attack":
            res = attack(st.plugin, s, options=st.options)
        elif st.kind == "defend":
            res = defend(st.plugin, s, options=st.options, trigger=trig)
        else:
            res = eval(s, attack_artifact=art, trigger=trig)
        produced[st.id] = res
        results.append(res)
    rows, columns = merge_runs([root / st.id for st in steps])
    table = write_report_table(rows, root / "summary.csv", md=True, columns=columns)
    (root / "summary.md").write_text(f"# Recipe {recipe.name or Path(path).name}\n\n{table}\n")
    # the console gets the headline columns only; summary.md/.csv keep every metric
    present = {k for row in rows for k, v in row.items() if v not in (None, "")}
    short = [c for c in ("run", "kind", "plugin", "status") if c in columns]
    short += [c for c in HEADLINE_METRICS if c in present]
    headline = write_report_table(rows, None, md=True, columns=short)
    return {"dir": str(root), "steps": results, "summary": headline, "summary_full": table}


#: metrics ``mmsec run`` prints per step (the rest is in the recipe folder's summary.md)
HEADLINE_METRICS = ("clean_top1", "adv_top1", "fooling_rate", "control_fooling_rate",
                    "clean_acc", "asr", "control_asr", "before_clean_acc", "after_clean_acc",
                    "before_asr", "after_asr", "target_identified")


def model_info(model: ClipModel) -> dict:
    return {"name": model.name, "pretrained": model.pretrained, "image_size": model.image_size,
            "fingerprint": model.fingerprint, "layers": model.layer_names(),
            "params": sum(p.numel() for p in model.parameters()),
            "device": str(model.device), "dtype": str(next(model.parameters()).dtype),
            "cuda": torch.cuda.is_available()}
