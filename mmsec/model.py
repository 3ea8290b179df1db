"""ClipModel: the one CLIP wrapper every plugin uses.

Pixels go in as float tensors in [0, 1] at any size; resizing to the model's
input size and the model's own mean/std normalisation happen inside, and are
differentiable, so attacks never see (or get wrong) a normalised tensor.

Sources of weights (``load_model``):
- the embedded zoo (``model=None``, ``"zoo"`` or ``"zoo:NAME"``): small CLIPs
  trained by ``mmsec zoo train`` and shipped in ``mmsec/zoo/``;
- an open_clip architecture with a pretrained tag (open_clip downloads it on
  a machine with network) -- ``load_model("ViT-B-32", "laion2b_s34b_b79k")``;
- a local checkpoint file (safetensors, or a torch state dict read with
  ``weights_only=True``) for an open_clip architecture or a zoo model. Files
  written by ``ClipModel.save`` carry their architecture in their metadata,
  so ``load_model(pretrained="repaired.safetensors")`` needs no ``model``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MmsecError, UsageError

log = logging.getLogger("mmsec.model")

ZOO_DIR = Path(__file__).parent / "zoo"
DEFAULT_ZOO = "shapes"
CHECKPOINT_FORMAT = "mmsec-clip-v1"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda if present, else mps, else cpu; anything else as given (validated)."""
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
    return dev


class TrimmedTokenizer:
    """open_clip's BPE tokenizer followed by a map onto a small vocabulary.

    Zoo models keep only the BPE tokens their captions use, so their token
    table is tiny. Ids are kept in ascending BPE order, so the end-of-text
    token stays the largest id (open_clip pools the text at the argmax id).
    Unknown tokens map to id 1.
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


class ClipModel(nn.Module):
    """A CLIP (open_clip) model behind a pixels-in-[0,1] interface.

    Attributes: ``name`` (architecture), ``pretrained`` (tag/file/zoo), ``image_size``,
    ``mean``/``std`` (the model's own), ``embed_dim``, ``precision``, ``info`` (zoo metadata).
    """

    def __init__(
        self, clip: nn.Module, tokenizer, *, name: str, pretrained: str | None,
        image_size: int, mean: Sequence[float], std: Sequence[float],
        precision: str = "fp32", info: dict | None = None,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision {precision!r} (fp32, bf16, fp16)")
        self.clip = clip
        self.tokenizer = tokenizer
        self.name, self.pretrained = name, pretrained
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.precision = precision
        self.info = dict(info or {})
        self._heads: dict = {}
        self._fp: tuple[tuple, str] | None = None
        self.clip.eval()

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[1]) if hasattr(self.clip, "text_projection") \
            else int(self.encode_text(["x"]).shape[-1])

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the configured precision (a no-op in fp32).

        On the CPU, reduced precision runs only with ``MMSEC_CPU_AUTOCAST=1``: torch's CPU
        bf16 convolutions hang on some processors (seen with torch 2.14 on AMD EPYC), and
        they are slower than fp32 on CPUs without bf16 units anyway.
        """
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if self.device.type == "cpu" and os.environ.get("MMSEC_CPU_AUTOCAST") != "1":
            if not getattr(self, "_warned_cpu_precision", False):
                self._warned_cpu_precision = True
                log.warning("precision %s requested on the CPU: running fp32 "
                            "(set MMSEC_CPU_AUTOCAST=1 to force CPU autocast)", self.precision)
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable: [B,3,H,W] in [0,1] -> resized (shorter side, centre crop) and normalised."""
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
        return (pixels - self.mean) / self.std

    # ------------------------------------------------------------------ encoders
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B,3,H,W] pixels in [0,1] -> [B,D] float32 embeddings (L2-normalised by default)."""
        with self.autocast():
            emb = self.clip.encode_image(self.preprocess(pixels))
        emb = emb.float()
        return F.normalize(emb, dim=-1) if normalize else emb

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = True,
                    batch_size: int = 512) -> torch.Tensor:
        """Texts (strings or token ids) -> [N,D] float32 embeddings (L2-normalised by default)."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        outs = []
        for chunk in tokens.to(self.device).split(batch_size):
            with self.autocast():
                outs.append(self.clip.encode_text(chunk).float())
        emb = torch.cat(outs)
        return F.normalize(emb, dim=-1) if normalize else emb

    def zero_shot_head(self, classnames: Sequence[str],
                       templates: Sequence[str] = ("a photo of a {}.",)) -> torch.Tensor:
        """[C,D] class embeddings: the normalised mean over templates, computed once per weights."""
        key = (self.fingerprint, tuple(classnames), tuple(templates))
        if key not in self._heads:
            with torch.no_grad():
                texts = [t.format(c) for c in classnames for t in templates]
                emb = self.encode_text(texts).view(len(classnames), len(templates), -1)
                self._heads[key] = F.normalize(emb.mean(1), dim=-1)
        return self._heads[key]

    def logits(self, pixels: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits [B,C] = logit_scale * cos(image, class) (differentiable in pixels)."""
        return self.logit_scale * self.encode_image(pixels) @ head.t()

    # ------------------------------------------------------------------ layer-wise features
    def layer_modules(self) -> dict[str, nn.Module]:
        """Named encoder stages of the image tower: ResNet stages or ViT blocks, input to output."""
        v = self.clip.visual
        if hasattr(v, "layer1") and hasattr(v, "attnpool"):  # open_clip ModifiedResNet
            return {f"layer{i}": getattr(v, f"layer{i}") for i in range(1, 5)}
        if hasattr(v, "transformer") and hasattr(v.transformer, "resblocks"):  # ViT
            return {f"block{i}": b for i, b in enumerate(v.transformer.resblocks)}
        trunk = getattr(v, "trunk", None)  # timm towers
        if trunk is not None:
            for attr in ("stages", "blocks", "layers"):
                seq = getattr(trunk, attr, None)
                if seq is not None:
                    return {f"{attr}{i}": m for i, m in enumerate(seq)}
        raise MmsecError(f"model {self.name}: no known layer structure for layer-wise features")

    def layer_names(self) -> list[str]:
        return list(self.layer_modules())

    def forward_features(
        self, pixels: torch.Tensor, layers: Sequence[str] | None = None, pooled: bool = True,
        normalize: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image embedding and per-stage activations in one (differentiable) forward pass.

        Returns ``(embedding [B,D], {layer: activation})``. Pooled activations are
        ``[B,C]``: the spatial mean for conv stages, the token mean for ViT blocks.
        With ``pooled=False`` the raw stage outputs are returned (ViT as [B,L,D]).
        """
        modules = self.layer_modules()
        names = list(modules) if layers is None else list(layers)
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise UsageError(f"unknown layer(s) {unknown}; known: {list(modules)}")
        acts: dict[str, torch.Tensor] = {}
        batch = pixels.shape[0] if pixels.ndim == 4 else 1

        def hook(name: str):
            def fn(_m, _inp, out):
                out = out[0] if isinstance(out, tuple) else out
                if out.ndim == 3 and out.shape[0] != batch and out.shape[1] == batch:
                    out = out.transpose(0, 1)  # sequence-first transformers
                if pooled:
                    out = out.float().mean(dim=(2, 3)) if out.ndim == 4 else out.float().mean(dim=1)
                acts[name] = out
            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        try:
            emb = self.encode_image(pixels, normalize=normalize)
        finally:
            for h in handles:
                h.remove()
        return emb, acts

    # ------------------------------------------------------------------ identity & saving
    @property
    def fingerprint(self) -> str:
        """Hash of weights + config + preprocessing; recomputed only when a parameter changes."""
        params = list(self.clip.state_dict(keep_vars=True).values())
        version = tuple(int(p._version) for p in params) + (sum(int(p.data_ptr()) for p in params),)
        if self._fp is None or self._fp[0] != version:
            h = hashlib.sha256()
            h.update(json.dumps({"name": self.name, "size": self.image_size,
                                 "mean": self.mean.flatten().tolist(),
                                 "std": self.std.flatten().tolist(), "prep": "v1"}).encode())
            for k, v in sorted(self.clip.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                         .tobytes())
            self._fp = (version, h.hexdigest()[:24])
        return self._fp[1]

    def checkpoint_metadata(self) -> dict[str, str]:
        meta = {"format": CHECKPOINT_FORMAT, "model": self.name, "image_size": str(self.image_size),
                "mean": json.dumps(self.mean.flatten().tolist()),
                "std": json.dumps(self.std.flatten().tolist())}
        if self.info.get("zoo"):
            meta["zoo"] = json.dumps(self.info["zoo_spec"])
        return meta

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        """Save the weights as safetensors (atomic) with what is needed to load them again."""
        from .runs import safetensors_bytes, write_atomic

        meta = {**self.checkpoint_metadata(), **(extra_metadata or {})}
        return write_atomic(path, safetensors_bytes(self.clip.state_dict(), meta))

    def train(self, mode: bool = True) -> ClipModel:
        super().train(mode)
        return self

    def describe(self) -> str:
        return f"{self.name} ({self.pretrained or 'random init'})"


# ---------------------------------------------------------------------- loading
def zoo_names() -> list[str]:
    return sorted(p.stem for p in ZOO_DIR.glob("*.json"))


def read_zoo_spec(name: str) -> dict:
    path = ZOO_DIR / f"{name}.json"
    if not path.exists():
        raise UsageError(f"unknown zoo model {name!r} (available: {', '.join(zoo_names()) or 'none'})")
    return json.loads(path.read_text())


def build_zoo_model(spec: dict) -> ClipModel:
    """An untrained ClipModel of a zoo spec (open_clip CLIP from its config, trimmed tokenizer)."""
    from open_clip.model import CLIP

    cfg = spec["model_cfg"]
    clip = CLIP(**cfg)
    tok = TrimmedTokenizer(spec["vocab"], cfg["text_cfg"]["context_length"])
    return ClipModel(clip, tok, name=f"zoo:{spec['name']}", pretrained=None,
                     image_size=cfg["vision_cfg"]["image_size"], mean=spec["mean"], std=spec["std"],
                     info={"zoo": spec["name"], "zoo_spec": spec})


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and metadata from a safetensors file or a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise MmsecError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except Exception as exc:  # safetensors raises several types for bad files
            raise MmsecError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors, or refused non-weight objects
        raise MmsecError(f"{path}: cannot load as a torch state dict with weights_only=True "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
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
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_model(
    model: str | None = None, pretrained: str | None = None, *, device: str | None = "auto",
    precision: str = "fp32",
) -> ClipModel:
    """Load a ClipModel from the zoo, an open_clip name + tag, or a checkpoint file (see module doc)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (fp32, bf16, fp16)")
    is_file = pretrained is not None and (os.path.sep in pretrained or pretrained.endswith(
        (".safetensors", ".pt", ".pth", ".bin", ".ckpt")) or Path(pretrained).exists())
    state, meta = read_state_dict(pretrained) if is_file else (None, {})
    if model is None and meta.get("format") == CHECKPOINT_FORMAT:
        model = meta["model"]
    if model is None and pretrained is not None and not is_file:
        raise UsageError(f"--pretrained {pretrained!r} is a tag: name its architecture with -m")
    if model is None or model == "zoo" or model.startswith("zoo:"):
        name = DEFAULT_ZOO if model in (None, "zoo") else model.split(":", 1)[1]
        spec = json.loads(meta["zoo"]) if "zoo" in meta else read_zoo_spec(name)
        cm = build_zoo_model(spec)
        if state is None:
            weights = ZOO_DIR / spec["weights"]
            if not weights.exists():
                raise MmsecError(f"zoo model {name!r} has no weights at {weights}; "
                                 f"run `mmsec zoo train --name {name}`")
            state, _ = read_state_dict(weights)
            cm.pretrained = f"zoo:{name}"
        else:
            cm.pretrained = str(pretrained)
        load_weights(cm.clip, state, str(pretrained or weights))
    else:
        cm = _load_open_clip(model, pretrained, state)
    cm.precision = precision
    return cm.to(pick_device(device)).eval()


def _load_open_clip(name: str, pretrained: str | None, state: dict | None) -> ClipModel:
    import open_clip

    if name not in open_clip.list_models():
        raise UsageError(f"unknown model {name!r}: not an open_clip architecture or zoo:NAME "
                         f"(see `mmsec models`)")
    try:
        clip = open_clip.create_model(name, pretrained=None if state is not None else pretrained)
    except RuntimeError as exc:
        raise MmsecError(f"open_clip could not create {name} with pretrained={pretrained!r}: "
                         f"{str(exc).splitlines()[0]}") from exc
    if state is not None:
        load_weights(clip, state, str(pretrained))
    cfg = open_clip.get_model_config(name) or {}
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return ClipModel(clip, open_clip.get_tokenizer(name), name=name, pretrained=pretrained,
                     image_size=size, mean=mean, std=std, info={"open_clip_cfg": cfg})

