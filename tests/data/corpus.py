"""A small synthetic corpus with structure a tiny model can learn in a few dozen steps."""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the king", "a fool", "the queen", "my lord", "the knight", "a ghost", "the nurse", "our friend"]
VERBS = ["speaks to", "laughs at", "follows", "betrays", "loves", "fears", "greets", "forgives"]
OBJECTS = ["the crown", "his brother", "the storm", "her father", "the sword", "a letter", "the moon", "the sea"]
ENDINGS = [".", "!", "?", ", and all is well.", ", alas."]


def document(rng: random.Random, sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        lines.append(s[0].upper() + s[1:])
    return "\n".join(lines) + "\n"


def documents(n: int, seed: int = 0, sentences: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [document(rng, sentences + rng.randrange(sentences)) for _ in range(n)]


def write_txt_corpus(folder: Path, n: int, seed: int = 0, sentences: int = 40) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(n, seed, sentences)
    for i, text in enumerate(docs):
        (folder / f"doc_{i:04d}.txt").write_text(text, encoding="utf-8")
    return docs
