"""What probes read and what they produce: views of embeddings, metrics, result rows.

A :class:`View` is the embeddings of one model on one dataset under one *condition*
(``clean``, ``adv``, ``control``, ``adv_image``, ...); every view of an evaluation shares
its :class:`Task` (labels, zero-shot head, captions' owners, a backdoor's target, the kNN
bank). A :class:`Metric` (a *probe*) reads a view (and its clean counterpart) and returns
numbers; each becomes a :class:`Row` of results.json's long-form ``rows`` and one flat key
of its ``metrics``.

Flat keys: ``<condition>_<metric>`` (``clean_top1``, ``adv_top1``, ``control_top1``); a
metric that compares a condition with the clean one (``fooling_rate``, ``asr``,
``retrieval_asr_i2t_r1``, listed in the probe's ``relative``) is named bare for ``adv``
and ``<condition>_<metric>`` otherwise (``control_fooling_rate``). Evaluations of a model
other than the run's main one carry its label first (``before_``, ``after_``,
``original_``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Metric", "Row", "Task", "View", "flat_key"]


@dataclass
class Task:
    """What every view of one evaluation shares."""

    n_items: int
    split: str
    dataset: str
    labels: torch.Tensor
    classnames: Sequence[str] | None = None
    head: torch.Tensor | None = None  # [C, D] zero-shot class embeddings (CPU)
    caption_owner: torch.Tensor | None = None  # [M] image index of each caption
    target: int | None = None  # a targeted attack's class (backdoor): ASR applies
    bank: tuple[torch.Tensor, torch.Tensor] | None = None  # kNN bank (embeddings, labels)
    device: torch.device = torch.device("cpu")
    memo: dict[str, Any] = field(default_factory=dict)


@dataclass
class View:
    """Embeddings under one condition: ``images`` ``[N, D]``, ``texts`` ``[M, D]`` (captions,
    possibly perturbed; None without real captions), and the clean view to compare with
    (None for the clean view itself). ``memo`` keeps what probes computed on it.

    ``layers``: ``{layer: [n, C]}`` pooled image-tower activations of the first ``n`` images
    (``ClipModel.layer_names("image")``), present when a probe of the evaluation declares
    ``layers=True``; None otherwise (or when the condition left the images unchanged)."""

    condition: str
    images: torch.Tensor
    texts: torch.Tensor | None
    task: Task
    clean: View | None = None
    memo: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, torch.Tensor] | None = None

    @property
    def is_clean(self) -> bool:
        return self.clean is None


@dataclass(frozen=True)
class Metric:
    """A probe registered through ``register_metrics``: ``function(view) -> {metric: value}``
    (a value may be ``(value, n_items)``), or None when it does not apply to the view.

    ``relative`` lists the metric names (or name prefixes ending in ``_``) that compare the
    view with the clean one; they are named bare for the ``adv`` condition. ``layers``: the
    probe reads ``View.layers`` (the pipeline then computes pooled layer activations of the
    first ``Evaluation.layer_items`` images of each view).
    """

    name: str
    function: Callable[[View], Mapping[str, Any] | None]
    description: str = ""
    relative: tuple[str, ...] = ()
    plugin: str = "mmsec"
    layers: bool = False

    def is_relative(self, metric: str) -> bool:
        return any(metric == r or (r.endswith("_") and metric.startswith(r))
                   for r in self.relative)


@dataclass(frozen=True)
class Row:
    """One result: ``task`` (the probe), ``model`` (None for the run's main model, else
    ``before``/``after``/``original``), ``condition``, ``split``, ``n_items``, ``metric``,
    ``value`` and the flat ``key`` it has in ``metrics``."""

    task: str
    model: str | None
    condition: str
    split: str
    n_items: int
    metric: str
    value: float
    key: str

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model": self.model, "condition": self.condition,
                "split": self.split, "n_items": self.n_items, "metric": self.metric,
                "value": self.value, "key": self.key}


def flat_key(label: str | None, condition: str, metric: str, relative: bool) -> str:
    """The key of a row in results.json's flat ``metrics`` (see the module doc)."""
    if relative:
        name = metric if condition == "adv" else f"{condition}_{metric}"
    else:
        name = f"{condition}_{metric}"
    return f"{label}_{name}" if label else name
