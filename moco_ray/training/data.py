"""SFT rows -> token ids, loss labels and teacher distributions; batches for the training loop.

A row is `{"messages": [{"role", "content"}, ...], "teacher_topk"?: [...], "source"?: ...}`.
The conversation is rendered with the model's chat template piece by piece: the text before each
assistant reply is one segment, the reply as the template writes it (content plus the end-of-turn
marker) another. Labels are -100 everywhere except the reply tokens, so the loss falls on what
the assistant says only. `teacher_topk` has one entry per reply token, in order across all
replies: `{token_id: logprob}` (or `[[token_id, logprob], ...]`, which survives Arrow/Parquet),
the teacher's top-k at that position; None or {} skips a token, and it may stop early (e.g. before
the template's end-of-turn marker, which the teacher never generated).
"""
from __future__ import annotations

import math
from typing import Any

import torch

ROLES = ("system", "user", "assistant")
IGNORE = -100


def _bad(index: Any, key: str, msg: str) -> ValueError:
    return ValueError(f"row {index}: key {key!r} {msg}")


def check_row(row: Any, index: Any) -> list[dict[str, str]]:
    """The row's messages after type checks; ValueError naming the row and the key otherwise."""
    if not isinstance(row, dict):  # a ValueError like every other row problem
        raise ValueError(f"row {index}: expected a dict with key 'messages', "  # noqa: TRY004
                         f"got {type(row).__name__}")
    if "messages" not in row:
        raise _bad(index, "messages", "is missing; fix: add a list of "
                   "{'role': 'user'|'assistant'|'system', 'content': str} dicts")
    msgs = row["messages"]
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise _bad(index, "messages", f"must be a non-empty list, got {type(msgs).__name__}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(index, f"messages[{j}]", f"must be a dict, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise _bad(index, f"messages[{j}].role", f"is {m.get('role')!r}; use one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise _bad(index, f"messages[{j}].content",
                       f"must be a string, got {type(m.get('content')).__name__}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise _bad(index, "messages", "has no assistant turn, so there is nothing to train on; "
                   "fix: add the answer as {'role': 'assistant', 'content': ...}")
    src = row.get("source")
    if src is not None and not (isinstance(src, str) or (
            isinstance(src, (list, tuple)) and all(isinstance(s, str) for s in src))):
        raise _bad(index, "source", f"must be a string or a list of strings, got {src!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _render(tokenizer, msgs: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def segments(tokenizer, msgs: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_reply) pieces that concatenate to the
    full rendering. Needs a template that renders a conversation's prefixes as text prefixes."""
    full = _render(tokenizer, msgs, False)
    out, done = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], True)
        upto = _render(tokenizer, msgs[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} does not render conversation "
                "prefixes as prefixes of the whole, so reply tokens cannot be located; use a "
                "template without history-dependent rewriting")
        out += [(full[done:len(before)], False), (full[len(before):len(upto)], True)]
        done = len(upto)
    out.append((full[done:], False))
    return [(text, reply) for text, reply in out if text]


def _topk_entry(entry: Any, index: Any, j: int, vocab: int) -> tuple[list[int], list[float]]:
    key = f"teacher_topk[{j}]"
    if entry is None:
        return [], []
    if isinstance(entry, dict):
        # Arrow turns dicts with differing keys into structs with nulls: drop those.
        pairs = [(k, v) for k, v in entry.items() if v is not None]
    elif isinstance(entry, (list, tuple)):
        pairs = entry
    else:
        raise _bad(index, key, f"must be a dict {{token_id: logprob}} or a list of "
                   f"[token_id, logprob] pairs, got {type(entry).__name__}")
    ids, lps = [], []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _bad(index, key, f"has {pair!r}; each item must be a (token_id, logprob) pair")
        tid, lp = pair
        try:
            tid_f, lp = float(tid), float(lp)
        except (TypeError, ValueError):
            raise _bad(index, key, f"has ({tid!r}, {lp!r}); token ids and logprobs must be "
                       "numbers") from None
        if tid_f != int(tid_f) or not 0 <= tid_f < vocab:
            raise _bad(index, key, f"has token id {tid!r} outside the student's vocabulary "
                       f"[0, {vocab}); teacher and student must share the tokenizer")
        if math.isnan(lp) or lp > 1e-4:
            raise _bad(index, key, f"has logprob {lp} for token {tid}; logprobs are <= 0")
        if lp != -math.inf:  # zero probability: nothing to match
            ids.append(int(tid_f))
            lps.append(lp)
    return ids, lps


def tokenize_row(row: Any, tokenizer, max_seq_len: int, index: Any) -> dict[str, Any]:
    """One checked row -> {idx, input_ids, labels, kd_pos, kd_len, kd_ids, kd_lp} (flat lists,
    so the row stores in Arrow without nested ragged types). Cut to `max_seq_len` tokens."""
    msgs = check_row(row, index)
    ids: list[int] = []
    labels: list[int] = []
    for text, reply in segments(tokenizer, msgs):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if reply else [IGNORE] * len(piece)
    reply_pos = [t for t, lab in enumerate(labels) if lab != IGNORE]
    kd_pos, kd_len, kd_ids, kd_lp = [], [], [], []
    topk = row.get("teacher_topk")
    if topk is not None:
        if not isinstance(topk, (list, tuple)):
            raise _bad(index, "teacher_topk", "must be a list with one {token_id: logprob} per "
                       f"assistant token, got {type(topk).__name__}")
        if len(topk) > len(reply_pos):
            raise _bad(index, "teacher_topk", f"has {len(topk)} entries but the assistant "
                       f"replies tokenize to {len(reply_pos)} tokens; the teacher must use the "
                       "student's tokenizer and the same reply text")
        vocab = len(tokenizer)
        for j, entry in enumerate(topk):
            tids, lps = _topk_entry(entry, index, j, vocab)
            # Position 0 has no preceding logits; cut positions are gone.
            if tids and 0 < reply_pos[j] < max_seq_len:
                kd_pos.append(reply_pos[j])
                kd_len.append(len(tids))
                kd_ids += tids
                kd_lp += lps
    return {"idx": index if isinstance(index, int) else -1,
            "input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len],
            "kd_pos": kd_pos, "kd_len": kd_len, "kd_ids": kd_ids, "kd_lp": kd_lp}


def tokenize_rows(rows: list[Any], tokenizer, max_seq_len: int) -> list[dict[str, Any]]:
    """Check and tokenize a list of rows (errors name the row's index in the list)."""
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"rows must be a list of dicts or a ray.data.Dataset, "
                        f"got {type(rows).__name__}")
    return [tokenize_row(r, tokenizer, max_seq_len, i) for i, r in enumerate(rows)]


class TokenizeFn:
    """`ds.map(TokenizeFn(...))` for Ray Datasets: rows have no global index there, so errors
    name the row's `id` field when it has one."""

    def __init__(self, tokenizer, max_seq_len: int):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len

    def __call__(self, row: dict) -> dict:
        where = f"(Ray Dataset, id={row.get('id')!r})" if isinstance(row, dict) else "(Ray Dataset)"
        return tokenize_row(row, self.tokenizer, self.max_seq_len, where)


def plain(row: dict) -> dict:
    """A tokenized row read back from Ray Data (numpy arrays) as Python lists."""
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one micro-batch, plus the KD targets flattened over positions:
    kd_row/kd_pos say where (row, token position), kd_ids/kd_lp hold the teacher's top-k padded
    to the widest k with logprob -inf (zero probability after renormalising)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    kd_row, kd_pos, kd_ids, kd_lp = [], [], [], []
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        mask[b, :n] = 1
        start = 0
        for pos, k in zip(r["kd_pos"], r["kd_len"]):
            kd_row.append(b)
            kd_pos.append(pos)
            kd_ids.append(r["kd_ids"][start:start + k])
            kd_lp.append(r["kd_lp"][start:start + k])
            start += k
    k_max = max((len(x) for x in kd_ids), default=1)
    ids_t = torch.zeros((len(kd_ids), k_max), dtype=torch.long)
    lp_t = torch.full((len(kd_ids), k_max), -math.inf)
    for i, (tids, lps) in enumerate(zip(kd_ids, kd_lp)):
        ids_t[i, :len(tids)] = torch.tensor(tids)
        lp_t[i, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "kd_row": torch.tensor(kd_row, dtype=torch.long),
            "kd_pos": torch.tensor(kd_pos, dtype=torch.long), "kd_ids": ids_t, "kd_lp": lp_t}
