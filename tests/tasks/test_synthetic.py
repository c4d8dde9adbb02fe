"""Synthetic tasks: deterministic, correct answers, and dev / test / training text never overlap."""
from __future__ import annotations

import pytest

from moco_ray.tasks import SYNTHETIC_TASKS, make_synthetic, synthetic_corpus, synthetic_pairs
from moco_ray.tasks.synthetic import bucket_of


def _solve(q: str) -> str:
    """An independent solver for each task's prompt format."""
    op, *args, eq = q.split()
    assert eq == "="
    if op == "add":
        return str(int(args[0]) + int(args[1]))
    if op == "rev":
        return " ".join(reversed(args))
    if op == "max":
        return str(max(map(int, args)))
    if op == "sort":
        return " ".join(sorted(args))
    assert op == "last"
    return args[-1]


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_deterministic_correct_and_disjoint(name):
    a, b = make_synthetic(name, 50, 60, seed=1), make_synthetic(name, 50, 60, seed=1)
    assert a.dev.examples == b.dev.examples and a.test.examples == b.test.examples
    assert make_synthetic(name, 50, 60, seed=2).test.examples != a.test.examples
    dev, test = {e.question for e in a.dev}, {e.question for e in a.test}
    assert len(dev) == 50 and len(test) == 60  # distinct within a split
    assert not dev & test
    for ex in a.dev.examples + a.test.examples:
        assert ex.reference == _solve(ex.question)
        assert a.score(f" {ex.reference}\nadd 1 2 = 3", ex) == 1.0  # first line only
        assert a.score(" x", ex) == 0.0
        assert len(ex.question) < 40
    # Training text comes from other buckets, whatever the seed: no dev or test question in it.
    corpus = synthetic_corpus(name, 300, seed=7)
    assert corpus == synthetic_corpus(name, 300, seed=7)
    prompts = {t.rsplit("=", 1)[0] + "=" for t in corpus}
    assert not prompts & (dev | test)
    assert all(t.endswith("\n") and _solve(t.rsplit("=", 1)[0] + "=") == t.split("= ")[1][:-1]
               for t in corpus)


def test_splits_do_not_depend_on_seed_or_size():
    for seed in range(3):
        t = make_synthetic("add", 30, 30, seed=seed)
        assert all(bucket_of(e.question) == "dev" for e in t.dev)
        assert all(bucket_of(e.question) == "test" for e in t.test)
    assert all(bucket_of(q) == "train" for q, _ in synthetic_pairs("add", 100))


def test_prompt_is_bare_user_message_and_errors_are_clear():
    t = make_synthetic("max", 2, 2)
    ex = t.test.examples[0]
    assert t.prompt(ex) == [{"role": "user", "content": ex.question}]
    assert ex.question.startswith("max ")
    assert t.kind == "synthetic" and t.max_tokens <= 10
    with pytest.raises(KeyError, match="known: .*'add'"):
        make_synthetic("mul", 1, 1)
    with pytest.raises(ValueError, match="fewer than 5000 distinct dev questions"):
        make_synthetic("add", 5000, 1)
