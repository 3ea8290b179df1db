"""Does a model's tokenizer read the texts it is given?

A small CLIP with a trimmed vocabulary (the zoo models keep only the words of the data they
were trained on) reads any other word as one unknown token: "a photo of a kangaroo" and "a
photo of a wombat" become the same token sequence, the two classes get the same zero-shot
embedding, and every zero-shot or retrieval number on such data is meaningless. A text
longer than the tokenizer's context is cut. This module measures both, so a run can warn
(and fail under ``--strict``) instead of reporting garbage:

    cov = prompt_coverage(model.tokenizer, classnames, templates)
    if not cov.ok:
        print(cov.message())   # 'zero-shot prompts: 8 words unknown to the tokenizer ...'

Tokenizers understood: mmsec's ``TrimmedTokenizer`` (unknown words and truncation) and
open_clip's ``SimpleTokenizer`` (truncation; its byte-level BPE has no unknown token).
For any other tokenizer only identical token sequences are detected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TextCoverage", "prompt_coverage", "text_coverage"]

_EXAMPLES = 3


@dataclass
class TextCoverage:
    """How well a tokenizer reads a set of texts.

    ``lost``: word -> number of texts that lost it to the unknown token; ``truncated``:
    texts cut at the context length; ``identical``: texts whose token sequence equals that
    of a different text; for class prompts, ``classes`` and ``distinct_classes`` (classes
    whose prompts the model can tell apart).
    """

    what: str
    texts: int
    lost: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    identical: int = 0
    examples: list[list[str]] = field(default_factory=list)
    classes: int | None = None
    distinct_classes: int | None = None

    @property
    def ok(self) -> bool:
        collapsed = self.classes is not None and self.distinct_classes != self.classes
        return not (self.lost or self.truncated or self.identical or collapsed)

    def message(self) -> str:
        """One line a user can act on (empty when everything is read)."""
        if self.ok:
            return ""
        parts = []
        if self.lost:
            words = sorted(self.lost, key=lambda w: (-self.lost[w], w))
            shown = ", ".join(words[:8]) + (f" (+{len(words) - 8} more)" if len(words) > 8 else "")
            hit = sum(self.lost.values())
            parts.append(f"{len(words)} word(s) unknown to the model's tokenizer ({shown}; "
                         f"{hit} word occurrence(s) read as the unknown token)")
        if self.truncated:
            parts.append(f"{self.truncated} of {self.texts} text(s) cut at the tokenizer's "
                         "context length")
        if self.classes is not None and self.distinct_classes != self.classes:
            parts.append(f"the {self.classes} classes' prompts read as only "
                         f"{self.distinct_classes} distinct class(es)")
        if self.identical:
            example = " = ".join(repr(t) for t in self.examples[0][:2]) if self.examples else ""
            parts.append(f"{self.identical} of {self.texts} text(s) tokenize identically to a "
                         f"different one" + (f" (e.g. {example})" if example else ""))
        return f"{self.what}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"texts": self.texts, "unknown_words": dict(sorted(self.lost.items())),
                               "truncated": self.truncated, "identical": self.identical}
        if self.classes is not None:
            out.update(classes=self.classes, distinct_classes=self.distinct_classes)
        if self.examples:
            out["examples"] = self.examples
        return out


def _base(tokenizer: Any) -> Any:
    """The BPE tokenizer under ``tokenizer`` (open_clip ``SimpleTokenizer``) or None."""
    base = getattr(tokenizer, "base", tokenizer)
    return base if hasattr(base, "encode") and hasattr(base, "pat") else None


def _known_ids(tokenizer: Any) -> set[int] | None:
    vocab = getattr(tokenizer, "vocab", None)
    if isinstance(vocab, (list, tuple)) and hasattr(tokenizer, "base"):
        return set(int(v) for v in vocab)
    return None  # a full BPE vocabulary: no word is unknown


def _words(base: Any, text: str) -> list[str]:
    """The pieces the BPE tokenizer splits ``text`` into before BPE (words, digits, marks)."""
    import regex

    clean = getattr(base, "clean_fn", None)
    return regex.findall(base.pat, clean(text) if callable(clean) else text.lower())


def text_coverage(tokenizer: Any, texts: Sequence[str], what: str = "texts") -> TextCoverage:
    """Unknown words, truncation and identical token sequences of ``texts``."""
    texts = list(texts)
    cov = TextCoverage(what, len(texts))
    if not texts:
        return cov
    base, known = _base(tokenizer), _known_ids(tokenizer)
    context = getattr(tokenizer, "context_length", None) or getattr(base, "context_length", None)
    word_ok: dict[str, bool] = {}
    for text, n in Counter(texts).items():
        if base is None:
            continue
        ids = base.encode(text)
        if context and len(ids) + 2 > int(context):
            cov.truncated += n
        if known is None or all(i in known for i in ids):
            continue
        for word in _words(base, text):
            if word not in word_ok:
                word_ok[word] = all(i in known for i in base.encode(word))
            if not word_ok[word]:
                cov.lost[word] = cov.lost.get(word, 0) + n
    rows = tokenizer(texts)
    rows = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows)
    groups: dict[tuple[int, ...], set[str]] = {}
    for text, row in zip(texts, rows.tolist(), strict=True):
        groups.setdefault(tuple(row), set()).add(text)
    clashes = [sorted(g) for g in groups.values() if len(g) > 1]
    cov.identical = sum(len(g) for g in clashes)
    cov.examples = clashes[:_EXAMPLES]
    return cov


def prompt_coverage(tokenizer: Any, classnames: Sequence[str],
                    templates: Sequence[str]) -> TextCoverage:
    """:func:`text_coverage` of the zero-shot prompts, plus how many classes stay distinct
    (a class is its set of prompt token sequences)."""
    prompts = [t.format(c) for c in classnames for t in templates]
    cov = text_coverage(tokenizer, prompts, "zero-shot prompts")
    rows = tokenizer(prompts)
    rows = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows)
    rows = rows.view(len(classnames), len(templates), -1)
    signatures = {tuple(map(tuple, rows[c].tolist())) for c in range(len(classnames))}
    cov.classes, cov.distinct_classes = len(classnames), len(signatures)
    if cov.distinct_classes == cov.classes:
        cov.identical, cov.examples = 0, []  # the same template twice is not a problem
    return cov
