"""Prompt encoding: BOS exactly once, whether the prompt is chat, raw text, or a rendered template
plus a continuation (what patch-by-patch methods send)."""
from __future__ import annotations

from transformers import AutoTokenizer

from moco_ray.models import zoo
from moco_ray.models.tokenizer import encode_prompt, render_prompt


def test_bos_appears_once():
    tok = AutoTokenizer.from_pretrained(str(zoo.build("tiny")))
    bos = tok.bos_token_id
    chat = [{"role": "user", "content": "one two"}]
    rendered = render_prompt(tok, chat)
    for prompt in (chat, "one two", rendered, rendered + "three"):
        ids = encode_prompt(tok, prompt)
        assert ids[0] == bos and ids.count(bos) == 1, (prompt, ids[:4])
    assert encode_prompt(tok, rendered) == encode_prompt(tok, chat)
