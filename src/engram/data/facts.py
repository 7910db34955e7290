"""Synthetic facts for knowledge-injection experiments: made-up people, each with a code word, written in a few
training phrasings and one held-out paraphrase (never trained on) whose completion is the code.

A fact reads "The code of Velo Marandi is harbour." The names are built from syllables, so no base model knows them;
the codes are real words the caller supplies (e.g. frequent words of the base's own training text), so the base knows
how to write them but not whose they are. Everything is a pure function of ``(n, words, seed)``.

The paraphrases differ in what stands right before the answer: ``{name} is`` (as in the first training phrasing),
``code is`` and ``has is``; a memory keyed on the last few tokens sees the name only in the first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ANSWER_SLOT = "{answer}"
TRAIN_TEMPLATES = ("The code of {name} is {answer}.", "{name} has the code {answer}.")
PARAPHRASE_TEMPLATES = ("The code for {name} is {answer}.", "{name}'s code is {answer}.",
                        "The code that {name} has is {answer}.")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")


@dataclass(frozen=True)
class Fact:
    """One fact: ``name``'s code is ``answer``; ``paraphrase`` indexes :data:`PARAPHRASE_TEMPLATES` (held out)."""

    name: str
    answer: str
    paraphrase: int

    def training_texts(self) -> list[str]:
        """The fact in every :data:`TRAIN_TEMPLATES` phrasing (what an injection trains on)."""
        return [template.format(name=self.name, answer=self.answer) for template in TRAIN_TEMPLATES]

    def paraphrase_text(self) -> str:
        """The held-out phrasing, whole."""
        return PARAPHRASE_TEMPLATES[self.paraphrase].format(name=self.name, answer=self.answer)

    def trained_prompt(self) -> str:
        """The first training phrasing up to the answer (no trailing space): ``"The code of X is"``."""
        return prompt_of(TRAIN_TEMPLATES[0], self.name)

    def paraphrase_prompt(self) -> str:
        """The held-out phrasing up to the answer (no trailing space)."""
        return prompt_of(PARAPHRASE_TEMPLATES[self.paraphrase], self.name)

    @property
    def completion(self) -> str:
        """What must follow either prompt: a space and the answer."""
        return " " + self.answer


def prompt_of(template: str, name: str) -> str:
    """``template`` filled with ``name`` and cut before the answer's space."""
    head = template.split(ANSWER_SLOT)[0]
    if not head.endswith(" "):
        raise ValueError(f"template {template!r} must put a space before {ANSWER_SLOT}")
    return head[:-1].format(name=name)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def make_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct made-up full names ("Velo Marandi": two or three syllables each part), a function of ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"names-{seed}")
    names: dict[str, None] = {}
    while len(names) < n:
        first, last = _word(rng, rng.choice((2, 3))), _word(rng, rng.choice((2, 3)))
        names.setdefault(f"{first.capitalize()} {last.capitalize()}")
    return list(names)


def make_facts(n: int, words: list[str], seed: int = 0) -> list[Fact]:
    """``n`` facts with distinct names; each answer drawn uniformly from ``words``; the paraphrases cycle through
    :data:`PARAPHRASE_TEMPLATES` (balanced: ``n // 3`` or one more each), in a seeded order.

    Raises:
        ValueError: ``words`` is empty or holds a word with a space or no letters.
    """
    bad = [w for w in words if not w or " " in w or not any(c.isalpha() for c in w)]
    if not words or bad:
        raise ValueError(f"words must be non-empty single words, got {bad[:5] if bad else 'none'}")
    rng = random.Random(f"facts-{seed}")
    paraphrases = [i % len(PARAPHRASE_TEMPLATES) for i in range(n)]
    rng.shuffle(paraphrases)
    return [Fact(name, rng.choice(words), paraphrase)
            for name, paraphrase in zip(make_names(n, seed), paraphrases)]


def training_texts(facts: list[Fact], seed: int = 0) -> list[str]:
    """Every training phrasing of every fact, shuffled by ``seed``: ``len(facts) * len(TRAIN_TEMPLATES)`` texts."""
    texts = [text for fact in facts for text in fact.training_texts()]
    random.Random(f"order-{seed}").shuffle(texts)
    return texts
