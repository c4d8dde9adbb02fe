"""Helpers shared by the API-level methods that learn (trained router, Co-LLM, Switch
Generation): patch decoding over the pool, adapter training settings, label scoring.

Patch decoding continues an answer across models as raw text: the model's rendered prompt (chat
template applied) plus the answer so far, so every model picks up exactly where the last one
stopped, whatever its tokenizer. The first patch of an answer goes out as the chat prompt itself.
No stop strings are used, so a 'stop' finish always means the model ended its answer (EOS).
"""
from __future__ import annotations

from pydantic import Field

from moco_ray.records import Generation, Prompt, SamplingParams
from moco_ray.strategies import training
from moco_ray.strategies.base import ExampleContext, Strategy, StrategyContext
from moco_ray.tasks.base import Example


class AdapterFields(Strategy.Params):
    """LoRA settings of the adapter a method trains on dev (`training.train_adapters`). The
    defaults suit tiny models on a CPU; the papers' own settings (7B models, GPUs) are in each
    method's docstring."""

    max_steps: int = Field(60, ge=1, description="optimizer steps of adapter training")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate of the adapter")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0.0, description="LoRA alpha (scale alpha / r)")
    train_batch_size: int = Field(4, ge=1, description="rows per optimizer step")

    def adapter_cfg(self, seed: int):
        return training.adapter_config(max_steps=self.max_steps, lr=self.lr, lora_r=self.lora_r,
                                       lora_alpha=self.lora_alpha,
                                       batch_size=self.train_batch_size, seed=seed)


async def train_one(ctx: StrategyContext, name: str, model: str, rows: list[dict],
                    p: AdapterFields) -> str:
    """Train one adapter over `model` on `rows` (repeated to fill one batch) and return its
    dir. Looked up on the `training` module at call time, so unit tests can stand in for it."""
    rows = fill_rows(rows, p.train_batch_size)
    paths = await training.train_adapters(ctx, {name: (model, rows)}, p.adapter_cfg(ctx.seed))
    return paths[name]


def fill_rows(rows: list[dict], n: int) -> list[dict]:
    """`rows` repeated in order until there are at least `n` (the trainer needs one batch)."""
    if not rows:
        raise ValueError("no training rows")
    out = list(rows)
    while len(out) < n:
        out.append(rows[len(out) % len(rows)])
    return out


def label_prompt(text: str) -> Prompt:
    """What a trained selector (trained router, Switch Generation's selector) is shown: `text`
    as one user turn. Used at training time (its SFT row is this plus the label as the reply,
    `chat_row`) and at test time (the labels are scored after it), so the trainer and the engine
    render the same chat template around the same text."""
    return [{"role": "user", "content": text}]


def chat_row(prompt: Prompt, assistant: str) -> dict:
    """An SFT row answering the task prompt itself (chat messages or raw text)."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return {"messages": [*msgs, {"role": "assistant", "content": assistant}]}


def labels(n: int, fmt: str = "{}", start: int = 0) -> list[str]:
    """One label per model: `fmt` around its number, zero-padded to one width, so no label is
    a prefix of another (with 10+ models "1" would be a prefix of "10")."""
    width = len(str(start + n - 1))
    return [fmt.format(f"{i + start:0{width}d}") for i in range(n)]


async def pick_label(ctx: ExampleContext, model: str, prompt: Prompt, options: list[str],
                     lora: str | None, step: str) -> tuple[int, list[float]]:
    """Index of the option `model` (with the adapter) finds most likely after `prompt`; ties go
    to the earlier option. Also returns every option's summed logprob."""
    scores = await ctx.score(model, prompt, options, step=step, lora=lora)
    sums = [s.sum_logprob for s in scores]
    return max(range(len(sums)), key=lambda i: (sums[i], -i)), sums


def continuation(ctx: ExampleContext, model: str, prompt: Prompt, text: str) -> Prompt:
    """What `model` is sent to continue the answer `text`: the chat prompt when nothing is
    written yet, else its rendered prompt plus the text (raw-text continuation)."""
    if not text:
        return prompt
    return ctx.job.pool.render(model, prompt) + text


def ended(g: Generation) -> bool:
    """The model ended its answer: EOS ('stop' without stop strings) or nothing generated."""
    return g.finish_reason == "stop" or not g.token_ids


async def write_patch(ctx: ExampleContext, model: str, prompt: Prompt, text: str,
                      params: SamplingParams, max_tokens: int, step: str,
                      lora: str | None = None) -> Generation:
    """One patch of at most `max_tokens` tokens by `model`, continuing `text`."""
    sp = params.model_copy(update={"max_tokens": max_tokens, "stop": []})
    cont = continuation(ctx, model, prompt, text)
    if lora is None:
        [g] = await ctx.generate(model, cont, sp, step=step)
    else:
        [g] = await ctx.generate_lora(model, lora, cont, sp, step=step)
    return g


def question_of(prompt: Prompt) -> str:
    """The prompt as one text (all messages' contents), for routing and selector prompts."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


def check_model(name: str | None, field: str, models: list[str], default: str) -> str:
    if name is None:
        return default
    if name not in models:
        raise ValueError(f"params.{field}={name!r} is not among this job's models {models}; "
                         "use one of them or leave it unset")
    return name


def dev_examples(dev, limit: int | None) -> list[Example]:
    return list(dev.examples[:limit] if limit else dev.examples)
