"""Row checks, chat-template tokenization and the loss mask (exact), teacher top-k alignment."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from moco_ray.training.data import IGNORE, collate, tokenize_row, tokenize_rows


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["student"])


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_labels_cover_exactly_the_assistant_replies(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4+4?"},
            {"role": "assistant", "content": "The answer is 8"}]
    row = tokenize_row({"messages": msgs}, tok, 512, 0)
    # The whole conversation is the template's rendering, nothing added or lost.
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    # Expected mask built by hand from the tiny template: "<|role|>\n{content}</s>\n" per turn,
    # the reply being "{content}</s>\n" after "<|assistant|>\n".
    expected, labels = [], []
    for text, reply in [(("<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is 2+3?</s>\n"
                          "<|assistant|>\n"), False), ("5</s>\n", True),
                        ("<|user|>\nAnd 4+4?</s>\n<|assistant|>\n", False),
                        ("The answer is 8</s>\n", True)]:
        piece = _ids(tok, text)
        expected += piece
        labels += piece if reply else [IGNORE] * len(piece)
    assert row["input_ids"] == expected
    assert row["labels"] == labels
    kept = [t for t in row["labels"] if t != IGNORE]
    assert tok.decode(kept) == "5</s>\nThe answer is 8</s>\n"


def test_truncation_cuts_ids_and_labels_together(tok):
    row = tokenize_row({"messages": [{"role": "user", "content": "hello there " * 20},
                                     {"role": "assistant", "content": "yes"}]}, tok, 16, 0)
    assert len(row["input_ids"]) == len(row["labels"]) == 16
    assert all(t == IGNORE for t in row["labels"])  # the reply was cut off


@pytest.mark.parametrize("row, key", [
    ({"msgs": []}, "'messages'"),
    ({"messages": "hi"}, "'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "'messages[0].role'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "'messages[0].content'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "teacher_topk": "nope"}, "'teacher_topk'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "teacher_topk": [{10_000: -0.1}]}, "'teacher_topk[0]'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "teacher_topk": [{}] * 50}, "has 50 entries"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "source": 7}, "'source'"),
    ("just text", "expected a dict"),
])
def test_bad_row_names_the_row_and_key(tok, row, key):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError) as err:
        tokenize_rows([good, good, row], tok, 64)
    assert "row 2" in str(err.value) and key in str(err.value)


def test_teacher_topk_lands_on_reply_positions(tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}]
    base = tokenize_row({"messages": msgs}, tok, 64, 0)
    reply = [p for p, lab in enumerate(base["labels"]) if lab != IGNORE]
    # dict form, str keys (JSON), a skipped token (None), and [id, logprob] pairs (Arrow form)
    topk = [{"5": -0.5, "6": -1.0}, None, [[7, -0.1], [8.0, -3.0], [9, -math.inf]]]
    row = tokenize_row({"messages": msgs, "teacher_topk": topk}, tok, 64, 0)
    assert row["kd_pos"] == [reply[0], reply[2]]
    assert row["kd_len"] == [2, 2]  # the -inf entry carries no mass and is dropped
    assert row["kd_ids"] == [5, 6, 7, 8]
    assert row["kd_lp"] == [-0.5, -1.0, -0.1, -3.0]


def test_collate_pads_right_and_flattens_kd(tok):
    rows = [tokenize_row({"messages": [{"role": "user", "content": "a" * n},
                                       {"role": "assistant", "content": "b"}],
                          "teacher_topk": [{3: -0.2}] * (n % 2)}, tok, 64, n) for n in (1, 6)]
    b = collate(rows, tok.pad_token_id)
    width = max(len(r["input_ids"]) for r in rows)
    assert b["input_ids"].shape == (2, width)
    short = len(rows[0]["input_ids"])
    assert b["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert (b["labels"][0, short:] == IGNORE).all()
    assert b["kd_row"].tolist() == [0] and b["kd_pos"].tolist() == rows[0]["kd_pos"]
    assert torch.equal(b["kd_ids"], torch.tensor([[3]]))
