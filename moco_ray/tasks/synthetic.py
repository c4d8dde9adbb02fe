"""Synthetic tasks made in code, small enough for tiny models (2 layers, 64 dims, ~500-token BPE,
~256-token context) to learn in a few hundred CPU steps.

A row is a short prompt such as "add 12 7 =" and a short answer "19"; symbols are separated by
spaces so that a whitespace-pre-tokenized BPE gives one token per digit or letter. The prompt is the
bare question as one user chat message; models (zoo specialists, distilled students) learn the
answer as the assistant turn, and scoring reads the first line of the output (exact match after
collapsing whitespace). `synthetic_corpus` gives plain "prompt answer" texts for language-model
pretraining.

Splits never overlap, whatever the seeds or sizes: each question's CRC32 puts it in one bucket of
ten — bucket 0 is test, 1 is dev, 2-9 are training text (`synthetic_corpus`). Seeds only choose
which questions of a bucket are drawn.
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from moco_ray.tasks.base import DevSplit, Example, Task, TestSplit
from moco_ray.tasks.metrics import extract_line, string_metric
from moco_ray.tasks.prompts import format_plain_chat

Bucket = Literal["test", "dev", "train"]
_LETTERS = "abcdefgh"


def _spaced(items) -> str:
    return " ".join(str(x) for x in items)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add {a} {b} =", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = [rng.choice(_LETTERS) for _ in range(rng.randint(3, 6))]
    return f"rev {_spaced(s)} =", _spaced(reversed(s))


def _max(rng: random.Random) -> tuple[str, str]:
    d = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
    return f"max {_spaced(d)} =", str(max(d))


def _sort(rng: random.Random) -> tuple[str, str]:
    d = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    return f"sort {_spaced(d)} =", _spaced(sorted(d))


def _copy_last(rng: random.Random) -> tuple[str, str]:
    s = [rng.choice(_LETTERS) for _ in range(rng.randint(3, 6))]
    return f"last {_spaced(s)} =", s[-1]


class SyntheticTask(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    description: str
    sample: Callable[[random.Random], tuple[str, str]]
    max_tokens: int  # answer tokens + the newline, with a little slack


# Ordered from easiest to hardest for a tiny model. Measured with a 2-layer, 64-dim causal
# transformer, one token per symbol, 300 AdamW steps of batch 64 on CPU (dev accuracy): copy_last,
# max, reverse 1.00; sort 0.88; add 0.49 with one token per digit, 0.04 with a token per number,
# so a zoo tokenizer should split digits (tokenizers' Digits(individual_digits=True)).
SYNTHETIC_TASKS: dict[str, SyntheticTask] = {t.name: t for t in (
    SyntheticTask(name="copy_last", description="last letter of 3-6 letters", sample=_copy_last,
                  max_tokens=4),
    SyntheticTask(name="max", description="largest of 3-5 digits", sample=_max, max_tokens=4),
    SyntheticTask(name="reverse", description="reverse 3-6 letters", sample=_reverse,
                  max_tokens=10),
    SyntheticTask(name="sort", description="sort 3-6 digits ascending", sample=_sort,
                  max_tokens=10),
    SyntheticTask(name="add", description="sum of two numbers below 100", sample=_add,
                  max_tokens=6),
)}


def bucket_of(question: str) -> Bucket:
    b = zlib.crc32(question.encode()) % 10  # stable across runs, unlike hash()
    return "test" if b == 0 else "dev" if b == 1 else "train"


def _get(name: str) -> SyntheticTask:
    if name not in SYNTHETIC_TASKS:
        raise KeyError(f"unknown synthetic task {name!r}; known: {sorted(SYNTHETIC_TASKS)}")
    return SYNTHETIC_TASKS[name]


def _draw(name: str, bucket: Bucket, n: int, seed: int, unique: bool) -> list[tuple[str, str]]:
    task = _get(name)
    rng = random.Random(f"{name}/{bucket}/{seed}")  # str seeds are stable across runs
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"synthetic task {name!r} has fewer than {n} distinct {bucket} "
                             f"questions (found {len(out)}); ask for fewer rows")
        q, a = task.sample(rng)
        if bucket_of(q) != bucket or (unique and q in seen):
            continue
        seen.add(q)
        out.append((q, a))
    return out


def _examples(name: str, rows: list[tuple[str, str]], split: str) -> tuple[Example, ...]:
    return tuple(Example(id=f"{name}-{split}-{i}", question=q, reference=a, meta={"task": name})
                 for i, (q, a) in enumerate(rows))


def make_synthetic(name: str, n_dev: int = 200, n_test: int = 200, seed: int = 0,
                   task_name: str | None = None) -> Task:
    """A synthetic task with `n_dev` / `n_test` distinct questions from disjoint buckets."""
    spec = _get(name)
    label = task_name or name
    return Task(name=label, kind="synthetic",
                dev=DevSplit(task=label, examples=_examples(name, _draw(name, "dev", n_dev, seed,
                                                                        True), "dev")),
                test=TestSplit(task=label, examples=_examples(name, _draw(name, "test", n_test,
                                                                          seed, True), "test")),
                format=format_plain_chat, extract=extract_line, metric=string_metric,
                max_tokens=spec.max_tokens)


def synthetic_pairs(name: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, answer) training pairs from the training buckets; never a dev or test question."""
    return _draw(name, "train", n, seed, unique=False)


def synthetic_corpus(name: str, n: int, seed: int = 0) -> list[str]:
    """Training texts "prompt answer\\n" for pretraining tiny models on one task."""
    return [f"{q} {a}\n" for q, a in synthetic_pairs(name, n, seed)]
