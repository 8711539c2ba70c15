"""One prompt per concept LoRA, derived from the user's prompt, and the concept tokens in each.

"a cat and a dog" with LoRAs sks/cat and zwx/dog gives the base prompt "a cat and a dog" and the
LoRA prompts "a sks cat and a dog" and "a cat and a zwx dog": each LoRA's prompt carries only its
own trigger, the other concepts stay plain words. A prompt that already holds triggers ("a sks cat
and a zwx dog") works the same way: the base prompt drops every trigger, each LoRA's prompt keeps
its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ComposeError
from .tokens import token_positions, word_spans


class ConceptError(ComposeError, ValueError):
    """Concept words cannot tell the LoRAs' concepts apart (e.g. two LoRAs share one)."""


class MissingConceptError(ConceptError):
    """A LoRA has no concept word (the plain class word, e.g. 'dog') and none can be inferred."""


class ConceptNotInPromptError(ConceptError):
    """A LoRA's concept word does not occur in a prompt that needs it."""


@dataclass(frozen=True)
class Concept:
    """One concept LoRA as the prompts see it: its name, trigger (may be None), concept word, prompt override."""

    name: str
    trigger: str | None
    word: str
    prompt: str | None = None


@dataclass(frozen=True)
class ConceptPrompts:
    """prompts[0] is the base prompt, prompts[k] the prompt of concept k-1.

    concept_tokens[k][c]: token positions of concept c in prompt k (its word, plus its trigger in
    its own prompt). mask_tokens[k]: the tokens that build pass k's mask (none for the base).
    """

    prompts: list[str]
    concept_tokens: list[list[list[int]]]

    @property
    def mask_tokens(self) -> list[list[int]]:
        return [[]] + [self.concept_tokens[k][k - 1] for k in range(1, len(self.prompts))]


def remove_words(prompt: str, words: list[str]) -> str:
    """The prompt without any whole-word occurrence of `words`, each taking one adjacent space with it."""
    spans = sorted({span for word in words for span in word_spans(prompt, word)})
    for start, end in reversed(spans):
        if prompt[end : end + 1].isspace():
            end += 1
        elif start > 0 and prompt[start - 1].isspace():
            start -= 1
        prompt = prompt[:start] + prompt[end:]
    return prompt


def insert_before(prompt: str, word: str, insertion: str) -> str:
    """`insertion` and a space before the first whole-word occurrence of `word` (which must occur)."""
    start = word_spans(prompt, word)[0][0]
    return f"{prompt[:start]}{insertion} {prompt[start:]}"


def infer_concept(prompt: str, trigger: str | None) -> str | None:
    """The word right after the trigger in the prompt ("a sks cat" -> "cat"), if there is one."""
    if not trigger or not word_spans(prompt, trigger):
        return None
    end = word_spans(prompt, trigger)[0][1]
    match = re.match(r"\s+(\w[\w-]*)", prompt[end:])
    return match.group(1) if match else None


def derive_prompts(prompt: str, concepts: list[Concept]) -> list[str]:
    """[base prompt, one prompt per concept]; a concept's own `prompt` overrides the derived one."""
    triggers = [c.trigger for c in concepts if c.trigger]
    base = remove_words(prompt, triggers)
    derived = []
    for concept in concepts:
        if concept.prompt is not None:
            derived.append(concept.prompt)
        elif concept.trigger and word_spans(prompt, concept.trigger):
            derived.append(remove_words(prompt, [t for t in triggers if t.lower() != concept.trigger.lower()]))
        elif concept.trigger:
            derived.append(insert_before(_require_concept(base, concept), concept.word, concept.trigger))
        else:
            derived.append(base)
    return [base, *derived]


def concept_prompts(tokenizer, prompt: str, concepts: list[Concept]) -> ConceptPrompts:
    """Prompts and concept token positions, or a typed error naming the LoRA, the word and the prompt."""
    words = [c.word.lower() for c in concepts]
    for index, concept in enumerate(concepts):
        if words.index(concept.word.lower()) != index:
            raise ConceptError(
                f"LoRAs '{concepts[words.index(concept.word.lower())].name}' and '{concept.name}' share the concept "
                f"word '{concept.word}'; their attention maps cannot be told apart. Give each a distinct concept "
                "word with LoraSpec(concept=...) and use both words in the prompt"
            )
    prompts = derive_prompts(prompt, concepts)
    tokens = []
    for k, text in enumerate(prompts):
        per_concept = []
        for c, concept in enumerate(concepts):
            positions = token_positions(tokenizer, text, concept.word)
            if k == c + 1 and concept.trigger:
                positions = sorted(set(positions) | set(token_positions(tokenizer, text, concept.trigger)))
            if not positions:
                where = "base prompt" if k == 0 else f"prompt of LoRA '{concepts[k - 1].name}'"
                raise ConceptNotInPromptError(
                    f"the concept word '{concept.word}' of LoRA '{concept.name}' is not among the first "
                    f"{tokenizer.model_max_length} tokens of the {where} '{text}'; add it or shorten the prompt"
                )
            per_concept.append(positions)
        tokens.append(per_concept)
    return ConceptPrompts(prompts, tokens)


def _require_concept(prompt: str, concept: Concept) -> str:
    if not word_spans(prompt, concept.word):
        raise ConceptNotInPromptError(
            f"LoRA '{concept.name}' has the concept word '{concept.word}', which the prompt '{prompt}' does not "
            f"contain; write it in the prompt (e.g. 'a {concept.word}') or pass LoraSpec(concept=...)"
        )
    return prompt
