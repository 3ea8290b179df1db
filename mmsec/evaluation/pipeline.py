"""The evaluation pipeline: embeddings per (model, dataset, condition), computed once, then
every registered probe reads them.

::

    ev = Evaluation(model, data, cache, metrics=registry.metric_list(), bank=bank)
    views = [ev.clean(), *ev.attacked(attack, artifact, run=run)]
    rows = ev.measure(views)            # -> [Row(task, model, condition, ..., value, key)]

Clean image embeddings come through the embedding cache; attacked images are new pixels and
are encoded as they are made. Caption embeddings go through the cache too (keyed by their
text, so perturbed captions are cached as well).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import distributed
from ..attacks import Artifact, Attack, Victim
from ..cache import EmbeddingCache
from ..data import ImageDataset, load_images
from ..errors import MmsecError, PluginError
from .embed import DEFAULT_BATCH, caption_table, encode_images, encode_texts
from .probes import BUILTIN_METRICS
from .views import Metric, Row, Task, View, flat_key

__all__ = ["LAYER_ITEMS", "Evaluation", "resolve_target", "rows_to_metrics"]

#: Images per view whose layer activations are computed when a probe reads them.
LAYER_ITEMS = 500


def resolve_target(artifact: Artifact | None, ds: ImageDataset) -> int | None:
    """The class index a targeted artifact (a backdoor trigger) aims at, in ``ds``'s classes.

    Artifacts carry ``meta["target_name"]`` (matched by name, so a trigger made on one
    split or dataset evaluates on another) and/or ``meta["target"]`` (an index).
    """
    if artifact is None:
        return None
    name, index = artifact.meta.get("target_name"), artifact.meta.get("target")
    if name is not None and ds.classnames and name in ds.classnames:
        return ds.classnames.index(name)
    if name is not None and ds.classnames:
        raise MmsecError(f"the trigger targets class {name!r}, which {ds.describe()} lacks "
                         f"(classes: {', '.join(ds.classnames[:10])} ...)")
    return None if index is None else int(index)


class Evaluation:
    """Embeddings of ``model`` on ``data`` under conditions, and the probes over them.

    Args:
        model: the ClipModel evaluated.
        data: the evaluation dataset.
        cache: the shared embedding cache.
        metrics: the probes to run (default: the built-in ones; the API passes the
            registry's, which include plugins' probes).
        bank: a labelled dataset for kNN probes (e.g. a train-split sample), or None.
        label: ``before``/``after``/``original`` for a model other than the run's main one.
        progress: a progress-bar factory (``run.progress``) for the long loops, or None.
        layer_items: images per view whose pooled layer activations are computed for the
            probes that read them (``Metric.layers``); 0 turns them off.
    """

    def __init__(self, model, data: ImageDataset, cache: EmbeddingCache, *,
                 metrics: Sequence[Metric] | None = None, bank: ImageDataset | None = None,
                 label: str | None = None, progress: Callable | None = None,
                 batch_size: int = DEFAULT_BATCH, layer_items: int = LAYER_ITEMS) -> None:
        self.model, self.data, self.cache = model, data, cache
        self.metrics = list(BUILTIN_METRICS if metrics is None else metrics)
        self.bank_data = bank
        self.label = label
        self.progress = progress
        self.batch_size = batch_size
        self.layer_items = layer_items if any(m.layers for m in self.metrics) else 0
        self._clean: View | None = None
        self._task: Task | None = None
        self._texts: list[str] | None = None

    # ------------------------------------------------------------------ embeddings
    @property
    def task(self) -> Task:
        if self._task is None:
            ds, model = self.data, self.model
            head = None
            if ds.classnames:
                head = model.zero_shot_head(ds.classnames, ds.templates).detach().cpu()
            owner = None
            if ds.has_captions:
                self._texts, owner = caption_table(ds)
            bank = None
            if self.bank_data is not None and self.bank_data.classnames:
                bank = (encode_images(model, self.bank_data, self.cache,
                                      batch_size=self.batch_size,
                                      progress=self.progress is not None),
                        self.bank_data.labels())
            self._task = Task(n_items=len(ds), split=ds.split, dataset=ds.describe(),
                              labels=ds.labels(), classnames=ds.classnames, head=head,
                              caption_owner=owner, bank=bank, device=model.device)
        return self._task

    def clean(self) -> View:
        """The clean view (computed once, through the cache)."""
        if self._clean is None:
            task = self.task
            images = encode_images(self.model, self.data, self.cache,
                                   batch_size=self.batch_size, progress=self.progress is not None)
            texts = encode_texts(self.model, self._texts, self.cache) \
                if self._texts is not None else None
            self._clean = View("clean", images, texts, task,
                               layers=self._clean_layers() if self.layer_items else None)
        return self._clean

    def _clean_layers(self) -> dict[str, torch.Tensor]:
        """Pooled activations of every image layer for the first ``layer_items`` images."""
        ds, n = self.data, min(self.layer_items, len(self.data))
        out: dict[str, list[torch.Tensor]] = {}
        for s in range(0, n, self.batch_size):
            x, _ = load_images(ds, range(s, min(n, s + self.batch_size)))
            with torch.no_grad():
                _, acts = self.model.forward_features(x.to(self.model.device))
            for name, a in acts.items():
                out.setdefault(name, []).append(a.float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def victim(self) -> Victim:
        ds = self.data
        return Victim(self.model, ds.classnames, ds.templates)

    def attacked_images(self, attack: Attack, artifact: Artifact, *, run: Any = None,
                        desc: str = "attack") -> torch.Tensor:
        """Embeddings ``[N, D]`` of ``attack.perturb(artifact, images, labels)`` over the data."""
        return self._attacked(attack, artifact, run=run, desc=desc, layers=False)[0]

    def _attacked(self, attack: Attack, artifact: Artifact, *, run: Any = None,
                  desc: str = "attack", layers: bool = True
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``attacked_images`` and, in the same pass, the first ``layer_items`` images' pooled
        layer activations (None when ``layers`` is off or no probe reads them)."""
        ds, victim = self.data, self.victim()
        n_layers = self.layer_items if layers else 0
        starts = range(0, len(ds), self.batch_size)
        world = distributed.world_size()
        if world > 1:  # torchrun: each process attacks a block of whole batches
            lo, hi = distributed.shard_range(len(starts))
            starts = starts[lo:hi]
        if self.progress is not None:
            starts = self.progress(starts, desc=desc, total=len(starts))
        out, acts_out = [], {}
        for s in starts:
            x, y = load_images(ds, range(s, min(len(ds), s + self.batch_size)))
            device = self.model.device
            adv = attack.perturb(artifact, x.to(device), y.to(device), victim=victim, run=run)
            with torch.no_grad():
                if s < n_layers:
                    emb, acts = self.model.forward_features(adv)
                    for name, a in acts.items():
                        acts_out.setdefault(name, []).append(a[:n_layers - s].float().cpu())
                    out.append(emb.cpu())
                else:
                    out.append(self.model.encode_image(adv).cpu())
        emb = torch.cat(out) if out else torch.zeros(0, self.model.embed_dim)
        acts = {k: torch.cat(v) for k, v in acts_out.items()}
        if world > 1:
            emb = distributed.gather_rows(emb)
            merged: dict[str, list[torch.Tensor]] = {}
            for part in distributed.all_objects(acts):  # the first batches' (small)
                for k, v in part.items():
                    merged.setdefault(k, []).append(v)
            acts = {k: torch.cat(v) for k, v in merged.items()}
        return emb, (acts if n_layers else None)

    def attacked(self, attack: Attack, artifact: Artifact, *, condition: str = "adv",
                 run: Any = None) -> list[View]:
        """Views of the data under ``artifact``: ``condition`` (everything the attack
        perturbs); for an attack that perturbs images and captions, also
        ``<condition>_image`` and ``<condition>_text`` (one side each)."""
        clean = self.clean()
        if self.task.target is None:
            self.task.target = resolve_target(artifact, self.data)
        sides = set(attack.sides(artifact))
        images = texts = layers = None
        if "image" in sides:
            images, layers = self._attacked(attack, artifact, run=run, desc=condition)
        if "text" in sides and self._texts is not None:
            perturbed = attack.apply_text(artifact, list(self._texts), victim=self.victim(),
                                          run=run)
            if len(perturbed) != len(self._texts):
                raise MmsecError(f'plugin "{attack.name}": apply_text returned {len(perturbed)} '
                                 f"captions for {len(self._texts)}")
            texts = encode_texts(self.model, perturbed, self.cache)
        views = [View(condition, clean.images if images is None else images,
                      clean.texts if texts is None else texts, self.task, clean, layers=layers)]
        if images is not None and texts is not None:
            views.append(View(f"{condition}_image", images, clean.texts, self.task, clean,
                              layers=layers))
            views.append(View(f"{condition}_text", clean.images, texts, self.task, clean))
        return views

    # ------------------------------------------------------------------ probes
    def measure(self, views: Sequence[View]) -> list[Row]:
        """Every probe over every view; rows in probe order, clean views first."""
        rows: list[Row] = []
        for view in views:
            for metric in self.metrics:
                try:
                    values = metric.function(view)
                except (MmsecError, KeyboardInterrupt):
                    raise
                except Exception as exc:  # a plugin's probe may raise anything
                    raise PluginError(f'metric "{metric.name}" (plugin {metric.plugin}) failed '
                                      f"on the {view.condition} view: "
                                      f"{type(exc).__name__}: {exc}") from exc
                for name, value in (values or {}).items():
                    n = self.task.n_items
                    if isinstance(value, tuple):
                        value, n = value
                    rel = metric.is_relative(name) and not view.is_clean
                    rows.append(Row(metric.name, self.label, view.condition, self.task.split,
                                    int(n), name, float(value),
                                    flat_key(self.label, view.condition, name, rel)))
        return rows


def rows_to_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """The flat ``metrics`` of results.json from rows."""
    return {r.key: r.value for r in rows}
