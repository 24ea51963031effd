#!/usr/bin/env python3
"""Generates qadapt's embedded default data: a pretraining corpus and a fine-tuning task.

Standard library only; deterministic (Python's Mersenne Twister with fixed seeds). Run from the
repository root:

    python3 crates/qadapt-cli/assets/make_task.py

and then `just make-default-model` pretrains the embedded model on the corpus it writes.

The world: short restaurant reviews built from nouns and adjectives whose sentiment is fixed.

  corpus.txt     pretraining text (one review per line, no labels). Reviews end with a verdict
                 sentence ("we loved it." / "we will not come back.") that agrees with the
                 review's overall sentiment, so a language model trained on it learns which
                 adjectives are good and which are bad, the way real pretraining picks up
                 sentiment without ever seeing a label.
  task/train.jsonl, task/heldout.jsonl
                 the fine-tuning task, aspect-based sentiment: {"prompt": "review: <review>\n
                 aspect: <noun>\nsentiment:", "completion": " positive" | " negative"}. A review
                 has 1 to 3 clauses about different nouns; the label is the sentiment of the clause
                 about the asked noun ("not" flips an adjective). The base model has never seen
                 "aspect:" or "sentiment:" and does badly; a fine-tuned one must find the clause
                 and read it. Held-out reviews use only noun/adjective pairs that never occur in
                 the training split, so memorizing pairs does not help.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

NOUNS = [
    "soup", "pasta", "service", "waiter", "dessert", "coffee", "bread", "music", "room", "view",
    "wine", "salad", "pizza", "fish", "steak", "tea", "cake", "table", "curry", "chef",
    "menu", "burger", "rice", "beer", "terrace",
]
GOOD = [
    "delicious", "wonderful", "great", "friendly", "excellent", "lovely", "superb", "fresh",
    "perfect", "charming", "amazing", "pleasant", "tasty", "cozy", "generous",
]
BAD = [
    "awful", "terrible", "cold", "rude", "bland", "stale", "horrible", "dirty", "slow",
    "disappointing", "greasy", "noisy", "overpriced", "soggy", "bitter",
]
POS_VERDICT = [
    "we loved it.", "we will come back.", "highly recommended.", "a great evening.",
    "overall a positive visit.",
]
NEG_VERDICT = [
    "we hated it.", "we will not come back.", "avoid this place.", "a wasted evening.",
    "overall a negative visit.",
]


def clause(rng, polarity, allow_not=True):
    """A clause `the N was [not] A` whose sentiment is `polarity` (+1 / -1)."""
    noun = rng.choice(NOUNS)
    negate = allow_not and rng.random() < 0.25
    want_good = (polarity > 0) != negate
    adj = rng.choice(GOOD if want_good else BAD)
    verb = rng.choice(["was", "was", "is", "seemed"])
    neg = " not" if negate else ""
    return f"the {noun} {verb}{neg} {adj}", (noun, adj)


def review(rng):
    """A review, its label (+1 / -1) and its noun/adjective pairs."""
    kind = rng.random()
    if kind < 0.35:
        label = rng.choice([1, -1])
        c, p = clause(rng, label)
        return c + ".", label, [p]
    if kind < 0.6:
        label = rng.choice([1, -1])
        c1, p1 = clause(rng, label)
        c2, p2 = clause(rng, label)
        return f"{c1} and {c2}.", label, [p1, p2]
    # "A but B": opposite sentiments, the last clause decides.
    label = rng.choice([1, -1])
    c1, p1 = clause(rng, -label)
    c2, p2 = clause(rng, label)
    return f"{c1} but {c2}.", label, [p1, p2]


def aspect_review(rng):
    """A review of 1 to 3 clauses about distinct nouns, one of them the asked aspect; the label
    is that clause's sentiment ("not" flips its adjective)."""
    k = rng.choice([1, 2, 2, 3])
    nouns = rng.sample(NOUNS, k)
    clauses, labels, used = [], [], []
    for noun in nouns:
        polarity = rng.choice([1, -1])
        negate = rng.random() < 0.25
        adj = rng.choice(GOOD if (polarity > 0) != negate else BAD)
        verb = rng.choice(["was", "was", "is", "seemed"])
        clauses.append(f"the {noun} {verb}{' not' if negate else ''} {adj}")
        labels.append(polarity)
        used.append((noun, adj))
    text = clauses[0]
    for i in range(1, k):
        text += (" and " if labels[i] == labels[i - 1] else " but ") + clauses[i]
    j = rng.randrange(k)
    return text + ".", nouns[j], labels[j], used


def main():
    # The held-out world: a fixed set of noun/adjective pairs reserved for held-out reviews.
    rng = random.Random(1234)
    pairs = [(n, a) for n in NOUNS for a in GOOD + BAD]
    rng.shuffle(pairs)
    reserved = set(pairs[: len(pairs) // 5])

    corpus_rng = random.Random(1)
    lines = []
    while len(lines) < 30000:
        text, label, _ = review(corpus_rng)
        verdict = corpus_rng.choice(POS_VERDICT if label > 0 else NEG_VERDICT)
        lines.append(f"{text} {verdict}")
    with open(os.path.join(HERE, "corpus.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")

    task_rng = random.Random(2)
    train, heldout = [], []
    seen = set()
    while len(train) < 2000 or len(heldout) < 300:
        text, aspect, label, used = aspect_review(task_rng)
        prompt = f"review: {text}\naspect: {aspect}\nsentiment:"
        if prompt in seen:
            continue
        seen.add(prompt)
        ex = {"prompt": prompt, "completion": " positive" if label > 0 else " negative"}
        if all(p in reserved for p in used):
            if len(heldout) < 300:
                heldout.append(ex)
        elif not any(p in reserved for p in used) and len(train) < 2000:
            train.append(ex)
    os.makedirs(os.path.join(HERE, "task"), exist_ok=True)
    for name, rows in [("train", train), ("heldout", heldout)]:
        with open(os.path.join(HERE, "task", f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"corpus.txt: {len(lines)} lines; task: {len(train)} train, {len(heldout)} held out")


if __name__ == "__main__":
    main()
