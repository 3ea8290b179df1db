"""Targeted trigger probes: how easily can each class be reached by a universal trigger?

A backdoor is a shortcut: its target class is reached from any image by a small,
image-agnostic change of the right *kind* (a patch somewhere, a pattern over the whole
image, a smooth warp), while the model's natural "sink" classes - the ones an untargeted
universal attack drifts to - need a change that does not fit in that budget. A probe
optimises one trigger of one family towards one class, on part of the clean set, and
measures the share of the other, held-out clean images it sends there.

Families (each a small module holding the trigger's parameters; ``apply(x)`` maps a batch
``[B, 3, H, W]`` in [0, 1] to triggered images):

- :class:`PatchProbe`: a square patch of ``side`` (a fraction of the shorter side) at each
  place of a ``grid x grid`` lattice plus the centre (grid 2: the four corners and the
  centre), one pattern per place, each place getting ``batch`` images per step; the place
  that reaches the class best is kept. A patch larger than the trigger finds it where one
  of exactly its size does not: on zoo:shapes + BadNets (a 6-px trigger at 32 px, trained
  with decoys of other patterns at its place), 40 steps of 64 images on the trigger's
  place reached 4% with a 6-px probe, 23-100% with an 8-px one over three starts and
  58-95% with a 10-px one.
  Whether a decoy-trained code is found depends on the *start*, not on the batches: on a
  short implant (250 steps, the trigger at pixels 25..30), 10-px patches at the trigger's
  place from 16 random starts reached >= 85% of held-out images in 40 steps from 5 starts
  (the others 33-76%, drawing the class's own shape instead); one start run with three
  batch orders ended the same way each time. Hence ``starts`` random starts per place
  (16 in InverTune), halved by their training loss (mean over the second half of each
  interval) at steps 8, 16, 24 and 32 of 40, with a quarter of ``batch`` images each while
  they compete: the target then reached >= 90% for 10 of 10 probe seeds on that implant
  and 9 of 10 on a 400-step one (one start: 4 of 7; 8 starts halved with 8 images each:
  9/10 and 7/10; 16 starts cut to one at step 10: 6/10), at about twice the patch probe's
  time (the halving keeps it there: all 16 starts for 40 steps would cost 4x). The starts
  lift natural patch sinks too (their patch rates rose by ~0.05 on average): on the CI's
  short SIG implant the sink "ring" (patch) then outranked the SIG target (L-inf), which is
  why InverTune inverts and tunes away every family's clear leader, not the top class
  alone (its ``suspects``).
- :class:`AdditiveProbe`: one L-inf perturbation of the whole image (``eps``): Blended and
  SIG triggers are full-image additive changes.
- :class:`WarpProbe`: a smooth flow field (a ``grid x grid`` lattice of offsets, upsampled
  bicubically), displacement at most ``strength`` of the side: WaNet-style triggers.

A class's score is its lead in its best family (:func:`leads`): a natural sink is easy to
reach in every family but has near rivals in each, a backdoor target is reached from
nearly every image by its own family, well ahead of the runner-up. Shapes: images and
triggers in [0, 1]; ``PatchProbe.patterns`` ``[L, 3, s, s]``, ``AdditiveProbe.delta``
``[1, 3, H, W]``, ``WarpProbe.offsets`` ``[1, 2, k, k]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class PatchProbe(nn.Module):
    """One square patch per place of a ``grid x grid`` lattice; a batch is split across them."""

    family = "patch"
    lr = 0.05

    def __init__(self, h: int, w: int, side: float, grid: int, gen: torch.Generator,
                 starts: int = 1) -> None:
        super().__init__()
        self.h, self.w = h, w
        self.s = s = max(1, min(h, w, round(side * min(h, w))))
        tops = _lattice(h - s, grid)
        lefts = _lattice(w - s, grid)
        places = [(t, left) for t in tops for left in lefts]
        centre = ((h - s) // 2, (w - s) // 2)
        if centre not in places:  # an even lattice misses the centre
            places.append(centre)
        # ``starts`` random starts per place (pattern j at place j % len(places)); fit_probe
        # halves them by their training loss until one per place is left (:meth:`prune`)
        self.places = places * starts
        self.n_places = len(places)
        self.patterns = nn.Parameter(torch.rand(len(self.places), 3, s, s, generator=gen))
        self.place: int | None = None  # set: every image gets this place's patch

    @property
    def starts(self) -> int:
        """Patterns per place still in the running."""
        return len(self.places) // self.n_places

    def prune(self, loss: torch.Tensor, keep_r: int | None = None) -> torch.Tensor:
        """Keep the better half of the starts of each place by ``loss`` (one per pattern,
        lower is better); returns the kept patterns' indices (in the new order)."""
        r = self.starts
        keep_r = max(1, r // 2) if keep_r is None else keep_r
        per_place = loss.detach().cpu().view(r, self.n_places)  # [start, place]
        order = per_place.argsort(0)[:keep_r]  # best starts of each place
        keep = (order * self.n_places + torch.arange(self.n_places)).reshape(-1)
        self.places = self.places[:keep_r * self.n_places]
        self.patterns = nn.Parameter(self.patterns.detach()[keep.to(self.patterns.device)])
        return keep

    def project(self) -> None:
        with torch.no_grad():
            self.patterns.clamp_(0, 1)

    def paste(self, x: torch.Tensor, k: int) -> torch.Tensor:
        t, left = self.places[k]
        s = self.s
        # out-of-place: keep autograd's view of the pattern, not of an in-place write
        pad = (left, self.w - left - s, t, self.h - t - s)
        mask = F.pad(torch.ones(1, 1, s, s, device=x.device, dtype=x.dtype), pad)
        patch = F.pad(self.patterns[k:k + 1].to(x.dtype), pad)
        return mask * patch + (1 - mask) * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.place is not None:
            return self.paste(x, self.place)
        parts = [self.paste(x[k::len(self.places)], k) for k in range(len(self.places))]
        out = torch.empty_like(x)
        for k, part in enumerate(parts):
            out[k::len(self.places)] = part
        return out

    def groups(self, n: int) -> list[torch.Tensor]:
        """Index sets of a batch of ``n``: which images got which place in :meth:`forward`."""
        return [torch.arange(k, max(k, n), len(self.places)) for k in range(len(self.places))]


class AdditiveProbe(nn.Module):
    """One L-inf perturbation ``delta`` of the whole image."""

    family = "additive"

    def __init__(self, h: int, w: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.lr = eps / 4
        self.delta = nn.Parameter(torch.zeros(1, 3, h, w))

    def project(self) -> None:
        with torch.no_grad():
            self.delta.clamp_(-self.eps, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta.to(x.dtype)).clamp(0, 1)


class WarpProbe(nn.Module):
    """A smooth warp: ``grid x grid`` offsets, upsampled, at most ``strength`` of the side."""

    family = "warp"
    lr = 0.05

    def __init__(self, h: int, w: int, grid: int, strength: float,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.h, self.w, self.strength = h, w, strength
        # a small random start: at exactly zero the warp's gradient is the image's, which
        # is the same for every direction of a symmetric field
        self.offsets = nn.Parameter(0.1 * torch.randn(1, 2, grid, grid, generator=gen))

    def project(self) -> None:
        with torch.no_grad():
            self.offsets.clamp_(-3, 3)

    def flow(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``[1, H, W, 2]`` sampling positions for ``grid_sample``."""
        off = F.interpolate(torch.tanh(self.offsets), size=(self.h, self.w), mode="bicubic",
                            align_corners=True).to(device, dtype)
        ys = torch.linspace(-1, 1, self.h, device=device, dtype=dtype)
        xs = torch.linspace(-1, 1, self.w, device=device, dtype=dtype)
        ident = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
        return (ident + 2 * self.strength * off.permute(0, 2, 3, 1)).clamp(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flow = self.flow(x.device, x.dtype).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, flow, mode="bilinear", padding_mode="border",
                             align_corners=True).clamp(0, 1)


def _lattice(span: int, n: int) -> list[int]:
    """``n`` evenly spread offsets in ``[0, span]`` (both ends included)."""
    if n <= 1 or span <= 0:
        return [max(0, span) // 2] if n == 1 else [0]
    return sorted({round(i * span / (n - 1)) for i in range(n)})


@dataclass
class ProbeResult:
    """One probe: ``family`` towards class ``target``; ``rate`` on held-out images."""

    target: int
    family: str
    rate: float
    probe: nn.Module = field(repr=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The probe's trigger applied to ``x`` (no gradient)."""
        with torch.no_grad():
            return self.probe(x.to(_device(self.probe)))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def fit_probe(model, head: torch.Tensor, probe: nn.Module, target: int | None,
              train_x: torch.Tensor, test_x: torch.Tensor, *, steps: int, batch: int,
              gen: torch.Generator, temperature: float = 0.07,
              clean: torch.Tensor | None = None) -> ProbeResult:
    """Optimise ``probe`` so that ``train_x`` images go to ``target`` (zero-shot CE on
    cosines / ``temperature``; Adam); returns its success rate on ``test_x``.

    ``target=None``: untargeted, away from each image's clean prediction ``clean`` (the
    screen that picks candidate classes when there are many); the rate is then 0.
    """
    device = model.device
    probe.to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=probe.lr)
    patch = isinstance(probe, PatchProbe) and probe.place is None
    # several starts per place: halve them at evenly spread steps, by their training loss
    # over the second half of each interval, until one per place is left
    halvings = math.ceil(math.log2(probe.starts)) if patch and probe.starts > 1 else 0
    cuts = sorted({max(1, round(steps * (i + 1) / (halvings + 1))) for i in range(halvings)})
    since, seen = 0, []
    for step in range(steps):
        per = batch
        if patch:  # each pattern gets ``batch`` images, a quarter as many while starts compete
            per = (max(1, batch // 4) if probe.starts > 1 else batch) * len(probe.places)
        sel = torch.randint(0, len(train_x), (min(per, len(train_x)),), generator=gen)
        xb = train_x[sel].to(device)
        logits = model.encode_image(probe(xb)) @ head.t() / temperature
        if target is None:  # float64: a confident softmax rounds to one-hot in fp32
            loss = -F.cross_entropy(logits.double(), clean[sel].to(device))
        else:
            each = F.cross_entropy(logits, torch.full((len(xb),), target, device=device),
                                   reduction="none")
            loss = each.mean()
            if cuts and step >= since + (cuts[0] - since) // 2:
                seen.append(torch.stack([each[g].mean() if len(g) else each.new_tensor(math.inf)
                                         for g in probe.groups(len(xb))]).detach())
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(probe.parameters()))
        opt.step()
        probe.project()
        if cuts and step + 1 >= cuts[0]:
            if seen:
                old = opt.state.get(probe.patterns, {})
                keep = probe.prune(torch.stack(seen).mean(0))
                opt = torch.optim.Adam(probe.parameters(), lr=probe.lr)
                if old:  # the kept starts keep their moments
                    opt.state[probe.patterns] = {
                        k: (v[keep.to(v.device)] if torch.is_tensor(v) and v.dim() else v)
                        for k, v in old.items()}
            since, seen = cuts.pop(0), []
    if target is None or not len(test_x):
        return ProbeResult(-1 if target is None else target, probe.family, 0.0, probe)
    return ProbeResult(target, probe.family, _rate(model, head, probe, target, test_x), probe)


@torch.no_grad()
def _rate(model, head, probe, target: int, x: torch.Tensor) -> float:
    """Held-out success; a patch probe keeps its best place (and is fixed to it)."""
    device = model.device
    if isinstance(probe, PatchProbe):
        best, best_k = -1.0, 0
        for k in range(len(probe.places)):
            probe.place = k
            r = _share(model, head, probe, target, x, device)
            if r > best:
                best, best_k = r, k
        probe.place = best_k
        return best
    return _share(model, head, probe, target, x, device)


def _share(model, head, probe, target, x, device) -> float:
    hits = 0
    for b in x.split(256):
        pred = (model.encode_image(probe(b.to(device))) @ head.t()).argmax(1)
        hits += int((pred == target).sum())
    return hits / max(1, len(x))


def leads(rates: torch.Tensor, eps: float = 0.002) -> torch.Tensor:
    """``[F, K]`` success rates (family x class) -> ``[F, K]`` leads: each class's log-odds
    of success minus the best log-odds of any other class in the same family.

    Positive for the one class a family reaches best (by how much it leads the runner-up),
    negative for the others (how far behind the best they are). Log-odds, not rates: a
    backdoor fires on nearly every image, and 99.6% against 83% is a far larger gap than
    83% against 66%. Rates are clamped to ``[eps, 1 - eps]`` (a few hundred held-out images
    cannot tell 99.9% from 100%).
    """
    r = rates.double().clamp(eps, 1 - eps)
    logit = torch.log(r / (1 - r))
    out = torch.empty_like(logit)
    for k in range(logit.shape[1]):
        others = torch.cat([logit[:, :k], logit[:, k + 1:]], dim=1)
        out[:, k] = logit[:, k] - (others.max(1).values if others.shape[1] else 0)
    return out.float()
