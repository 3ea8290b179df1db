"""ClipModel: the one CLIP wrapper every plugin uses, both towers, any source of weights.

Pixels go in as float tensors in [0, 1] at any size; resizing to the model's input size and
the model's own mean/std normalisation happen inside, and are differentiable, so attacks
never see (or get wrong) a normalised tensor. Texts go in as strings, token ids, or token
embeddings (for attacks that learn a word).

``model(images=..., texts=..., image_layers=..., text_layers=...)`` returns a dict
(``image_features``, ``text_features``, ``logit_scale``, and per-layer features of either
tower) from open_clip's ``forward_intermediates``: one forward pass, what DDP wraps and what
layer-wise defenses read.

Sources of weights (``load_model``; more come from plugins through ``register_models``):

- the embedded zoo (``model=None``, ``"zoo"`` or ``"zoo:NAME"``): small CLIPs trained by
  ``mmsec zoo train`` and shipped in ``mmsec/zoo/``;
- an open_clip architecture with a pretrained tag (open_clip downloads it on a machine with
  network): ``load_model("ViT-B-32", "laion2b_s34b_b79k")``;
- a local checkpoint file (safetensors, or a torch state dict read with
  ``weights_only=True``) for an open_clip architecture or a zoo model. Files written by
  ``ClipModel.save`` carry their architecture in their metadata, so
  ``load_model(pretrained="repaired.safetensors")`` needs no ``model``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MmsecError, UsageError

log = logging.getLogger("mmsec.model")

ZOO_DIR = Path(__file__).parent / "zoo"
DEFAULT_ZOO = "shapes"
CHECKPOINT_FORMAT = "mmsec-clip-v1"
WRAPPER_PREFIX = "wrapper."
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Tower = Literal["image", "text", "all"]
_HEAD_CACHE_SIZE = 16

__all__ = [
    "CHECKPOINT_FORMAT", "DEFAULT_ZOO", "PRECISIONS", "ZOO_DIR", "ClipModel", "ModelSource",
    "TrimmedTokenizer", "Vocabulary", "ZOO_FORMAT_V1", "build_zoo_model",
    "builtin_model_sources", "load_model", "load_weights", "pick_device", "read_state_dict",
    "read_zoo_spec", "shipped_zoo_names", "user_zoo_dirs", "zoo_dirs", "zoo_entries",
    "zoo_names",
]


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda if present, else mps, else cpu; anything else as given (validated).
    Under torchrun a bare ``cuda`` (or ``auto`` on CUDA) is this process's GPU,
    ``cuda:LOCAL_RANK``."""
    from .distributed import launched, local_rank

    if launched() and (device is None or str(device) in ("auto", "cuda")) \
            and torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r} requested but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise UsageError(f"device {device!r} requested but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {device!r}: mmsec runs on cpu, cuda[:N] or mps")
    return dev


class TrimmedTokenizer:
    """open_clip's BPE tokenizer followed by a map onto a small vocabulary.

    Zoo models keep only the BPE tokens their captions use, so their token table is tiny.
    Ids are kept in ascending BPE order, so the end-of-text token stays the largest id
    (open_clip pools the text at the argmax id). Unknown tokens map to id 1.
    """

    UNK = 1

    def __init__(self, vocab: Sequence[int], context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.base = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab = list(vocab)
        table = torch.full((max(self.vocab) + 1,), self.UNK, dtype=torch.long)
        table[torch.tensor(self.vocab)] = torch.arange(len(self.vocab))
        self.table = table

    @staticmethod
    def build_vocab(texts: Sequence[str], context_length: int) -> list[int]:
        """The sorted BPE ids used by ``texts``, with pad (0), an unknown slot and sot/eot."""
        from open_clip.tokenizer import SimpleTokenizer

        tok = SimpleTokenizer(context_length=context_length)
        ids = set(tok(list(texts)).unique().tolist())
        ids |= {0, tok.sot_token_id, tok.eot_token_id}
        ids.discard(0)
        # index 0 = pad (BPE id 0), index 1 = unknown (BPE id 1, a never-used slot here)
        return [0, 1] + sorted(i for i in ids if i > 1)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        ids = self.base([texts] if isinstance(texts, str) else list(texts))
        ids = ids.clamp(max=self.table.numel() - 1)
        out = self.table[ids]
        out[ids == 0] = 0
        return out


@dataclass(frozen=True)
class Vocabulary:
    """The whole words of a model's own tokenizer: ``ids[i]`` (model token id) spells
    ``words[i]``. Sub-word pieces and special tokens are left out."""

    ids: torch.Tensor
    words: list[str]

    def __len__(self) -> int:
        return len(self.words)


def _whole_words(tokenizer: Any) -> Vocabulary:
    """Whole-word tokens of an open_clip ``SimpleTokenizer`` or a :class:`TrimmedTokenizer`."""
    base = tokenizer.base if isinstance(tokenizer, TrimmedTokenizer) else tokenizer
    decoder = getattr(base, "decoder", None)
    if not isinstance(decoder, dict):
        raise MmsecError(f"{type(tokenizer).__name__}: no BPE vocabulary to list words from")
    if isinstance(tokenizer, TrimmedTokenizer):
        pairs = list(enumerate(tokenizer.vocab))
    else:
        pairs = [(i, i) for i in sorted(decoder)]
    ids, words = [], []
    for model_id, bpe_id in pairs:
        piece = decoder.get(bpe_id, "")
        if piece.endswith("</w>") and piece[:-4].isalpha():
            ids.append(model_id)
            words.append(piece[:-4])
    return Vocabulary(torch.tensor(ids, dtype=torch.long), words)


def _pool(act: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C, h, w]`` -> spatial mean; ``[B, L, D]`` -> mean over tokens (for text, over
    the tokens up to end-of-text when ``tokens`` is given)."""
    act = act.float()
    if act.ndim == 4:
        return act.mean(dim=(2, 3))
    if act.ndim == 3 and tokens is not None and tokens.shape[:2] == act.shape[:2]:
        last = tokens.argmax(dim=1, keepdim=True)  # the end-of-text id is the largest
        mask = (torch.arange(act.shape[1], device=act.device)[None] <= last).float()
        return (act * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return act.mean(dim=1)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient comes back contiguous: a channels-last tower's gradient to
    the pixels would otherwise reach the caller channels-last (``.view`` fails on it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class ClipModel(nn.Module):
    """A CLIP (open_clip) model behind a pixels-in-[0,1] interface, with both towers.

    Attributes: ``name`` (architecture), ``pretrained`` (tag/file/zoo), ``image_size``,
    ``mean``/``std`` (the model's own), ``embed_dim``, ``precision``, ``info`` (zoo metadata),
    ``torch_compile`` (run the image tower's embedding through ``torch.compile``; see
    :meth:`_encode_image`), ``channels_last`` (the image tower in channels-last memory
    format; see the property).
    """

    def __init__(
        self, clip: nn.Module, tokenizer, *, name: str, pretrained: str | None,
        image_size: int, mean: Sequence[float], std: Sequence[float],
        precision: str = "fp32", info: dict | None = None, torch_compile: bool = False,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision {precision!r} (fp32, bf16, fp16)")
        self.clip = clip
        self.tokenizer = tokenizer
        self.name, self.pretrained = name, pretrained
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.precision = precision
        self.info = dict(info or {})
        self._heads: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._fp: tuple[tuple, str] | None = None
        self.torch_compile = bool(torch_compile)
        # the compiled function (not a module: the state dict and so the fingerprint stay
        # those of the eager model, which computes the same embeddings)
        self._compiled_image: Callable | None = None
        self.clip.eval()

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        """Where the weights are: the one source of truth for a run's device."""
        return next(self.clip.parameters()).device

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.clip, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[1])
        return int(self.encode_text(["x"]).shape[-1])

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100)

    @property
    def effective_precision(self) -> str:
        """The precision the model really runs at (reduced precision on the CPU runs fp32
        unless ``MMSEC_CPU_AUTOCAST=1``; see :meth:`autocast`)."""
        if self.precision != "fp32" and self.device.type == "cpu" \
                and os.environ.get("MMSEC_CPU_AUTOCAST") != "1":
            return "fp32"
        return self.precision

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the configured precision (a no-op in fp32).

        On the CPU, reduced precision runs only with ``MMSEC_CPU_AUTOCAST=1``: torch's CPU
        bf16 convolutions hang on some processors (seen with torch 2.14 on AMD EPYC), and
        they are slower than fp32 on CPUs without bf16 units anyway.
        """
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if self.effective_precision == "fp32":
            if not getattr(self, "_warned_cpu_precision", False):
                self._warned_cpu_precision = True
                log.warning("precision %s requested on the CPU: running fp32 "
                            "(set MMSEC_CPU_AUTOCAST=1 to force CPU autocast)", self.precision)
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    @contextlib.contextmanager
    def using_precision(self, precision: str) -> Iterator[ClipModel]:
        """Run the block at ``precision`` (e.g. an attack's inner loop in fp32 while the
        model trains in bf16), then restore the configured one."""
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision {precision!r} (fp32, bf16, fp16)")
        before, self.precision = self.precision, precision
        try:
            yield self
        finally:
            self.precision = before

    @property
    def channels_last(self) -> bool:
        """Whether the image tower runs in ``torch.channels_last`` memory format (its
        convolution weights and the normalised pixels; off by default).

        Measured with ``OMP_NUM_THREADS=1 python benchmarks/channels_last.py`` (one CPU
        thread, fwd+bwd to the pixels, batch 16, two runs): 1.2-1.34x on the zoo's
        ModifiedResNet-minis (zoo:shapes 1,328 -> 1,781 img/s, zoo:fashion 1,359 -> 1,638),
        none on a ViT-B/32 (0.97x: one convolution, the patch embedding). Not measured on
        CUDA.
        Opt-in all the same: the convolutions then sum in another order (embeddings differ by
        ~1e-7), so turning it on by default would change every figure in the last bits.
        Gradients reach the caller's pixels in their own (contiguous) layout."""
        return getattr(self, "_channels_last", False)

    @channels_last.setter
    def channels_last(self, on: bool) -> None:
        self.clip.visual.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        self._channels_last = bool(on)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable: [B,3,H,W] in [0,1] -> resized (shorter side, centre crop) and normalised."""
        if self.channels_last:
            pixels = _ContiguousGrad.apply(pixels)
        if pixels.ndim == 3:
            pixels = pixels.unsqueeze(0)
        if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        pixels = pixels.to(self.device, torch.float32)
        h, w = pixels.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            pixels = F.interpolate(pixels, size=(nh, nw), mode="bilinear", align_corners=False,
                                   antialias=nh < h or nw < w)
            top, left = (nh - s) // 2, (nw - s) // 2
            pixels = pixels[..., top:top + s, left:left + s]
        pixels = (pixels - self.mean) / self.std
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return pixels

    # ------------------------------------------------------------------ the forward pass
    def forward(
        self, images: torch.Tensor | None = None, texts: Any = None, *,
        image_layers: Sequence[str] | bool | None = None,
        text_layers: Sequence[str] | bool | None = None,
        text_embeddings: torch.Tensor | None = None,
        normalize: bool = True, pooled: bool = True,
    ) -> dict[str, Any]:
        """Both towers in one call; returns a dict.

        ``images``: ``[B, 3, H, W]`` pixels in [0, 1], any size. ``texts``: strings or token
        ids ``[M, L]``; ``text_embeddings`` (``[M, L, W]``) replace the token embeddings of
        ``texts`` (an attack that learns a word). ``image_layers`` / ``text_layers``: layer
        names (``layer_names("image")`` / ``layer_names("text")``) or True for all.

        Keys: ``image_features`` ``[B, D]`` and ``text_features`` ``[M, D]`` (float32,
        L2-normalised when ``normalize``), ``logit_scale``, and when layers are asked for
        ``image_layers`` / ``text_layers``: ``{name: activation}``. Pooled activations are
        ``[B, C]`` (conv stages: spatial mean; transformer blocks: token mean, for text over
        the tokens up to end-of-text); with ``pooled=False`` the raw outputs (conv
        ``[B, C, h, w]``, tokens ``[B, L, D]``, class token first).
        """
        out: dict[str, Any] = {"logit_scale": self.logit_scale}
        if images is not None:
            names = self._resolve_layers("image", image_layers)
            emb, acts = self._image_forward(self.preprocess(images), names)
            out["image_features"] = F.normalize(emb, dim=-1) if normalize else emb
            if names:
                out["image_layers"] = {n: _pool(a) if pooled else a for n, a in acts.items()}
        if texts is not None:
            tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
            tokens = tokens.to(self.device)
            names = self._resolve_layers("text", text_layers)
            emb, acts = self._text_forward(tokens, names, text_embeddings)
            out["text_features"] = F.normalize(emb, dim=-1) if normalize else emb
            if names:
                out["text_layers"] = {n: _pool(a, tokens) if pooled else a
                                      for n, a in acts.items()}
        return out

    def _resolve_layers(self, tower: str, layers: Sequence[str] | bool | None) -> list[str]:
        if not layers:
            return []
        known = self.layer_names(tower)
        names = known if layers is True else list(layers)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"unknown {tower} layer(s) {unknown}; known: {known}")
        return names

    def _image_forward(self, pix: torch.Tensor, names: list[str]
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.autocast():
            if not names:
                return self._encode_image(pix).float(), {}
            visual = self.clip.visual
            kind = _image_tower_kind(visual)
            if kind == "hooks":
                emb, acts = self._hooked_image_forward(pix, names)
                return emb.float(), acts
            kwargs: dict[str, Any] = {"indices": None}
            if kind == "vit":
                kwargs.update(output_fmt="NLC", output_extra_tokens=True)
            res = visual.forward_intermediates(pix, **kwargs)
            inter = list(res["image_intermediates"])
            if kind == "vit":  # class token first, as the block outputs them
                inter = [torch.cat([p, x], dim=1)
                         for p, x in zip(res["image_intermediates_prefix"], inter, strict=True)]
            elif kind == "resnet":
                inter = inter[1:]  # the stem is not a stage
            all_names = self.layer_names("image")
            acts = {n: inter[all_names.index(n)] for n in names}
            return res["image_features"].float(), acts

    def _encode_image(self, pix: torch.Tensor) -> torch.Tensor:
        """The image tower's embedding of normalised pixels; through ``torch.compile`` when
        :attr:`torch_compile` is set (compiled at the first call; a compilation that fails,
        say for want of a C++ compiler or an unsupported operation, logs one warning and
        the model runs eager from then on). Layer-wise features always run eager.

        Only the image tower is compiled: the attacks' and fine-tuning loops spend their
        time there, and the text tower's forward hooks (word embeddings an attack learns)
        would make it recompile."""
        if getattr(self, "torch_compile", False):  # (a subclass may skip __init__)
            try:
                fn = getattr(self, "_compiled_image", None)
                if fn is None:
                    fn = self._compiled_image = torch.compile(self.clip.encode_image)
                return fn(pix)
            except Exception as exc:  # noqa: BLE001 (any compiler failure: run eager)
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                log.warning("torch.compile failed for %s (%s: %s): running eager", self.name,
                            type(exc).__name__, first)
                self.torch_compile, self._compiled_image = False, None
        return self.clip.encode_image(pix)

    def _hooked_image_forward(self, pix: torch.Tensor, names: list[str]):
        """Towers without ``forward_intermediates``: forward hooks on their stages."""
        modules = _image_stage_modules(self.clip.visual)
        acts: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def fn(_m, _inp, out):
                acts[name] = out[0] if isinstance(out, tuple) else out
            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        try:
            emb = self.clip.encode_image(pix)
        finally:
            for h in handles:
                h.remove()
        return emb, acts

    def _text_forward(self, tokens: torch.Tensor, names: list[str],
                      embeddings: torch.Tensor | None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.autocast(), self._token_embeddings(embeddings, tokens):
            if not names:
                return self.clip.encode_text(tokens).float(), {}
            tower = self._text_tower()
            if tower is self.clip:
                res = self.clip.forward_intermediates(text=tokens, text_indices=None,
                                                      normalize=False)
            else:
                res = tower.forward_intermediates(tokens, indices=None)
            inter = list(res["text_intermediates"])
            acts = {n: inter[int(n.removeprefix("text_block"))] for n in names}
            return res["text_features"].float(), acts

    @contextlib.contextmanager
    def _token_embeddings(self, embeddings: torch.Tensor | None, tokens: torch.Tensor):
        """Replace the token-embedding lookup's output by ``embeddings`` for one forward."""
        if embeddings is None:
            yield
            return
        if tuple(embeddings.shape[:2]) != tuple(tokens.shape):
            raise ValueError(f"text_embeddings {tuple(embeddings.shape)} do not match the "
                             f"tokens {tuple(tokens.shape)}")
        handle = self.token_embedding.register_forward_hook(
            lambda _m, _i, out: embeddings.to(out.device, out.dtype))
        try:
            yield
        finally:
            handle.remove()

    def _text_tower(self) -> nn.Module:
        if hasattr(self.clip, "transformer") and hasattr(self.clip, "token_embedding"):
            return self.clip
        text = getattr(self.clip, "text", None)
        if text is not None and hasattr(text, "forward_intermediates") \
                and hasattr(text, "token_embedding"):
            return text
        raise MmsecError(f"model {self.name}: its text tower has no layer-wise features")

    # ------------------------------------------------------------------ encoders
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B,3,H,W] pixels in [0,1] -> [B,D] float32 embeddings (L2-normalised by default)."""
        return self.forward(images=pixels, normalize=normalize)["image_features"]

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = True,
                    batch_size: int = 512, *, embeddings: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Texts (strings or token ids ``[M, L]``) -> ``[M, D]`` float32 embeddings.

        ``embeddings`` (``[M, L, W]``, differentiable) replace the token embeddings of the
        given token ids, e.g. a learned word at one position.
        """
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        tokens = tokens.to(self.device)
        outs = []
        for start in range(0, len(tokens), batch_size):
            chunk = tokens[start:start + batch_size]
            emb = None if embeddings is None else embeddings[start:start + batch_size]
            outs.append(self.forward(texts=chunk, text_embeddings=emb,
                                     normalize=normalize)["text_features"])
        if not outs:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(outs)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The text tower's token-embedding table (model token ids -> vectors)."""
        for owner in (self.clip, getattr(self.clip, "text", None)):
            emb = getattr(owner, "token_embedding", None)
            if isinstance(emb, nn.Embedding):
                return emb
        raise MmsecError(f"model {self.name}: no token-embedding table in its text tower")

    def vocabulary(self) -> Vocabulary:
        """The whole words of the model's own tokenizer (ids into :attr:`token_embedding`)."""
        return _whole_words(self.tokenizer)

    def zero_shot_head(self, classnames: Sequence[str],
                       templates: Sequence[str] = ("a photo of a {}.",)) -> torch.Tensor:
        """[C,D] class embeddings: the normalised mean over templates.

        Cached per text-tower weights version (a cheap key; no weight is hashed): computed
        again only after the text tower changed. At most 16 heads are kept.
        """
        key = (self.weights_version("text"), tuple(classnames), tuple(templates))
        head = self._heads.get(key)
        if head is None:
            with torch.no_grad():
                texts = [t.format(c) for c in classnames for t in templates]
                emb = self.encode_text(texts).view(len(classnames), len(templates), -1)
                head = F.normalize(emb.mean(1), dim=-1)
            self._heads[key] = head
            while len(self._heads) > _HEAD_CACHE_SIZE:
                self._heads.popitem(last=False)
        else:
            self._heads.move_to_end(key)
        return head

    def logits(self, pixels: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits [B,C] = logit_scale * cos(image, class) (differentiable in pixels)."""
        return self.logit_scale * self.encode_image(pixels) @ head.t()

    # ------------------------------------------------------------------ towers and layers
    def tower_parameters(self, tower: Tower = "all") -> list[nn.Parameter]:
        """The parameters of ``tower``: ``image`` (the visual tower), ``text`` (everything
        else except ``logit_scale``/``logit_bias``) or ``all``."""
        if tower == "all":
            return list(self.clip.parameters())
        visual = {id(p) for p in self.clip.visual.parameters()}
        if tower == "image":
            return list(self.clip.visual.parameters())
        if tower == "text":
            return [p for n, p in self.clip.named_parameters()
                    if id(p) not in visual and n not in ("logit_scale", "logit_bias")]
        raise UsageError(f"unknown tower {tower!r} (image, text, all)")

    def tower_modules(self, tower: Tower = "all") -> list[nn.Module]:
        """The top-level modules of ``tower`` (what to put in train mode when it trains)."""
        if tower == "all":
            return [self.clip]
        if tower == "image":
            return [self.clip.visual]
        if tower == "text":
            return [m for n, m in self.clip.named_children() if n != "visual"]
        raise UsageError(f"unknown tower {tower!r} (image, text, all)")

    def lock(self, *towers: Tower) -> ClipModel:
        """Freeze ``towers`` (``requires_grad=False``), e.g. ``model.lock("image")`` to
        fine-tune the text tower only (LiT); :meth:`unlock` undoes it. Attacks need no lock
        (their gradients go to the pixels only), and a locked ViT computes the gradient to
        the pixels ~1.5x slower on the CPU (``benchmarks/frozen_weights.py``)."""
        for tower in towers:
            for p in self.tower_parameters(tower):
                p.requires_grad_(False)
        return self

    def unlock(self, *towers: Tower) -> ClipModel:
        for tower in towers or ("all",):
            for p in self.tower_parameters(tower):
                p.requires_grad_(True)
        return self

    def layer_names(self, tower: str = "image") -> list[str]:
        """Named layers of a tower, input to output: ResNet stages (``layer1``..``layer4``)
        or ViT blocks (``block0``..); text blocks (``text_block0``..)."""
        if tower == "image":
            visual = self.clip.visual
            kind = _image_tower_kind(visual)
            if kind == "resnet":
                return [f"layer{i}" for i in range(1, 5)]
            if kind == "vit":
                return [f"block{i}" for i in range(len(visual.transformer.resblocks))]
            return list(_image_stage_modules(visual))
        if tower == "text":
            tower_module = self._text_tower()
            blocks = tower_module.transformer.resblocks
            return [f"text_block{i}" for i in range(len(blocks))]
        raise UsageError(f"unknown tower {tower!r} (image, text)")

    def forward_features(
        self, pixels: torch.Tensor, layers: Sequence[str] | None = None, pooled: bool = True,
        normalize: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(image embedding [B, D], {layer: activation})`` in one forward pass; the image
        side of :meth:`forward` (``layers=None``: every stage)."""
        out = self.forward(images=pixels, image_layers=True if layers is None else list(layers),
                           normalize=normalize, pooled=pooled)
        return out["image_features"], out.get("image_layers", {})

    # ------------------------------------------------------------------ identity & saving
    def weights_version(self, tower: Tower = "all") -> tuple[int, ...]:
        """A cheap key that changes whenever a parameter of ``tower`` is modified in place
        (optimiser steps, ``load_state_dict``) or replaced; no weight is read."""
        params = self.tower_parameters(tower)
        return tuple(int(p._version) for p in params) + tuple(int(p.data_ptr()) for p in params)

    def fingerprint_extra(self) -> dict[str, Any]:
        """What a subclass (a wrapper) adds to the computation besides its tensors, as JSON
        data. A subclass that overrides the forward pass must override this too (return
        ``{}`` when its own parameters and buffers say it all); until it does, its
        embeddings are never cached (:attr:`cacheable`)."""
        return {}

    @property
    def cacheable(self) -> bool:
        """Whether :attr:`fingerprint` covers everything this model computes: a plain
        ClipModel, or a subclass that declares its :meth:`fingerprint_extra`."""
        own = type(self).fingerprint_extra is not ClipModel.fingerprint_extra
        return type(self) is ClipModel or own

    @property
    def fingerprint(self) -> str:
        """Hash of weights + config + preprocessing (the embedding cache's key); the weights
        are hashed again only when :meth:`weights_version` changed. A subclass's class,
        own tensors and :meth:`fingerprint_extra` are part of it."""
        extra_state = {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}
        version = self.weights_version("all") + tuple(
            int(b._version) for b in self.clip.buffers()) + tuple(
            (int(v._version), int(v.data_ptr())) for v in extra_state.values())
        if self._fp is None or self._fp[0] != version:
            h = hashlib.sha256()
            h.update(json.dumps({"name": self.name, "size": self.image_size,
                                 "mean": self.mean.flatten().tolist(),
                                 "std": self.std.flatten().tolist(), "prep": "v1"}).encode())
            tensors = sorted(self.clip.state_dict().items())
            if type(self) is not ClipModel:
                cls = f"{type(self).__module__}.{type(self).__qualname__}"
                h.update(json.dumps({"class": cls, "extra": self.fingerprint_extra()},
                                    sort_keys=True, default=str).encode())
                tensors += sorted(extra_state.items())
            for k, v in tensors:
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                         .tobytes())
            self._fp = (version, h.hexdigest()[:24])
        return self._fp[1]

    def checkpoint_metadata(self) -> dict[str, str]:
        meta = {"format": CHECKPOINT_FORMAT, "model": self.name,
                "image_size": str(self.image_size),
                "mean": json.dumps(self.mean.flatten().tolist()),
                "std": json.dumps(self.std.flatten().tolist())}
        if self.info.get("zoo"):
            meta["zoo"] = json.dumps(self.info["zoo_spec"])
        return meta

    def wrapper_spec(self) -> dict[str, Any] | None:
        """For a subclass (a wrapper): what a checkpoint records so that loading it does not
        silently drop the wrapper. Subclasses that can be rebuilt override this (and
        :meth:`wrapper_tensors`); the default only names the class, which loading refuses."""
        if type(self) is ClipModel:
            return None
        return {"kind": "class", "class": f"{type(self).__module__}.{type(self).__qualname__}"}

    def wrapper_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        """Save the weights as safetensors (atomic) with what is needed to load them again
        (a wrapper's spec and tensors too)."""
        from .io import safetensors_bytes, write_atomic

        meta = {**self.checkpoint_metadata(), **(extra_metadata or {})}
        tensors = dict(self.clip.state_dict())
        spec = self.wrapper_spec()
        if spec is not None:
            meta["wrapper"] = json.dumps(spec)
            tensors.update({f"{WRAPPER_PREFIX}{k}": v for k, v in self.wrapper_tensors().items()})
        return write_atomic(path, safetensors_bytes(tensors, meta))

    def __deepcopy__(self, memo: dict) -> ClipModel:
        # A copy gets its own (empty) caches: they are keyed by this object's weights.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_heads":
                new.__dict__[key] = OrderedDict()
            elif key in ("_fp", "_compiled_image"):  # a copy compiles its own forward
                new.__dict__[key] = None
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def describe(self) -> str:
        return f"{self.name} ({self.pretrained or 'random init'})"


def _image_tower_kind(visual: nn.Module) -> str:
    """``resnet`` (open_clip ModifiedResNet), ``vit``, ``timm`` or ``hooks`` (anything else)."""
    if hasattr(visual, "layer1") and hasattr(visual, "attnpool"):
        return "resnet"
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks") \
            and hasattr(visual, "forward_intermediates"):
        return "vit"
    return "hooks"


def _image_stage_modules(visual: nn.Module) -> dict[str, nn.Module]:
    """Stages of an image tower read by forward hooks (timm towers and others)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        for attr in ("stages", "blocks", "layers"):
            seq = getattr(trunk, attr, None)
            if seq is not None:
                return {f"{attr}{i}": m for i, m in enumerate(seq)}
    raise MmsecError(f"image tower {type(visual).__name__}: no known layer structure for "
                     "layer-wise features")


# ---------------------------------------------------------------------- the zoo
ZOO_FORMAT_V1 = "mmsec-zoo-v1"  # weights of mmsec 0.1/0.2 zoo files: the spec is beside them


def user_zoo_dirs() -> list[Path]:
    """Where ``mmsec zoo train`` writes and ``zoo:NAME`` also looks: ``$MMSEC_ZOO``
    (several folders separated by the path separator) or the user data folder."""
    env = os.environ.get("MMSEC_ZOO")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    import platformdirs

    return [Path(platformdirs.user_data_dir("mmsec")) / "zoo"]


def zoo_dirs() -> list[Path]:
    """The shipped zoo first (its names cannot be shadowed), then the user zoo folders."""
    return [ZOO_DIR, *user_zoo_dirs()]


def zoo_entries() -> list[tuple[str, Path]]:
    """``(name, spec file)`` of every zoo model, shipped ones first; a user model with a
    shipped model's name is left out (``zoo:NAME`` would never reach it)."""
    seen: dict[str, Path] = {}
    for folder in zoo_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                seen.setdefault(path.stem, path)
    return list(seen.items())


def zoo_names() -> list[str]:
    return [name for name, _ in zoo_entries()]


def shipped_zoo_names() -> list[str]:
    return sorted(p.stem for p in ZOO_DIR.glob("*.json"))


def _zoo_spec_path(name: str) -> Path:
    for folder in zoo_dirs():
        if (folder / f"{name}.json").is_file():
            return folder / f"{name}.json"
    where = ", ".join(str(d) for d in user_zoo_dirs())
    raise UsageError(f"unknown zoo model {name!r} (available: {', '.join(zoo_names()) or 'none'};"
                     f" user zoo: {where}; or -m zoo:PATH/NAME.safetensors)")


def read_zoo_spec(name: str) -> dict:
    """The spec (``NAME.json``) of zoo model ``name``, shipped or in a user zoo folder."""
    path = _zoo_spec_path(name)
    spec = json.loads(path.read_text())
    spec["_dir"] = str(path.parent)
    return spec


def _is_path_like(name: str) -> bool:
    return os.path.sep in name or name.endswith((".safetensors", ".json")) or name.startswith(".")


def _zoo_file(path: str) -> tuple[dict, Path]:
    """``zoo:PATH``: a zoo checkpoint file (or its ``.json``) -> (spec, weights file)."""
    p = Path(path).expanduser()
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if not p.is_file():
        raise MmsecError(f"zoo checkpoint not found: {p}")
    from .io import load_tensors

    try:
        _, meta = load_tensors(p)
    except MmsecError:
        raise
    except Exception as exc:
        raise MmsecError(f"{p}: not a readable safetensors file ({exc})") from exc
    if "zoo" in meta:
        return json.loads(meta["zoo"]), p
    side = p.with_suffix(".json")
    if side.is_file():
        return json.loads(side.read_text()), p
    raise MmsecError(f"{p}: no zoo spec in its metadata and no {side.name} beside it "
                     "(not written by `mmsec zoo train`)")


#: the largest zoo model mmsec builds from a spec (its own are ~1 M parameters; ViT-g is 1 B)
MAX_ZOO_PARAMETERS = 1_000_000_000


def _cfg_int(cfg: Mapping[str, Any], key: str, default: int, lo: int = 1,
             hi: int = 1 << 20) -> int:
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)) and value:  # (h, w) sizes; a ResNet's stage depths
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise MmsecError(f"zoo spec: {key} = {value!r} holds a non-integer")
        value = sum(value) if key == "layers" else max(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MmsecError(f"zoo spec: {key} = {value!r} is not an integer in [{lo}, {hi}]")
    return value


def zoo_spec_parameters(spec: Mapping[str, Any]) -> int:
    """About how many parameters a zoo spec's model has, from its config alone (so a file
    whose metadata asks for a 65,536-wide tower is refused before anything is allocated)."""
    cfg = spec.get("model_cfg")
    if not isinstance(cfg, Mapping):
        raise MmsecError("zoo spec: no model_cfg mapping")
    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    if not isinstance(vision, Mapping) or not isinstance(text, Mapping):
        raise MmsecError("zoo spec: vision_cfg and text_cfg must be mappings")
    embed = _cfg_int(cfg, "embed_dim", 512)
    v_width, v_layers = _cfg_int(vision, "width", 768), _cfg_int(vision, "layers", 12, hi=1024)
    size, patch = _cfg_int(vision, "image_size", 224), _cfg_int(vision, "patch_size", 16)
    t_width, t_layers = _cfg_int(text, "width", 512), _cfg_int(text, "layers", 12, hi=1024)
    vocab, ctx = _cfg_int(text, "vocab_size", 49408), _cfg_int(text, "context_length", 77)
    for tower, part in (("vision_cfg", vision), ("text_cfg", text)):
        ratio = part.get("mlp_ratio", 4.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 16:
            raise MmsecError(f"zoo spec: {tower}.mlp_ratio = {ratio!r} is not in (0, 16]")
        _cfg_int(part, "attn_pooler_queries", 256, hi=4096)
    resnet = isinstance(vision.get("layers"), (list, tuple))  # stage depths; channels grow 8x
    vision_params = 12 * v_width * v_width * v_layers * (64 if resnet else 1) \
        + ((size // patch) ** 2 + 1) * v_width + 3 * patch * patch * v_width \
        + v_width * embed
    text_params = 12 * t_width * t_width * t_layers + (vocab + ctx) * t_width + t_width * embed
    return vision_params + text_params


def check_zoo_spec(spec: Mapping[str, Any], weights: Mapping[str, torch.Tensor] | None,
                   source: str) -> None:
    """Refuse a spec whose model would be absurdly large, or far larger than its weights."""
    try:
        planned = zoo_spec_parameters(spec)
    except MmsecError as exc:
        raise MmsecError(f"{source}: {exc}") from None
    held = sum(int(t.numel()) for t in weights.values()) if weights is not None else None
    if planned > MAX_ZOO_PARAMETERS or (held is not None and planned > 4 * held + 1_000_000):
        what = f" while the file holds {held:,}" if held is not None else ""
        raise MmsecError(f"{source}: its zoo spec describes a model of ~{planned:,} "
                         f"parameters{what}; refusing to build it (metadata tampered with?)")


def build_zoo_model(spec: dict) -> ClipModel:
    """An untrained ClipModel of a zoo spec (open_clip CLIP from its config, trimmed tokenizer)."""
    from open_clip.model import CLIP

    spec = {k: v for k, v in spec.items() if not k.startswith("_")}
    check_zoo_spec(spec, None, f"zoo:{spec.get('name')}")
    cfg = spec["model_cfg"]
    clip = CLIP(**cfg)
    if spec["vocab"] == "full":  # open_clip's whole BPE vocabulary
        from open_clip.tokenizer import SimpleTokenizer

        tok: Any = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    else:
        tok = TrimmedTokenizer(spec["vocab"], cfg["text_cfg"]["context_length"])
    return ClipModel(clip, tok, name=f"zoo:{spec['name']}", pretrained=None,
                     image_size=cfg["vision_cfg"]["image_size"], mean=spec["mean"],
                     std=spec["std"], info={"zoo": spec["name"], "zoo_spec": spec})


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and metadata from a safetensors file or a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise MmsecError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from .io import load_tensors

        return load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors, or refused non-weight objects
        raise MmsecError(f"{path}: cannot load as a torch state dict with weights_only=True "
                         f"({type(exc).__name__}{': ' if str(exc) else ''}"
                         f"{(str(exc).splitlines() or [''])[0][:200]})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MmsecError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly; a mismatch is one error listing the offending keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatch: {few(shapes)}" if shapes else ""]
        raise MmsecError(f"checkpoint {source} does not fit this model: "
                         + "; ".join(p for p in parts if p))
    # weights are cast to the model's dtype, but only between floating types: integer
    # weights are not weights (an int64 tensor cast to float loads a model of garbage), and
    # NaN/inf poison every output
    ints = sorted(f"{k} ({v.dtype})" for k, v in state.items()
                  if own[k].is_floating_point() and not v.is_floating_point())
    if ints:
        raise MmsecError(f"checkpoint {source}: non-floating weights: {', '.join(ints[:5])}"
                         + (f" (+{len(ints) - 5} more)" if len(ints) > 5 else ""))
    bad = sorted(k for k, v in state.items() if v.is_floating_point()
                 and not bool(torch.isfinite(v).all()))
    if bad:
        raise MmsecError(f"checkpoint {source}: NaN or infinite values in "
                         + ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5
                                                  else ""))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


# ---------------------------------------------------------------------- model sources
@dataclass(frozen=True)
class ModelSource:
    """A family of models that ``-m`` resolves and ``mmsec models`` lists.

    ``prefix`` is what a model spec starts with to name this source (``zoo`` in
    ``zoo:shapes``); the source with ``default=True`` takes specs without a known prefix.
    ``load(name, pretrained, state, meta) -> ClipModel`` builds the model on the CPU (``name``
    is the spec without the prefix, or None; ``state``/``meta`` are the weights and metadata
    of a checkpoint FILE given as ``pretrained``, else None); ``list_fn() -> [(model name,
    [pretrained tags or notes])]``.
    """

    name: str
    list_fn: Callable[[], list[tuple[str, list[str]]]]
    description: str = ""
    load: Callable[..., ClipModel] | None = None
    prefix: str | None = None
    default: bool = False
    plugin: str = field(default="mmsec", compare=False)


def _load_zoo(name: str | None, pretrained: str | None, state: dict | None,
              meta: Mapping[str, str]) -> ClipModel:
    """``zoo:NAME`` (shipped, then the user zoo), ``zoo:PATH.safetensors`` (a file written by
    ``mmsec zoo train``, spec in its metadata or beside it), or a zoo checkpoint given as
    ``--pretrained`` (its own spec wins over the name)."""
    name = name or DEFAULT_ZOO
    weights: Path | None = None
    if state is not None and "zoo" in meta:
        spec = json.loads(meta["zoo"])
    elif state is not None and meta.get("format") == ZOO_FORMAT_V1 and pretrained \
            and Path(pretrained).with_suffix(".json").is_file():
        spec = json.loads(Path(pretrained).with_suffix(".json").read_text())
    elif _is_path_like(name):
        spec, weights = _zoo_file(name)
    else:
        spec = read_zoo_spec(name)
        weights = Path(spec["_dir"]) / spec["weights"]
    source = str(pretrained)
    given = state is not None
    if state is None:  # read the weights first: the spec is checked against them
        assert weights is not None
        if not weights.exists():
            raise MmsecError(f"zoo model {name!r} has no weights at {weights}; "
                             f"run `mmsec zoo train --name {name}`")
        state, _ = read_state_dict(weights)
        source = str(weights)
    # a spec that came with the weights must fit them (the shipped zoo's own is trusted; a
    # stranger's weights for it get load_weights' key/shape report instead)
    from_file = given and ("zoo" in meta or meta.get("format") == ZOO_FORMAT_V1)
    check_zoo_spec(spec, state if from_file else None, source)
    cm = build_zoo_model(spec)
    if given:
        cm.pretrained = str(pretrained)
    else:
        cm.pretrained = f"zoo:{name}" if not _is_path_like(name) else str(weights)
    load_weights(cm.clip, state, source)
    return cm


def _load_open_clip(name: str | None, pretrained: str | None, state: dict | None,
                    meta: Mapping[str, str]) -> ClipModel:
    import open_clip

    if not name or name not in open_clip.list_models():
        raise UsageError(f"unknown model {name!r}: not an open_clip architecture or zoo:NAME "
                         f"(see `mmsec models`)")
    try:
        clip = open_clip.create_model(name, pretrained=None if state is not None else pretrained)
    except RuntimeError as exc:
        raise MmsecError(f"open_clip could not create {name} with pretrained={pretrained!r}: "
                         f"{(str(exc).splitlines() or [''])[0]}") from exc
    if state is not None:
        load_weights(clip, state, str(pretrained))
    cfg = open_clip.get_model_config(name) or {}
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return ClipModel(clip, open_clip.get_tokenizer(name), name=name, pretrained=pretrained,
                     image_size=size, mean=mean, std=std, info={"open_clip_cfg": cfg})


def _zoo_listing() -> list[tuple[str, list[str]]]:
    out = []
    for name, path in zoo_entries():
        spec = json.loads(path.read_text())
        m = spec.get("metrics", {})
        score = (f"zero-shot top-1 {m['zero_shot_top1']}" if "zero_shot_top1" in m else
                 f"i2t R@1 {m['i2t_r1']}" if "i2t_r1" in m else "not measured")
        where = "" if path.parent == ZOO_DIR else f" ({path.parent})"
        out.append((f"zoo:{name}", [f"{spec.get('dataset')} {score}{where}"]))
    return out


def _open_clip_listing() -> list[tuple[str, list[str]]]:
    import open_clip

    tags: dict[str, list[str]] = {}
    for arch, tag in open_clip.list_pretrained():
        tags.setdefault(arch, []).append(tag)
    return [(m, tags.get(m, [])) for m in open_clip.list_models()]


def builtin_model_sources() -> list[ModelSource]:
    """The zoo (``zoo:NAME``, and the default when no model is named) and open_clip."""
    return [
        ModelSource("zoo", _zoo_listing, "embedded CLIPs trained and shipped by mmsec",
                    load=_load_zoo, prefix="zoo"),
        ModelSource("open_clip", _open_clip_listing,
                    "open_clip architectures; pretrained tags download on first use",
                    load=_load_open_clip, default=True),
    ]


def _is_file(pretrained: str | None) -> bool:
    return pretrained is not None and (
        os.path.sep in pretrained or Path(pretrained).exists()
        or pretrained.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")))


def load_model(
    model: str | None = None, pretrained: str | None = None, *, device: str | None = "auto",
    precision: str = "fp32", sources: Mapping[str, ModelSource] | None = None,
    defenses: Callable[[str], type] | None = None, compile: bool = False,
    channels_last: bool = False,
) -> ClipModel:
    """Load a ClipModel from a registered model source (see the module doc).

    ``model`` is ``PREFIX:NAME`` for a source with that prefix (``zoo:shapes``), a bare name
    for the default source (open_clip), or None: the architecture a checkpoint FILE given as
    ``pretrained`` records, else the embedded default. ``sources``: the registry's
    ``models`` (None: the built-in ones). ``compile``: run the image tower through
    ``torch.compile`` (:attr:`ClipModel.torch_compile`); ``channels_last``: the image tower
    in channels-last memory format (:attr:`ClipModel.channels_last`).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (fp32, bf16, fp16)")
    table = {s.name: s for s in builtin_model_sources()} if sources is None else dict(sources)
    loadable = [s for s in table.values() if s.load is not None]
    is_file = _is_file(pretrained)
    state, meta = read_state_dict(pretrained) if is_file else (None, {})
    wrapper = json.loads(meta["wrapper"]) if "wrapper" in meta else None
    wrapped: dict[str, torch.Tensor] = {}
    if wrapper is not None:
        wrapped = {k[len(WRAPPER_PREFIX):]: v for k, v in state.items()
                   if k.startswith(WRAPPER_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(WRAPPER_PREFIX)}
        rebuildable = ("input-transform", "embedding-adapter")
        if wrapper.get("kind") not in rebuildable or defenses is None:
            raise MmsecError(
                f"{pretrained}: a wrapped model ({wrapper.get('class') or wrapper.get('defense')})"
                "; mmsec will not load it without its wrapper"
                + ("" if wrapper.get("kind") in rebuildable else
                   " (only input-transform and adapter defenses can be rebuilt from a "
                   "checkpoint)"))
    if model is None and meta.get("format") == CHECKPOINT_FORMAT:
        model = meta["model"]
    if model is None and meta.get("format") == ZOO_FORMAT_V1 and meta.get("name"):
        model = f"zoo:{meta['name']}"
    if model is None and pretrained is not None and not is_file:
        raise UsageError(f"--pretrained {pretrained!r} is a tag: name its architecture with -m")
    if model is None or model == "zoo":
        model = f"zoo:{DEFAULT_ZOO}"
    prefix, sep, rest = model.partition(":")
    source = next((s for s in loadable if sep and s.prefix == prefix), None)
    name: str | None = rest if source is not None else model
    if source is None:
        source = next((s for s in loadable if s.default), None)
    if source is None:
        raise UsageError(f"no model source can load {model!r} (see `mmsec models`)")
    try:
        cm = source.load(name, pretrained, state, meta)
    except (UsageError, MmsecError):
        raise
    except Exception as exc:  # a third-party source may raise anything
        raise MmsecError(f'model source "{source.name}" (plugin {source.plugin}) failed to '
                         f"load {model!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(cm, ClipModel):
        raise MmsecError(f'model source "{source.name}" returned {type(cm).__name__}, '
                         "not a ClipModel")
    cm.info["source"] = source.name
    cm.precision = precision
    cm.torch_compile = bool(compile)
    if wrapper is not None:
        from .defenses import rebuild_wrapper

        cm = rebuild_wrapper(cm, wrapper, wrapped, defenses)
    cm = cm.to(pick_device(device)).eval()
    if channels_last:
        cm.channels_last = True
    return cm
