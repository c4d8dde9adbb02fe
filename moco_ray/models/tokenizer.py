"""Prompts to token ids, the same way for every engine and every trainer-side scorer."""
from __future__ import annotations

from moco_ray.records import Prompt


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """Raw text unchanged; chat messages through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} dicts; "
                         f"got {prompt!r:.200}")
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {tokenizer.name_or_path!r} has no chat template; "
                         "send raw text prompts to this model")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt. Raw text gets the tokenizer's special tokens (e.g. BOS) unless it
    already starts with BOS (a rendered template plus a continuation, as patch-by-patch methods
    send); a rendered chat template already contains them, so it is encoded without."""
    text = render_prompt(tokenizer, prompt)
    bos = tokenizer.bos_token
    special = isinstance(prompt, str) and not (bos and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=special).input_ids
    if not ids:
        raise ValueError("prompt is empty after tokenization; send at least one token")
    return ids


def encode_continuation(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"continuation {text!r} has no tokens; score non-empty strings")
    return ids


def eos_token_ids(tokenizer, model_dir: str) -> set[int]:
    """Tokenizer EOS plus generation_config EOS ids (vLLM stops on both too)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
        return ids
    extra = gen.eos_token_id
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return ids


def cut_at_stop(text: str, stops: list[str]) -> str | None:
    """Text before the earliest stop string, or None when no stop string occurs."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else None
