"""Token positions of words in a prompt, from the tokenizer's character offsets.

Splitting on whitespace gets multi-token words and punctuation wrong; offsets do not.
"""

from __future__ import annotations

import re

from .errors import ComposeError, TriggerNotInPromptError


class TokenizerMismatchError(ComposeError):
    """A pipeline's tokenizers split a prompt differently, so one set of token positions cannot serve both."""


def word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of every whole-word, case-insensitive occurrence of `word` (may be a phrase)."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(part) for part in word.split()) + r"(?!\w)"
    return [match.span() for match in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Indices (in the padded 77-token sequence, BOS = 0) of the tokens that spell `word` in `prompt`.

    Every occurrence counts; tokens cut off by the tokenizer's length limit are not returned.
    """
    spans = word_spans(prompt, word)
    if not spans:
        return []
    encoding = tokenizer(
        prompt,
        return_offsets_mapping=True,
        truncation=True,
        max_length=tokenizer.model_max_length,
        add_special_tokens=True,
    )
    positions = []
    for index, (start, end) in enumerate(encoding["offset_mapping"]):
        if end <= start:  # special tokens
            continue
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            positions.append(index)
    return positions


def require_word(tokenizer, prompt: str, word: str, lora_name: str) -> list[int]:
    """Positions of a LoRA's trigger word, or an error naming the trigger, the LoRA and the prompt."""
    positions = token_positions(tokenizer, prompt, word)
    if not positions:
        raise TriggerNotInPromptError(
            f"LoRA '{lora_name}' needs its trigger word '{word}' in the prompt, but the prompt "
            f"'{prompt}' does not contain it (within the first {tokenizer.model_max_length} tokens); add it"
        )
    return positions


def _spelled_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` up to the length limit, without padding (SDXL's tokenizers pad differently)."""
    return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]


def check_tokenizers_agree(tokenizers, texts) -> None:
    """SDXL concatenates its two text encoders' hidden states token by token: a word's positions found with
    the first tokenizer hold for the second only if both split every prompt alike. Raise if they do not."""
    first, *others = tokenizers
    for other in others:
        if other.model_max_length != first.model_max_length or other.get_vocab() != first.get_vocab():
            raise TokenizerMismatchError(
                "the pipeline's tokenizers have different vocabularies or lengths, so trigger-word positions "
                "would differ between its text encoders; use the model's original tokenizer and tokenizer_2"
            )
        for text in texts:
            if _spelled_ids(other, text) != _spelled_ids(first, text):
                raise TokenizerMismatchError(
                    f"the pipeline's tokenizers split '{text}' differently, so trigger-word positions would differ "
                    "between its text encoders; use the model's original tokenizer and tokenizer_2"
                )
