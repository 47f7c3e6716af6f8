"""The demo's task: compositional sentiment, generated deterministically, written in GLUE SST-2 format.

Each sentence is made of clauses about a product. A clause's polarity comes from its adjective and is flipped
by a negation ("not", "never", "hardly"); intensifiers ("very", "truly") change nothing. The label:

* one clause: its polarity;
* "A , but B": B decides (A has the opposite polarity, so the first words mislead);
* "although A , B": B decides (A opposite);
* "A and B": both share the label;
* "pros and cons : A ; B ; C": the majority of the three clauses.

A sentence encoder pretrained for similarity (MiniLM) sees the words but not this logic, so the adapter has to
learn it; that makes the task small enough for two CPU cores and hard enough that adapters differ.
"""

from __future__ import annotations

import random
from pathlib import Path

from polar.io import atomic_write_text

POSITIVE = ["good", "great", "excellent", "lovely", "reliable", "pleasant", "superb", "solid", "charming", "sturdy"]
NEGATIVE = ["bad", "awful", "poor", "flimsy", "boring", "dreadful", "clumsy", "noisy", "fragile", "disappointing"]
SUBJECTS = ["the phone", "this laptop", "the camera", "our new kettle", "the headset", "that chair", "the bike",
            "this lamp", "the keyboard", "the tent", "my watch", "the stroller"]
ASPECTS = ["battery", "screen", "handle", "design", "price", "sound", "finish", "manual", "strap", "motor"]
NEGATIONS = ["not", "never", "hardly"]
INTENSIFIERS = ["very", "truly", "really", "quite", ""]


def _clause(rng: random.Random, polarity: int) -> str:
    """A clause whose meaning has the given polarity (1 positive, 0 negative)."""
    negated = rng.random() < 0.4
    word_polarity = 1 - polarity if negated else polarity
    adjective = rng.choice(POSITIVE if word_polarity else NEGATIVE)
    intensifier = rng.choice(INTENSIFIERS)
    subject = rng.choice(SUBJECTS) if rng.random() < 0.5 else f"the {rng.choice(ASPECTS)}"
    verb = "is " + rng.choice(NEGATIONS) if negated else "is"
    return " ".join(word for word in (subject, verb, intensifier, adjective) if word)


def make_sentence(rng: random.Random) -> tuple[str, int]:
    """One example: (sentence, label)."""
    label = rng.randrange(2)
    shape = rng.random()
    if shape < 0.15:
        return _clause(rng, label) + " .", label
    if shape < 0.4:
        return f"{_clause(rng, 1 - label)} , but {_clause(rng, label)} .", label
    if shape < 0.55:
        return f"although {_clause(rng, 1 - label)} , {_clause(rng, label)} .", label
    if shape < 0.7:
        return f"{_clause(rng, label)} and {_clause(rng, label)} .", label
    # Majority of three: two clauses carry the label, one the opposite, in a random order.
    polarities = [label, label, 1 - label]
    rng.shuffle(polarities)
    return "pros and cons : " + " ; ".join(_clause(rng, p) for p in polarities) + " .", label


def write_demo_task(out_dir: str | Path, n_train: int = 2000, n_dev: int = 500, seed: int = 0) -> Path:
    """Write ``train.tsv`` and ``dev.tsv`` (GLUE SST-2 columns ``sentence``, ``label``) into ``out_dir``.

    The same ``seed`` gives the same files byte for byte. Dev sentences never occur in train.
    """
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "dev": []}
    for split, size in (("train", n_train), ("dev", n_dev)):
        while len(splits[split]) < size:
            sentence, label = make_sentence(rng)
            if sentence in seen:
                continue
            seen.add(sentence)
            splits[split].append((sentence, label))
    for split, rows in splits.items():
        text = "sentence\tlabel\n" + "".join(f"{sentence}\t{label}\n" for sentence, label in rows)
        atomic_write_text(out_dir / f"{split}.tsv", text)
    return out_dir
