"""Zoo recipes for tiny models trained here on synthetic tasks: pools with different strengths.

`zoo:spec-<task>` is a tiny Llama trained mostly on one synthetic task of `SPECIALIST_TASKS` and a
little on the others, so a pool of `spec-reverse`, `spec-max`, `spec-sort` holds three models that
are each strong at one task and weak at the rest: a pool where collaboration has something to add
and distillation something to teach. Training is plain torch in this process (seconds on a CPU);
the prompts are the synthetic tasks' own chat format, so the models answer exactly what the tasks
ask.
"""
from __future__ import annotations

import random
from pathlib import Path

from moco_ray.models.zoo.registry import register
from moco_ray.models.zoo.tiny import make_tiny_llama, tiny_tokenizer_dir
from moco_ray.tasks.synthetic import synthetic_pairs

SPECIALIST_TASKS = ("reverse", "max", "sort")
# Share of the main task in each training batch; the rest is split over the other tasks. Small
# enough a share that the other tasks stay weak, large enough that the model knows their format.
MAIN_SHARE = 0.8
STEPS = 400
BATCH = 32
LR = 3e-3


def _encode(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the templated (question, answer) chat and where the answer starts."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    ids_p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return ids, len(ids_p)


def train_specialist(out_dir: Path, main: str, seed: int, tasks=SPECIALIST_TASKS,
                     steps: int = STEPS) -> Path:
    """A tiny Llama trained with `MAIN_SHARE` of its batches on `main`, the rest on `tasks`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if main not in tasks:
        raise ValueError(f"main task {main!r} is not one of {tasks}")
    make_tiny_llama(out_dir, tiny_tokenizer_dir(), seed=seed, initializer_range=0.02)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    model = LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    others = [t for t in tasks if t != main]
    weights = [MAIN_SHARE] + [(1 - MAIN_SHARE) / len(others)] * len(others)
    names = [main, *others]
    pairs = {t: synthetic_pairs(t, 4000, seed) for t in names}  # training buckets only
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            batch = [_encode(tok, *rng.choice(pairs[rng.choices(names, weights)[0]]))
                     for _ in range(BATCH)]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((BATCH, width), tok.pad_token_id)
            mask = torch.zeros((BATCH, width), dtype=torch.long)
            labels = torch.full((BATCH, width), -100)
            for i, (x, start) in enumerate(batch):
                ids[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
                labels[i, start:len(x)] = torch.tensor(x[start:])  # loss on the answer only
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(str(out_dir))
    return out_dir


for _i, _task in enumerate(SPECIALIST_TASKS):
    register(f"spec-{_task}",
                 lambda out, t=_task, s=_i: train_specialist(out, t, seed=100 + s))
