"""Prompt formats per task kind, in the manner of MoCo (model_collaboration/data/eval.py).

Every format returns one user chat message: the question, then an instruction that tells the model
how to mark its answer, so the metric's extraction (metrics.py) has something to find:
  - multiple choice: the question, lettered options "A) ...", "pick the letter";
  - exact match / F1: the input, then "wrap the final answer as \\boxed{...}" (MoCo's wording);
  - code: the problem, then "one ```python block with the whole solution".
Synthetic tasks send the bare question as the user message (see synthetic.py): their tiny models
are trained on exactly that chat format, so distillation rows and inference prompts agree.
"""
from __future__ import annotations

from moco_ray.records import ChatMessage
from moco_ray.tasks.base import Example

MC_INSTRUCTION = ("Please select the correct answer by choosing the letter corresponding to your "
                  "choice. End your response with \"The answer is X\", where X is that letter.")
BOXED_INSTRUCTION = "Please provide the final, direct answer wrapped exactly as \\boxed{ANSWER}."
CODE_INSTRUCTION = ("Write the complete solution (with any imports it needs) as Python code in a "
                    "single ```python code block.")


def user(content: str) -> list[ChatMessage]:
    return [{"role": "user", "content": content}]


def mc_question(example: Example) -> str:
    """The question with its lettered options, without the answer instruction."""
    assert example.choices, f"multiple-choice example {example.id!r} has no choices"
    options = "\n".join(f"{letter}) {text}" for letter, text in example.choices.items())
    return f"{example.question.rstrip()}\n{options}"


def format_multiple_choice(example: Example) -> list[ChatMessage]:
    return user(f"{mc_question(example)}\n{MC_INSTRUCTION}")


def format_boxed(example: Example) -> list[ChatMessage]:
    """Exact-match and F1 tasks (gsm8k, math, bbh, popqa)."""
    return user(f"{example.question.rstrip()}\n\n{BOXED_INSTRUCTION}")


def format_code(example: Example) -> list[ChatMessage]:
    return user(f"{example.question.rstrip()}\n\n{CODE_INSTRUCTION}")


def format_raw(example: Example) -> str:
    """The question as raw text, no chat template (base models, JSONL tasks that ask for it)."""
    return example.question


def format_plain_chat(example: Example) -> list[ChatMessage]:
    """Synthetic tasks: the bare question as one user message (no instruction)."""
    return user(example.question)
