"""A small CLIP tokenizer made offline: byte-level BPE merges learned from a corpus, written as the
vocab.json and merges.txt that transformers' `CLIPTokenizer` reads. For the demo and test pipelines, which
cannot download OpenAI's 49,408-token vocabulary; the layout (256 byte symbols, the same with `</w>`,
the merges, then <|startoftext|> and <|endoftext|>) is CLIP's own, so every prompt has an encoding."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern, with the letter and number classes spelled for Python's re
_WORDS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+""", re.IGNORECASE)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE runs on."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _symbols(word: str, table: dict[int, str]) -> tuple[str, ...]:
    chars = [table[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + "</w>")


def learn_merges(corpus: Iterable[str], merges: int) -> list[tuple[str, str]]:
    """The `merges` most frequent symbol pairs, merged greedily over the corpus' words (ties: first seen)."""
    table = bytes_to_unicode()
    words = Counter(_symbols(w, table) for text in corpus for w in _WORDS.findall(" ".join(text.lower().split())))
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: pairs[pair])  # Counter keeps first-seen order: ties are deterministic
        learned.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return learned


def save_clip_tokenizer(directory: Path, corpus: Iterable[str], merges: int = 200, max_length: int = 77) -> Path:
    """Write a CLIPTokenizer (vocab.json, merges.txt, then transformers' own save) learned from `corpus`."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    learned = learn_merges(corpus, merges)
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(pair) for pair in learned), BOS, EOS]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(dict.fromkeys(vocab))}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learned))
    CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length
    ).save_pretrained(directory)
    return directory
