"""RunContext: the one object every plugin receives as ``run``.

It is a view of the run folder (``mmsec.runs.Run``) plus what a plugin needs around it:
``device``, ``precision``, ``seed``, named random streams (``rng``), the shared ``cache``
(EmbeddingCache), ``strict``, the ``registry`` of the other plugins, and ``inputs`` (the
attack artifact or trigger the run was given).

A plugin that runs another plugin (InverTune simulating a universal attack) gives it a
child context, ``run.child("simulator")`` or ``run.fit_attack(...)``: the child writes its
artifacts to ``artifacts/simulator/``, its metrics as ``simulator.<key>``, its report
sections under its name, its checkpoints to ``checkpoints/simulator/``, and draws random
numbers from streams of its own, so nothing of the caller's is overwritten.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache import EmbeddingCache
from .errors import MmsecError
from .runs import Run
from .training.batches import stream_seed

if TYPE_CHECKING:
    from .attacks import Artifact, AttackResult

__all__ = ["RunContext", "RunInputs"]


@dataclass(frozen=True)
class RunInputs:
    """Artifacts a run was given: an attack's artifact (``--attack-artifact``) and a
    backdoor's trigger spec (``--trigger``, for measuring; defenses must not train on it)."""

    attack_artifact: Artifact | None = None
    trigger: Artifact | None = None


class _Metrics(MutableMapping):
    """The run's metrics seen through a prefix (a child's keys are ``<child>.<key>``)."""

    def __init__(self, store: dict[str, Any], prefix: str) -> None:
        self._store, self._prefix = store, prefix

    def __getitem__(self, key: str) -> Any:
        return self._store[self._prefix + key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._store[self._prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self._store[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self._prefix)
        return (k[n:] for k in list(self._store) if k.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _ChildLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['child']}] {msg}", kwargs


class RunContext:
    """A run folder plus device, precision, seed, random streams, cache and the other plugins."""

    def __init__(self, run: Run, *, device: torch.device | str = "cpu",
                 precision: str = "fp32", seed: int = 0,
                 cache: EmbeddingCache | None = None, registry: Any = None,
                 strict: bool = False, inputs: RunInputs | None = None,
                 path: str = "") -> None:
        self.run = run
        self.device = torch.device(device)
        self.precision = precision
        self.seed = int(seed)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.registry = registry
        self.strict = strict
        self.inputs = inputs or RunInputs()
        #: "" for the command's own run, "simulator" (or "a/b") for a child
        self.path = path
        self.metrics = _Metrics(run.metrics, f"{path.replace('/', '.')}." if path else "")
        self.log = run.log if not path else _ChildLog(run.log, {"child": path})

    # ------------------------------------------------------------------ folder and logging
    @property
    def resume(self) -> bool:
        return self.run.resume

    @property
    def durations(self) -> dict[str, float]:
        return self.run.durations

    @property
    def artifacts_dir(self) -> Path:
        """Where this context's artifacts go (a child's own sub-folder)."""
        return self.run.artifacts_dir / self.path if self.path else self.run.artifacts_dir

    def _name(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def progress(self, iterable=None, *, desc: str | None = None, total: int | None = None,
                 unit: str = "it", leave: bool = False):
        label = f"{self.path}: {desc}" if self.path and desc else desc
        return self.run.progress(iterable, desc=label, total=total, unit=unit, leave=leave)

    def timer(self, name: str):
        return self.run.timer(self._name(name).replace("/", "."))

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, Any] | None = None) -> Path:
        return self.run.save_tensors(self._name(name), tensors, metadata)

    def save_image(self, name: str, image: torch.Tensor, scale: int = 1, *,
                   report: bool = False) -> Path:
        return self.run.save_image(self._name(name), image, scale, report=report)

    def add_section(self, title: str, markdown: str) -> None:
        self.run.add_section(f"{self.path}: {title}" if self.path else title, markdown)

    def note(self, text: str) -> None:
        """A one-line remark under the run's headline (a child's starts with its name)."""
        self.run.note(f"{self.path}: {text}" if self.path else text)

    def log_scalars(self, tag: str, step: int, values: Mapping[str, float], *,
                    epoch: int | None = None, scope: str = "step") -> None:
        """Training scalars of loop ``tag`` (a child's tag starts with its name); the
        training loop logs through this (:mod:`mmsec.scalars`)."""
        self.run.log_scalars(self._name(tag), step, values, epoch=epoch, scope=scope)

    def set(self, key: str, value: Any) -> None:
        """A results.json field (a child's are ``<child>.<key>``)."""
        self.run.set(self._name(key).replace("/", "."), value)

    def get(self, key: str, default: Any = None) -> Any:
        return self.run.get(self._name(key).replace("/", "."), default)

    # ------------------------------------------------------------------ texts
    def vet_texts(self, model, data) -> list[str]:
        """Check that ``model``'s tokenizer reads ``data``'s zero-shot prompts and captions.

        Words read as the unknown token, texts cut at the context length, or classes whose
        prompts tokenize identically make the zero-shot (or retrieval) figures meaningless:
        each problem is a warning naming the words, recorded in results.json
        (``text_coverage``, and ``unreliable``: task -> reason), and an error under
        ``--strict``. Returns the messages (empty when all is read).
        """
        from .coverage import prompt_coverage, text_coverage
        from .evaluation.embed import caption_table

        checks = []
        if data.classnames:
            checks.append(("zero_shot", prompt_coverage(model.tokenizer, data.classnames,
                                                        data.templates)))
        if data.has_captions:
            checks.append(("retrieval", text_coverage(model.tokenizer, caption_table(data)[0],
                                                      "captions")))
        messages = []
        coverage = dict(self.get("text_coverage") or {})
        unreliable = dict(self.get("unreliable") or {})
        for task, cov in checks:
            coverage[task] = cov.to_dict()
            if cov.ok:
                continue
            msg = cov.message()
            messages.append(msg)
            unreliable[task] = msg
        self.set("text_coverage", coverage)
        if unreliable:
            self.set("unreliable", unreliable)
        for msg in messages:
            if self.strict:
                raise MmsecError(f"{msg} (the model cannot read this data's texts; drop "
                                 "--strict to measure anyway, figures marked unreliable)")
            self.log.warning("%s: %s figures of this run are unreliable", msg,
                             "zero-shot" if msg.startswith("zero-shot") else "retrieval")
        return messages

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, state, meta, *, slot: str = "main", rng: bool = True) -> Path:
        return self.run.save_checkpoint(state, meta, slot=self._name(slot), rng=rng)

    def load_checkpoint(self, slot: str = "main", device: str = "cpu", *,
                        restore_rng: bool = True):
        return self.run.load_checkpoint(self._name(slot), device, restore_rng=restore_rng)

    # ------------------------------------------------------------------ randomness
    def seed_for(self, stream: str) -> int:
        """A seed of its own for each named stream of random numbers (63 bits, stable across
        machines and versions): ``np.random.default_rng(run.seed_for("batches"))``."""
        return stream_seed(self.seed, self.path, stream)

    def rng(self, stream: str) -> torch.Generator:
        """A CPU torch generator for the named stream (``run.rng("init")``)."""
        return torch.Generator().manual_seed(self.seed_for(stream))

    @contextlib.contextmanager
    def seeded(self, stream: str) -> Iterator[None]:
        """Torch's global generator seeded from ``stream`` for the block, then restored
        (for code that draws from it, such as module initialisation)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed_for(stream))
            yield

    # ------------------------------------------------------------------ other plugins
    def child(self, name: str) -> RunContext:
        """A context for a plugin this one runs: same run and settings, its own artifacts
        folder, metric prefix, report sections, checkpoint slots and random streams."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid child run name {name!r}")
        return RunContext(self.run, device=self.device, precision=self.precision,
                          seed=self.seed, cache=self.cache, registry=self.registry,
                          strict=self.strict, inputs=self.inputs,
                          path=self._name(name))

    def record_plugin(self, kind: str, item: Any) -> None:
        """Add a plugin the run used (``kind``: attacks, defenses, datasets, models, metrics)
        to results.json's ``plugins``, with its distribution and version."""
        if self.registry is None:
            return
        entry = self.registry.provenance(kind, item)
        used = self.run.fields.setdefault("plugins", [])
        if all((u["kind"], u["qualified"]) != (entry["kind"], entry["qualified"]) for u in used):
            used.append(entry)

    def attack(self, name: str, options: Mapping[str, Any] | None = None):
        """An instance of another registered attack plugin, with validated options."""
        cls = self.registry.attack(name)
        self.record_plugin("attacks", cls)
        return cls(options or {})

    def fit_attack(self, name: str, model, data, options: Mapping[str, Any] | None = None,
                   *, child: str | None = None) -> tuple[Any, AttackResult]:
        """Fit attack plugin ``name`` in a child run (named ``child``, default ``name``);
        returns ``(the attack instance, its AttackResult)``. Resumes with the run."""
        attack = self.attack(name, options)
        return attack, attack.run_fit(model, data, self.child(child or name))
