"""The ``mmsec`` command line: parse, call ``mmsec.api``, print. Nothing else lives here.

User errors print one line and exit 2 (usage) or 1 (runtime); set
``MMSEC_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import MmsecError, UsageError, one_line

log = logging.getLogger("mmsec")


def _debug() -> bool:
    return os.environ.get("MMSEC_DEBUG", "") not in ("", "0")


def _disk_full(exc: BaseException) -> str | None:
    """The one error line for a full disk (or quota) anywhere in ``exc``'s chain, else None."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            return (f"Error: the disk is full ({exc.strerror or 'no space left'}){where}; "
                    "free some space, then run again (with --resume where there is one)")
        exc = exc.__cause__ or exc.__context__
    return None


def handle_errors(fn):
    """Turn mmsec errors (and unexpected ones) into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except MmsecError as exc:
            if _debug():
                raise
            full = _disk_full(exc)
            if full is not None:
                click.echo(full, err=True)
                sys.exit(1)
            click.echo(f"Error: {one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except Exception as exc:  # the last line of defence: no traceback for users
            if _debug():
                raise
            full = _disk_full(exc)
            if full is not None:
                click.echo(full, err=True)
                sys.exit(1)
            first = one_line(str(exc).splitlines()[0]) if str(exc).strip() else ""
            click.echo(f"Error: {type(exc).__name__}: {first} (set MMSEC_DEBUG=1 for the "
                       "traceback)", err=True)
            sys.exit(1)

    return wrapper


log_option = click.option(
    "--log", "loggers", type=click.Choice(["tensorboard", "wandb", "none"]), multiple=True,
    help="training scalars also to TensorBoard or W&B (repeatable; scalars.jsonl is always "
         "written; default: tensorboard when installed, none: JSONL only)")


def _loggers(values) -> tuple[str, ...] | None:
    """``--log`` values: None (the default back-ends) when not given; ``none`` alone: none."""
    if not values:
        return None
    return tuple(v for v in values if v != "none")


def _model_data_opts() -> list:
    """-m, --pretrained, -d, --split, --image-size, --limit, --device, --precision, --seed."""
    return [
        click.option("-m", "--model", default=None,
                     help="open_clip architecture or zoo:NAME (default: the embedded zoo model)"),
        click.option("--pretrained", default=None,
                     help="pretrained tag (open_clip) or checkpoint FILE (.safetensors/.pt)"),
        click.option("-d", "--data", default=None,
                     help="dataset NAME[:ARG] or a path (default: procedural); see `mmsec datasets`"),
        click.option("--split", default="test", show_default=True, help="evaluation split"),
        click.option("--image-size", type=click.IntRange(min=8, max=4096), default=None,
                     help="load file-backed images at N x N pixels (default: the model's "
                          "input size; the model still resizes to its own input)"),
        click.option("--limit", type=int, default=None, help="evaluate on N items only"),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda[:N], mps"),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                     show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
    ]


def model_data_options(fn):
    """The model and data options alone (``mmsec cache encode``)."""
    for opt in reversed(_model_data_opts()):
        fn = opt(fn)
    return fn


def common_options(fn):
    """Options shared by eval, attack and defend."""
    opts = [
        *_model_data_opts(),
        click.option("--compile", "compile_", is_flag=True,
                     help="run the image tower through torch.compile (compiled at the first "
                          "batch; eager, with a warning, where compiling fails)"),
        click.option("--channels-last", is_flag=True,
                     help="the image tower in channels-last memory format (pays for "
                          "convolutional towers on the CPU; embeddings differ by ~1e-7)"),
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="run folder (default: ./mmsec-runs/<time>-<kind>-<plugin>)"),
        click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint"),
        click.option("--strict", is_flag=True, help="fail on a corrupt image instead of skipping it"),
        click.option("--json", "as_json", is_flag=True, help="print the run's results.json"),
        click.option("-q", "--quiet", is_flag=True, help="only warnings on stderr"),
        log_option,
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _settings_quiet(quiet: bool) -> None:
    if quiet:  # -q: plugin load problems stay in `mmsec plugins`, not on every command
        logging.getLogger("mmsec.plugins").setLevel(logging.ERROR)


def _settings(kw: dict):
    from .api import Settings

    _settings_quiet(kw.get("quiet", False))
    return Settings(model=kw["model"], pretrained=kw["pretrained"], data=kw["data"],
                    split=kw["split"], device=kw["device"], precision=kw["precision"],
                    seed=kw["seed"], out=kw["out"], resume=kw["resume"], strict=kw["strict"],
                    limit=kw["limit"], quiet=kw["quiet"], image_size=kw.get("image_size"),
                    compile=kw.get("compile_", False),
                    channels_last=kw.get("channels_last", False),
                    loggers=_loggers(kw.get("loggers")))


def _print_results(res: dict, as_json: bool) -> None:
    """The run's headline and where its report is (``--json``: the whole results.json)."""
    from .headline import headline

    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(headline(res).text())
    folder = Path(res.get("run_dir") or res.get("dir", ""))
    n = len(res.get("metrics") or {})
    click.echo(f"report: {folder / 'report.md'}  ({n} metrics in {folder / 'results.json'})")


def _setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("mmsec").setLevel(logging.WARNING if quiet else logging.INFO)


option_pairs = click.option(
    "-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
    help="plugin option (repeatable), e.g. -o eps 4/255")
plugin_option = click.option("-p", "--plugin", required=True,
                             help="plugin name, or DIST:NAME to choose a distribution's "
                                  "(`mmsec plugins`)")


class MmsecGroup(click.Group):
    """A group that adds plugin commands (``register_commands``) only when they are asked for."""

    _plugins_loaded = False

    def _load_plugins(self) -> None:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            _load_plugin_commands(self)

    def get_command(self, ctx: click.Context, name: str):
        cmd = super().get_command(ctx, name)
        if cmd is None:
            self._load_plugins()
            cmd = super().get_command(ctx, name)
        return cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugins()
        return super().list_commands(ctx)


@click.group(cls=MmsecGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mmsec")
def main() -> None:
    """mmsec: attacks, defenses and metrics for CLIP models, extensible by plugins."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        # torchrun: the other processes print nothing (errors still reach stderr); read
        # from the environment, not mmsec.distributed, to keep torch out of the CLI import
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the process's lifetime
        _setup_logging(quiet=True)
        return
    _setup_logging()


@main.command("eval")
@common_options
@click.option("--attack-artifact", type=click.Path(), default=None,
              help="apply a saved attack artifact (e.g. a patch) and measure its effect")
@click.option("--trigger", type=click.Path(), default=None,
              help="a backdoor trigger spec: report clean accuracy (CA) and ASR with it")
@click.option("--knn-bank", type=int, default=2000, show_default=True,
              help="train items used as the kNN bank (0: no kNN metrics)")
@click.option("--robust", default=None, metavar="ATTACK",
              help="robust accuracy under a per-image attack: pgd, apgd, autoattack "
                   "(its options with -o, e.g. -o eps 4/255)")
@click.option("--detector", type=click.Path(), default=None,
              help="an attacked-input detector saved by a defense (grace): its detection "
                   "rate on every view and AUROC against the clean one")
@option_pairs
@handle_errors
def eval_cmd(attack_artifact, trigger, knn_bank, robust, detector, options, as_json, **kw):
    """Measure a model on a dataset (zero-shot, kNN, retrieval); optionally under an attack."""
    from . import api
    from .options import parse_cli_pairs

    _print_results(api.eval(_settings(kw), attack_artifact=attack_artifact, trigger=trigger,
                            knn_bank=knn_bank, robust=robust, detector=detector,
                            options=parse_cli_pairs(options)), as_json)


@main.command("attack")
@plugin_option
@option_pairs
@common_options
@click.option("--knn-bank", type=int, default=2000, show_default=True,
              help="train items used as the kNN bank (0: no kNN metrics)")
@handle_errors
def attack_cmd(plugin, options, knn_bank, as_json, **kw):
    """Fit an attack plugin and measure it against a control."""
    from . import api
    from .options import parse_cli_pairs

    _print_results(api.attack(plugin, _settings(kw), options=parse_cli_pairs(options),
                              knn_bank=knn_bank), as_json)


@main.command("defend")
@plugin_option
@option_pairs
@common_options
@click.option("--clean-items", type=int, default=1000, show_default=True,
              help="clean train items the defense may use")
@click.option("--trigger", type=click.Path(), default=None,
              help="the backdoor's trigger spec: CA and ASR before/after (the defense must not "
                   "train on it)")
@click.option("--attack-artifact", type=click.Path(), default=None,
              help="an attack's artifact (a patch, a UAP): its effect before/after; the "
                   "defense receives it as run.inputs.attack_artifact")
@handle_errors
def defend_cmd(plugin, options, clean_items, trigger, attack_artifact, as_json, **kw):
    """Apply a defense plugin to a model and measure before/after."""
    from . import api
    from .options import parse_cli_pairs

    _print_results(api.defend(plugin, _settings(kw), options=parse_cli_pairs(options),
                              clean_items=clean_items, trigger=trigger,
                              attack_artifact=attack_artifact), as_json)


@main.command("run")
@click.argument("recipe", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None, help="folder for all steps")
@click.option("--json", "as_json", is_flag=True, help="print every step's results")
@click.option("-q", "--quiet", is_flag=True)
@log_option
@handle_errors
def run_cmd(recipe, out, as_json, quiet, loggers):
    """Run a YAML recipe: a chain of attack / defend / eval steps (format: docs/recipes.md)."""
    from . import api

    _settings_quiet(quiet)
    res = api.run_recipe(recipe, out=out, quiet=quiet, loggers=_loggers(loggers))
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(res["summary"])
        click.echo(f"recipe folder: {res['dir']}")
        if res.get("html"):
            click.echo(f"report: {res['html']}")


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def plugins_cmd(as_json):
    """List plugins: name, what they register, distribution and version; failures by name."""
    from .options import describe_options
    from .registry import get_registry

    reg = get_registry()
    root = click.get_current_context().find_root().command
    if isinstance(root, MmsecGroup):
        root._load_plugins()  # so plugin commands (and their failures) are listed too
    rows = [p.as_dict() for p in reg.plugins.values()]
    for row in rows:
        for kind in ("attacks", "defenses"):
            for name in row["items"].get(kind, []):
                cls = getattr(reg, kind)[name]
                row.setdefault("descriptions", {})[name] = cls.description
                row.setdefault("options", {})[name] = describe_options(cls.Options)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        what = "; ".join(f"{k}: {', '.join(v)}" for k, v in r["items"].items()) or "-"
        src = f"{r['distribution'] or '?'} {r['version'] or ''}".strip()
        status = f"  FAILED: {r['error']}" if r["error"] else ""
        refused = "".join(f"\n{'':<14} REFUSED: {note}" for note in r["refused"])
        click.echo(f"{r['name']:<14} {src:<22} {what}{status}{refused}")


@main.group("plugin")
def plugin_group() -> None:
    """Write your own plugin: `mmsec plugin new NAME --kind attack`."""


@plugin_group.command("new")
@click.argument("name")
@click.option("--kind", type=click.Choice(["attack", "defense", "dataset", "metric"]),
              default="attack", show_default=True, help="what the plugin registers")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="where to write the package (default: ./mmsec-NAME)")
@handle_errors
def plugin_new(name, kind, directory):
    """Write a complete plugin package (pyproject, a working method, tests, README)."""
    from .scaffold import new_plugin

    root = new_plugin(name, kind, directory)
    click.echo(f"wrote {root}/ ({kind} plugin {name!r}). Next:\n"
               f"  pip install -e {root}[test] && pytest {root}\n"
               f"  mmsec plugins   # lists {name}")


@main.command("models")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="also list every open_clip architecture")
@handle_errors
def models_cmd(as_json, show_all):
    """List the zoo models and (with --all) open_clip architectures with pretrained tags."""
    from .registry import get_registry

    out = {}
    for name, src in get_registry().models.items():
        if name == "open_clip" and not show_all and not as_json:
            continue
        out[name] = [{"name": m, "pretrained": tags} for m, tags in src.list_fn()]
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for src, models in out.items():
        click.echo(f"[{src}]")
        for m in models:
            tags = ", ".join(m["pretrained"][:4]) + (" ..." if len(m["pretrained"]) > 4 else "")
            click.echo(f"  {m['name']:<36} {tags}")
    if not show_all:
        click.echo("(open_clip architectures: mmsec models --all)")


@main.command("datasets")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def datasets_cmd(as_json):
    """List data sources usable with -d."""
    from .registry import get_registry

    rows = [{"name": d.name, "description": d.description, "needs_arg": d.needs_arg,
             "plugin": d.plugin} for d in get_registry().datasets.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        usage = f"{r['name']}:PATH" if r["needs_arg"] else r["name"]
        click.echo(f"{usage:<22} {r['description']}")


@main.group("cache")
def cache_group() -> None:
    """Inspect, fill or clear the embedding cache ($MMSEC_CACHE_DIR)."""


@cache_group.command("info")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def cache_info(as_json):
    from .cache import EmbeddingCache

    info = EmbeddingCache().info()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"cache: {info['directory']}")
    click.echo(f"items: {info['items']}  bytes: {info['bytes']}")
    for ns in info["namespaces"]:
        click.echo(f"  {ns['fingerprint']}/{ns['kind']}: {ns['items']} items, dim {ns['dim']}, "
                   f"{ns['shards']} shard(s)")


@cache_group.command("clear")
@click.option("--fingerprint", default=None, help="only this model's embeddings")
@handle_errors
def cache_clear(fingerprint):
    from .cache import EmbeddingCache

    freed = EmbeddingCache().clear(fingerprint)
    click.echo(f"freed {freed} bytes")


@cache_group.command("encode")
@model_data_options
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="image-decoding worker processes (default: min(8, CPUs - 1); 0 for "
                   "in-memory data)")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--flush-every", type=click.IntRange(min=1), default=16384, show_default=True,
              help="write a shard every N new items (also every 2 minutes): a killed run "
                   "loses at most that much")
@click.option("--strict", is_flag=True, help="fail on a corrupt image instead of skipping it "
              "(one found while encoding: once everything else is cached)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar; warnings only")
@handle_errors
def cache_encode(workers, batch_size, flush_every, strict, quiet, **kw):
    """Fill the cache with a dataset's image embeddings (streamed; resumes after a kill)."""
    from .api import Settings, encode_cache

    _setup_logging(quiet)
    _settings_quiet(quiet)
    settings = Settings(model=kw["model"], pretrained=kw["pretrained"], data=kw["data"],
                        split=kw["split"], device=kw["device"], precision=kw["precision"],
                        seed=kw["seed"], strict=strict, limit=kw["limit"], quiet=quiet,
                        image_size=kw["image_size"])
    report = encode_cache(settings, workers=workers, batch_size=batch_size,
                          flush_every=flush_every)
    click.echo(report.line())



@main.group("zoo")
def zoo_group() -> None:
    """The embedded models: list them, or train (reproduce) one."""


@zoo_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def zoo_list(as_json):
    """The zoo models: shipped ones, then yours ($MMSEC_ZOO or the user data folder)."""
    from .model import ZOO_DIR, user_zoo_dirs, zoo_entries

    rows = []
    for name, path in zoo_entries():
        spec = json.loads(path.read_text())
        rows.append({"model": f"zoo:{name}", "dataset": spec.get("dataset"),
                     "metrics": spec.get("metrics", {}), "shipped": path.parent == ZOO_DIR,
                     "path": str(path.with_suffix(".safetensors")),
                     "description": spec.get("description", "")})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        m = r["metrics"]
        score = (f"zero-shot top-1 {m['zero_shot_top1']}" if "zero_shot_top1" in m else
                 f"i2t/t2i R@1 {m.get('i2t_r1')}/{m.get('t2i_r1')}")
        where = "shipped" if r["shipped"] else r["path"]
        click.echo(f"{r['model']:<16} {str(r['dataset']):<28} {score:<24} {where}")
    click.echo(f"user zoo: {', '.join(str(d) for d in user_zoo_dirs())} (MMSEC_ZOO)")


def _zoo_name_from(data: str | None) -> str:
    import re

    from .data.sources import parse_spec

    if not data:
        return "shapes"
    source, arg = parse_spec(data)
    if source == "fashion-mnist" and not arg:
        return "fashion"
    stem = Path(arg).expanduser().resolve().name if arg else source
    stem = Path(stem).stem if "." in stem else stem
    return re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-") or source


def _check_zoo_train_ranges(**values) -> None:
    """`mmsec zoo train`'s numbers, checked before anything is read or written: one line,
    exit 2 (a 0 or negative count used to train the default schedule, a NaN learning rate
    to fail deep in the optimiser)."""
    import math

    from .api import MAX_SEED

    limits = {"epochs": (1, None), "steps": (1, None), "min_steps": (0, None),
              "batch_size": (2, 65536), "image_size": (32, 1024), "seed": (0, MAX_SEED),
              "train_items": (2, None), "test_items": (1, None)}
    for key, (low, high) in limits.items():
        value = values[key]
        if value is not None and (value < low or (high is not None and value > high)):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise UsageError(f"--{key.replace('_', '-')} {value}: use an integer {span}")
    lr = values["lr"]
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr {lr}: use a positive finite learning rate (e.g. 1e-3)")


@zoo_group.command("train")
@click.option("--name", default=None, help="model name (default: shapes, fashion for "
              "fashion-mnist, else the data's folder or file name)")
@click.option("-d", "--data", default=None,
              help="any dataset: procedural, fashion-mnist, imagefolder:DIR, captions:FILE, ...")
@click.option("--image-size", type=int, default=None,
              help="input size, a multiple of 32 (default: 32 for small images, else 64)")
@click.option("--vocab", type=click.Choice(["data", "full"]), default="data", show_default=True,
              help="data: the training texts' words only (small); full: open_clip's BPE "
                   "(reads any word)")
@click.option("--epochs", type=int, default=None, help="passes over the data")
@click.option("--steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
@click.option("--min-steps", type=int, default=None,
              help="at least this many steps (default 600 for your data)")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--augment", type=click.Choice(["none", "flip", "crop"]), default=None,
              help="image augmentation (default: crop for your data)")
@click.option("--early-stop/--no-early-stop", default=None,
              help="stop when the held-out score plateaus (default: on for your data)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--train-items", type=int, default=None, help="train on N items only")
@click.option("--test-items", type=int, default=None, help="measure on N held-out items only")
@click.option("--device", default="auto", show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="where to write NAME.json/.safetensors (default: the user zoo folder)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run folder")
@click.option("--resume", is_flag=True)
@click.option("--strict", is_flag=True, help="fail on a corrupt image instead of skipping it")
@click.option("--json", "as_json", is_flag=True)
@log_option
@handle_errors
def zoo_train(name, data, image_size, vocab, epochs, steps, min_steps, batch_size, lr, augment,
              early_stop, seed, train_items, test_items, device, out_dir, out, resume, strict,
              as_json, loggers):
    """Train a small CLIP from scratch on any dataset (the shipped zoo models come from
    this command); the result loads with -m zoo:NAME or --pretrained FILE."""
    import re

    from .model import pick_device
    from .runs import Run
    from .zoo.train import train_zoo, zoo_out_dir

    _check_zoo_train_ranges(epochs=epochs, steps=steps, min_steps=min_steps,
                            batch_size=batch_size, lr=lr, image_size=image_size, seed=seed,
                            train_items=train_items, test_items=test_items)
    name = name or _zoo_name_from(data)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name):
        raise UsageError(f"zoo model name {name!r}: use lower-case letters, digits, - and _")
    zoo_out_dir(name, Path(out_dir) if out_dir else None)  # a shipped name needs --out-dir
    run = Run.create(out, "zoo-train", name, resume=resume, loggers=_loggers(loggers))
    with run:
        # what --resume must match (checkpoints record it; see RESUME_SAFE_KEYS)
        run.set("config", {"kind": "zoo-train", "plugin": name, "data": data,
                           "image_size": image_size, "vocab": vocab, "epochs": epochs,
                           "steps": steps, "min_steps": min_steps, "batch_size": batch_size,
                           "lr": lr, "augment": augment, "early_stop": early_stop, "seed": seed,
                           "train_items": train_items, "test_items": test_items,
                           "device": device, "strict": strict, "out_dir": out_dir})
        spec = train_zoo(name, data=data, epochs=epochs, steps=steps, min_steps=min_steps,
                         batch_size=batch_size, lr=lr, image_size=image_size, vocab=vocab,
                         augment=augment, early_stop=early_stop, seed=seed,
                         out_dir=Path(out_dir) if out_dir else None, run=run,
                         device=str(pick_device(device)), train_items=train_items,
                         test_items=test_items, strict=strict)
        run.set("model", f"zoo:{name}")
        run.set("dataset", spec["dataset"])
        run.set("seed", seed)
        run.set("model_checkpoint", spec["path"])
        run.set("train", {k: v for k, v in spec["train"].items() if k != "history"})
        m = spec["metrics"]
        score = {"clean_top1": m["zero_shot_top1"]} if "zero_shot_top1" in m else \
            {k: m[k] for k in ("i2t_r1", "t2i_r1") if k in m}
        res = run.finish({**score, "train_seconds": spec["train"]["seconds"],
                          "train_steps": float(spec["train"]["steps"])})
    _print_results(res, as_json)
    if not as_json:
        click.echo(f"model: -m zoo:{name}  or  --pretrained {spec['path']}")


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="also write the table as CSV")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="also write one self-contained HTML page: per run settings, headline, "
                   "metrics, images and curves; across runs a sortable table and plots")
@click.option("--title", default=None, help="the HTML page's title")
@handle_errors
def report_cmd(runs, csv_path, html_path, title):
    """Merge run folders (or folders of runs) into one table (and an HTML report)."""
    from .report import merge_runs, write_report_table

    rows, columns = merge_runs([Path(r) for r in runs])
    click.echo(write_report_table(rows, Path(csv_path) if csv_path else None, md=True,
                                  columns=columns))
    if html_path:
        from .htmlreport import write_html_report

        written = write_html_report([Path(r) for r in runs], html_path, title=title)
        click.echo(f"html report: {written['html']} ({written['runs']} runs)")


def _load_plugin_commands(group: click.Group) -> None:
    try:
        from .registry import get_registry

        get_registry().add_commands(group)
    except Exception as exc:  # never let a plugin command break the CLI
        log.warning("could not load plugin commands: %s", exc)
