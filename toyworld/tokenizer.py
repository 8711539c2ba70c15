"""A CLIPTokenizer whose vocabulary holds every word of the toy world as one token.

Built in memory (no files, no hub). Byte-level single characters are in the vocabulary too, so an
unknown word splits into characters instead of failing.
"""
from __future__ import annotations

from transformers import CLIPTokenizer
from tokenizers.pre_tokenizers import ByteLevel

from .world import WORDS

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces byte-pair encoding makes of `word` with merges of the given ranks."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Add merges until byte-pair encoding turns each word into one token.

    A new merge can split a word that was already whole, so repeat until nothing changes.
    """
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words:
            pieces = _bpe(word, ranks)
            if len(pieces) > 1:
                ranks.setdefault((pieces[0], pieces[1]), len(ranks))
                changed = True
    merges = sorted(ranks, key=ranks.get)
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def build_tokenizer() -> CLIPTokenizer:
    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
