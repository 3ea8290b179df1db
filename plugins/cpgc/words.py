"""The text side of C-PGC in the model's own tokenizer: which word of a caption to replace,
where its token sits, and which real word a learned embedding snaps to.

The official code tokenises with BERT, decodes and re-tokenises for CLIP, assuming one BPE
token per word. Here words are found in the caption's text, the replaced word becomes a
*placeholder* word that is one token of the model's own vocabulary (so its position in the
token ids is known exactly), and the learned embedding goes in at that position.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

STOP_WORDS = frozenset("""
a an the and or but if then else of in on at by for with without to from into onto over under
above below between among through during before after about against is are was were be been
being am do does did doing have has had having it its this that these those there here which
who whom whose what when where why how all any both each few more most other some such no nor
not only own same so than too very can will just should now i me my we our you your he him his
she her they them their as up down out off again further once while because until s t
""".split())

_WORD = re.compile(r"[A-Za-z]+")


def words_of(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, word)`` of each alphabetic word of ``text``."""
    return [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]


def replace_word(text: str, span: tuple[int, int], word: str) -> str:
    return text[:span[0]] + word + text[span[1]:]


@torch.no_grad()
def important_words(model, texts: Sequence[str], batch_size: int = 512
                    ) -> list[tuple[int, int] | None]:
    """The span of each caption's most important non-stop word, or None.

    A word's importance is ``KL(softmax(t) || softmax(t_masked))`` between the caption's
    embedding and the embedding with that word removed (the official code masks it with
    BERT's [UNK], which is not a word of CLIP's tokenizers).
    """
    variants: list[str] = []
    owners: list[tuple[int, tuple[int, int]]] = []
    for i, text in enumerate(texts):
        for start, end, word in words_of(text):
            if word.lower() in STOP_WORDS:
                continue
            variants.append(" ".join((text[:start] + text[end:]).split()))
            owners.append((i, (start, end)))
    best: list[tuple[float, tuple[int, int]] | None] = [None] * len(texts)
    if not variants:
        return [None] * len(texts)
    clean = model.encode_text(list(texts), batch_size=batch_size)
    masked = model.encode_text(variants, batch_size=batch_size)
    rows = torch.tensor([i for i, _ in owners], device=clean.device)
    p = clean[rows].log_softmax(-1)
    q = masked.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).tolist()
    for (i, span), score in zip(owners, kl, strict=True):
        if best[i] is None or score > best[i][0]:
            best[i] = (score, span)
    return [b[1] if b is not None else None for b in best]


def placeholder_words(vocab_words: Sequence[str]) -> tuple[str, str]:
    """Two single-token, non-stop words of the vocabulary to stand for the replaced word
    (two, so one of them never already occurs in a caption)."""
    pool = sorted(w for w in vocab_words if w not in STOP_WORDS and len(w) > 1)
    if len(pool) < 2:
        raise ValueError("the model's vocabulary has fewer than two usable words")
    return pool[0], pool[1]


def substitution_slots(model, texts: Sequence[str], spans: Sequence[tuple[int, int] | None],
                       holders: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of each caption with its important word replaced by a placeholder, and the
    placeholder's position (-1 where there is no word to replace, or it was truncated)."""
    ids = {w: int(model.tokenize([w])[0][1]) for w in holders}
    texts2, chosen = [], []
    for text, span in zip(texts, spans, strict=True):
        if span is None:
            texts2.append(text)
            chosen.append(None)
            continue
        words = {w.lower() for _, _, w in words_of(text)}
        holder = holders[0] if holders[0] not in words else holders[1]
        texts2.append(replace_word(text, span, holder))
        chosen.append(ids[holder])
    tokens = model.tokenize(texts2).cpu()
    position = torch.full((len(texts2),), -1, dtype=torch.long)
    for i, tid in enumerate(chosen):
        if tid is not None:
            hits = (tokens[i] == tid).nonzero().flatten()
            if len(hits):
                position[i] = int(hits[0])
    return tokens, position
