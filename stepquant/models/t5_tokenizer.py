"""A small T5 tokenizer made offline: a unigram vocabulary of the corpus' words and of single characters,
saved by transformers' own `T5Tokenizer` (tokenizer.json). For the test pipelines of PixArt, which cannot
download T5's 32,128-piece SentencePiece model; the layout is T5's own (<pad> 0, </s> 1, <unk> 2, then the
pieces), so every prompt has an encoding (characters outside the vocabulary become <unk>)."""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPACE = "\u2581"  # SentencePiece's word-boundary mark


def unigram_vocabulary(corpus: Iterable[str]) -> list[tuple[str, float]]:
    """T5's special pieces, then every corpus word (with its boundary mark) scored by its log frequency, then
    single characters scored far lower, so that words the corpus knows are one piece and others spell out."""
    words = Counter(f"{SPACE}{w}" for text in corpus for w in text.lower().split())
    total = sum(words.values())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (SPACE, -2.0)]
    pieces += [(w, math.log(n / total)) for w, n in sorted(words.items())]
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -20.0) for c in characters] + [(SPACE + c, -19.0) for c in characters]
    return list({piece: score for piece, score in pieces}.items())


def save_t5_tokenizer(directory: Path, corpus: Iterable[str], max_length: int = 512) -> Path:
    """Write a T5Tokenizer (no sentinel tokens) learned from `corpus` with transformers' own save."""
    from transformers import T5Tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    T5Tokenizer(vocab=unigram_vocabulary(corpus), extra_ids=0, model_max_length=max_length).save_pretrained(directory)
    return directory
