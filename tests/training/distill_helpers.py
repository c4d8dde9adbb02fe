"""Helpers for the distillation tests (rows, teacher top-k, scoring saved models)."""
from __future__ import annotations

import torch

FACTS = [("What is the capital of Spain?", "Madrid"),
         ("What color is the sky?", "blue"),
         ("Name a big cat.", "tiger"),
         ("What is 7 plus 5?", "12")]


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def teacher_topk(model_dir: str, rows: list[dict], k: int = 5) -> list[dict]:
    """Rows plus the real top-k of `model_dir` at every reply token (what a strategy would
    collect from the pool)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moco_ray.training.data import tokenize_row

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for i, row in enumerate(rows):
        t = tokenize_row(row, tok, 10_000, i)
        with torch.no_grad():
            logp = model(torch.tensor([t["input_ids"]])).logits[0].log_softmax(-1)
        reply = [p for p, lab in enumerate(t["labels"]) if lab != -100]
        topk = []
        for p in reply:
            vals, ids = logp[p - 1].topk(k)
            topk.append({int(i): float(v) for i, v in zip(ids, vals)})
        out.append({**row, "teacher_topk": topk})
    return out


def answer_nll(model_dir: str, rows: list[dict]) -> float:
    """Mean NLL of the reply tokens under a saved model (lower = better memorised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moco_ray.training.data import collate, tokenize_rows
    from moco_ray.training.loss import sft_sum

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = collate(tokenize_rows(rows, tok, 256), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = sft_sum(logits, batch["labels"])
    return float(total) / n


def greedy_answers(model_dir: str, rows: list[dict], max_new_tokens: int = 6) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for row in rows:
        ids = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs
