"""Host-device syncs per optimiser step of the plugins' training loops, counted on the CPU.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/syncs.py [--only advclip,uap]
        [--defer-checks 1]

On a GPU, ``tensor.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (an ``if`` on a tensor),
``t.tolist()``, ``t.numpy()`` and ``t.cpu()`` each wait for every queued kernel. This script
counts those calls on the CPU (no GPU needed) by wrapping the ``torch.Tensor`` methods, while
each plugin's real ``fit`` runs its training loop (the benchmark scripts' tiny sizes), and
sorts every call by where :func:`mmsec.training.train` was at that moment:

- ``step``: in the step function, the backward, the optimiser step and the loop's per-step
  bookkeeping: what runs every step;
- ``read_back``: the loop's batched read-backs of the per-step numbers (every
  ``READ_EVERY`` steps and at the end of each epoch), spread over the steps;
- left out (reported apart): the batches' loading (``data``: host tensors on a GPU run
  too), checkpoints, ``on_epoch_end`` (held-out checks, once an epoch) and torch's
  optimisers reading their step count (``optimizer_host``: a host tensor on a GPU run).

Figure: the mean over loops of (``step`` + ``read_back``) calls per optimiser step. The
counts are an upper bound of a GPU run's syncs on what they count (a call on a tensor that
lives on the host anyway is no sync there) and miss the syncs these wrappers cannot see
(boolean-mask indexing, ``nonzero``, ``torch.unique``...).
``--defer-checks 1`` defers the loop's non-finite loss check as on a GPU (the CPU default
checks at once, which is free there): the count a GPU run would see.

``--device cuda`` counts real syncs instead: the warnings of
``torch.cuda.set_sync_debug_mode("warn")`` (every synchronising operation, mask indexing
included), sorted the same way (the loops at the same tiny sizes, on the scripts' CUDA
model). Written for a GPU machine, not yet run on one.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import inspect
import os
import sys
import warnings

import _common as C

SIZES = {"cpu": {"only": None, "defer_checks": True, "repeat": 1},
         "cuda": {"only": None, "defer_checks": True, "repeat": 1}}

#: (loop, benchmark script, its arguments): the scripts' smoke-test sizes, a few epochs
LOOPS = [
    ("advclip", "advclip", ["--items", "64", "--pool", "128", "--batch", "8"]),
    ("cpgc", "cpgc_throughput", ["--steps", "8", "--batch", "2"]),
    ("uap", "uap", ["--items", "128", "--batch", "16"]),
    ("backdoor", "backdoor_implant", ["--items", "128", "--batch", "16"]),
    ("finetune_fare", "finetune", ["--method", "fare", "--steps", "8", "--batch", "4",
                                   "--attack-steps", "2"]),
    ("finetune_tecoa", "finetune", ["--method", "tecoa", "--steps", "8", "--batch", "4",
                                    "--attack-steps", "2"]),
]

_METHODS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu")


class Counter:
    """Counts the wrapped ``torch.Tensor`` calls made inside ``mmsec.training.train``."""

    def __init__(self) -> None:
        from mmsec.training import loop

        self.code = loop.train.__code__
        lines, first = inspect.getsourcelines(loop.train)
        self.text = {first + i: t.strip() for i, t in enumerate(lines)}
        body = [n for n, t in self.text.items() if t.startswith("for batch in it:")]
        self.data_line = body[0]
        self.counts: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self.active = False

    def kind(self, lineno: int) -> str:
        text = self.text.get(lineno, "")
        if lineno == self.data_line:
            return "data"
        if "checkpoint(" in text:
            return "checkpoint"
        if "on_epoch_end(" in text:
            return "epoch_end"
        if "read_back()" in text:
            return "read_back"
        return "step"

    def hit(self, method: str, caller=None) -> None:
        if self.active:
            return
        frame = caller = caller or sys._getframe(2)
        while frame is not None and frame.f_code is not self.code:
            frame = frame.f_back
        if frame is None:
            return
        kind = self.kind(frame.f_lineno)
        if caller is not None and f"torch{os.sep}optim{os.sep}" in caller.f_code.co_filename:
            kind = "optimizer_host"  # Adam's step count: a host tensor unless capturable
        self.counts[kind] += 1
        if kind in ("step", "read_back"):
            self.sites[f"{os.path.relpath(caller.f_code.co_filename)}:{caller.f_lineno} "
                       f"{method}"] += 1

    @contextlib.contextmanager
    def installed(self, device):
        import torch

        if device.type == "cuda":  # the real thing: CUDA's own sync warnings
            with self._cuda_warnings():
                yield self
            return
        saved = {m: getattr(torch.Tensor, m) for m in _METHODS}

        def wrap(name, real):
            def counted(self_, *args, **kwargs):
                self.hit(name)
                self.active = True  # calls made inside the real method are not counted
                try:
                    return real(self_, *args, **kwargs)
                finally:
                    self.active = False
            return counted

        try:
            for m, real in saved.items():
                setattr(torch.Tensor, m, wrap(m, real))
            yield self
        finally:
            for m, real in saved.items():
                setattr(torch.Tensor, m, real)


    @contextlib.contextmanager
    def _cuda_warnings(self):
        """Count ``torch.cuda.set_sync_debug_mode("warn")``'s warnings (one per operation
        that synchronises: the calls above, and mask indexing, nonzero... too)."""
        import torch

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return shown(message, category, filename, lineno, file, line)
            frame = sys._getframe(1)
            while frame is not None and (f"{os.sep}warnings.py" in frame.f_code.co_filename
                                         or f"{os.sep}torch{os.sep}" in
                                         frame.f_code.co_filename):
                frame = frame.f_back
            self.hit("cuda sync", caller=frame or sys._getframe(1))

        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=".*synchroniz.*")
            shown, warnings.showwarning = warnings.showwarning, show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(before)
                warnings.showwarning = shown


def main(argv=None) -> dict:
    args = C.parse(C.parser(__doc__, SIZES), argv)
    before = os.environ.get("MMSEC_DEFER_CHECKS")
    os.environ["MMSEC_DEFER_CHECKS"] = "1" if args.defer_checks else "0"
    try:
        return _count(args)
    finally:
        if before is None:
            os.environ.pop("MMSEC_DEFER_CHECKS", None)
        else:
            os.environ["MMSEC_DEFER_CHECKS"] = before


def _count(args) -> dict:
    device = C.setup(args)
    import torch

    import mmsec.training as training

    for plugin in ("advclip.attack", "cpgc.attack", "uap", "backdoor.implant",
                   "finetune.common"):  # imported now, so that _patched_train finds them
        importlib.import_module(f"mmsec_plugins.{plugin}")
    only = set(args.only.split(",")) if args.only else None
    real_train = training.loop.train
    rows = {}
    for name, script, argv_ in LOOPS:
        if only is not None and name not in only:
            continue
        counter = Counter()
        steps = []

        def counted_train(*a, _real=real_train, _steps=steps, **k):
            out = _real(*a, **k)
            _steps.append(out.steps)
            return out

        module = importlib.import_module(script)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
                _patched_train(counted_train), counter.installed(device), \
                torch.random.fork_rng():
            module.main([*argv_, "--device", args.device, "--repeat", "1"])
        n = max(1, sum(steps))
        per_step = {k: round(v / n, 3) for k, v in counter.counts.items()}
        rows[name] = {"steps": sum(steps), "per_step": per_step,
                      "syncs_per_step": round((counter.counts["step"]
                                               + counter.counts["read_back"]) / n, 3),
                      "sites": dict(counter.sites.most_common(30))}
        print(f"{name}: {rows[name]['syncs_per_step']} syncs/step over {sum(steps)} steps "
              f"{per_step}", file=sys.stderr, flush=True)
    figure = sum(r["syncs_per_step"] for r in rows.values()) / max(1, len(rows))
    return C.emit("syncs", args, "zoo:shapes", figure=max(figure, 1e-9), ceiling=1.0,
                  unit="syncs/step", ceiling_kind="one sync per step (a count, not a rate)",
                  defer_checks=bool(args.defer_checks), loops=rows)


@contextlib.contextmanager
def _patched_train(fn):
    """Every module that imported ``train`` by name (the plugins) calls ``fn`` instead."""
    import mmsec.training as training

    real = training.loop.train
    swapped = []
    for mod in list(sys.modules.values()):
        if getattr(mod, "train", None) is real and mod is not training.loop:
            swapped.append(mod)
            mod.train = fn
    try:
        yield
    finally:
        for mod in swapped:
            mod.train = real


if __name__ == "__main__":
    main()
