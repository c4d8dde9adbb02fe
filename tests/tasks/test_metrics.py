"""Metrics on hand-written model outputs, right and wrong, including awkward extraction cases."""
from __future__ import annotations

import pytest

from moco_ray.config import TaskSpec, default_data_dir
from moco_ray.tasks import Example, build_task, load_task
from moco_ray.tasks.metrics import (
    build_program,
    exact_match,
    extract_choice,
    extract_code,
    extract_exact,
    extract_final_answer,
    f1_over_aliases,
    find_boxed,
    token_f1,
)

MC = Example(id="1", question="Which?", reference="C",
             choices={"A": "a cat", "B": "the dog", "C": "0.8 lb", "D": "8 lb"})


@pytest.mark.parametrize("output,letter", [
    ("C", "C"), ("(c)", "C"), ("**C**", "C"), ("\\boxed{C}", "C"), ("\\boxed{\\text{(C)}}", "C"),
    ("The answer is C.", "C"), ("Answer: (C)", "C"), ("answer is c", "C"),
    ("A is wrong because cats... B) no. So the final answer is C", "C"),
    ("Let's consider option A. Then D. ... The answer is (C).", "C"),
    ("It weighs 0.8 lb, so that one.", "C"),  # option text; "8 lb" is inside "0.8 lb"
    ("I think the dog", "B"), ("the dog", "B"), ("0.8 lb.", "C"),
    ("This is a hard one, etc. I am not sure", ""),  # "a" / "I" / "etc." are not choices
    ("", ""),
])
def test_extract_choice(output, letter):
    assert extract_choice(output, MC) == letter


def test_restated_option_beats_letters_inside_it():
    ex = Example(id="2", question="q", reference="D", choices={
        "A": "only A", "B": "only B", "C": "(A) and (B)", "D": "both A and B."})
    assert extract_choice("Both A and B", ex) == "D"
    assert extract_choice("The answer is (C)", ex) == "C"


def test_choice_metric_via_task():
    task = build_task("mc", "multiple_choice", [], [{"question": "Which?", "choices": MC.choices,
                                                     "answer": "C"}], "inline")
    ex = task.test.examples[0]
    assert task.score("The answer is C", ex) == 1.0
    assert task.score("The answer is D", ex) == 0.0
    assert task.score("no idea", ex) == 0.0


def test_find_boxed_keeps_nested_braces():
    assert find_boxed("x \\boxed{\\frac{1}{2}} and \\box{7}") == ["\\frac{1}{2}", "7"]
    assert find_boxed("\\boxed{unclosed") == []


@pytest.mark.parametrize("output,answer", [
    ("so \\boxed{12} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),   # the last box
    ("The answer is 42.\nThanks", "42"), ("Final Answer: **x+1**", "x+1"),
    ("Answer:\n 7", "7"), ("the answer is 3. Wait, the answer is 5.", "5"),
    ("just text", "just text"), ("So the final answer is -3", "-3"), ("Answer: -4", "-4"),
    ("\\boxed{\\} \\}}", "\\} \\}"),  # escaped braces inside a box (bbh dyck)
])
def test_extract_final_answer(output, answer):
    assert extract_final_answer(output) == answer


def test_numeric_extraction_gsm8k_style():
    ex = Example(id="g", question="q", reference="1000")
    out = "She has 3 boxes, 10 each... total 1,000 pennies"
    assert extract_exact(out, ex, numeric=True) == "1000"
    assert extract_exact("The answer is $18 dollars, not 20.", ex, numeric=True) == "18"
    assert extract_exact("\\boxed{1,000}", ex, numeric=True) == "1,000"
    assert extract_exact("no digits", ex, numeric=True) == "no digits"
    assert extract_exact("total 1,000 pennies", ex) == "total 1,000 pennies"  # not numeric


@pytest.mark.parametrize("pred,ref,score", [
    ("150", "150", 1), ("150.0", "150", 1), ("1,000", "1000", 1), ("$132", "\\$132", 1),
    ("151", "150", 0), ("149.9", "150", 0),                  # integers compare exactly
    ("3.53", "3.54", 1), ("3.0", "3.54", 0),                   # decimals within 1%
    ("\\dfrac14", "\\frac{1}{4}", 1), ("0.25", "\\frac14", 1), ("1/4", "\\frac{1}{4}", 1),
    ("60", "60^\\circ", 1), ("50", "50\\%", 1), ("18x^3 + 8x^2", "18x^3+8x^2", 1),
    ("4\\sqrt5", "4\\sqrt{5}", 1), ("\\left( 1, 2 \\right)", "(1,2)", 1), ("x-1", "x+1", 0),
    ("yes", "Yes", 1), ("No.", "no", 1), ("True", "False", 0),
    ("[1, 2]", "[1,2]", 1), ("[1, 3]", "[1,2]", 0), ("(A)", "A", 1), ("B", "A", 0),
    ("Valid", "valid", 1), (") ] }", ") ] }", 1), ("\\} \\}", "} }", 1), ("] )", ") ] }", 0),
    ("", ") }", 0),
    ("the Beth Kenya", "beth kenya", 1),
])
def test_exact_match(pred, ref, score):
    assert exact_match(pred, ref) == score


def test_token_f1_and_aliases():
    assert token_f1("The Association football!", "association football") == 1.0
    assert token_f1("football club", "association football") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0 and token_f1("the", "a") == 1.0  # both empty after normalizing
    aliases = ["association football", "football", "soccer"]
    assert f1_over_aliases("Soccer.", aliases) == 1.0
    assert f1_over_aliases("American football", aliases) == pytest.approx(2 / 3)
    assert f1_over_aliases("tennis", aliases) == 0.0
    task = build_task("p", "f1", [], [{"input": "What sport?", "output": '["soccer", "football"]'}],
                      "inline")
    ex = task.test.examples[0]
    assert task.score("He plays \\boxed{Soccer}.", ex) == 1.0
    assert task.score("\\boxed{ice hockey}", ex) == 0.0


CODE_ROW = {"id": "c", "input": "Write add(a, b).\nYour code should pass: assert add(1, 2) == 3",
            "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    "
                    "assert candidate(-1, 1) == 0\n"}


def test_code_extraction():
    ex = Example(id="c", question="q", reference="", meta={"entry_point": "add"})
    two = "```python\nprint(add(1, 2))\n```\n\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(two, ex).startswith("def add")  # the block defining the entry point
    assert extract_code("```\ndef f(): pass\n```", ex) == "def f(): pass"
    assert extract_code("```python\ndef add(a, b):\n    return a +", ex).startswith("def add")
    assert extract_code("def add(a, b): return a + b", ex) == "def add(a, b): return a + b"


def test_code_metric_right_wrong_and_entry_point():
    task = build_task("code", "code", [], [CODE_ROW], "inline")
    ex = task.test.examples[0]
    assert ex.meta["entry_point"] == "add"
    right = "Sure:\n```python\ndef helper(x):\n    return x\n\ndef add(a, b):\n    " \
            "return helper(a) + b\n```"
    assert task.score(right, ex) == 1.0
    assert task.score("```python\ndef add(a, b):\n    return a - b\n```", ex) == 0.0
    assert task.score("```python\nimport os\nos._exit(0)\n```", ex) == 0.0  # no faked pass
    assert task.score("no code at all", ex) == 0.0
    # MoCo's fallback: a differently named function is taken as the candidate.
    assert task.score("```python\ndef plus(a, b):\n    return a + b\n```", ex) == 1.0
    no_tests = build_task("c2", "code", [], [{**CODE_ROW, "test": ""}], "inline")
    assert no_tests.score(right, no_tests.test.examples[0]) == 0.0


def test_code_body_only_completion_humaneval_style():
    row = {"id": "h", "input": "Complete the following code\n\nfrom typing import List\n\n"
           "def total(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n"}
    task = build_task("he", "code", [], [row], "inline")
    ex = task.test.examples[0]
    assert ex.meta["entry_point"] == "total" and ex.meta["prompt_code"].startswith("from typing")
    assert "return sum(xs)" in build_program("    return sum(xs)", ex)
    assert task.score("```python\n    return sum(xs)\n```", ex) == 1.0
    # A full function without the import still passes: the prompt's imports come first.
    assert task.score("```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```",
                      ex) == 1.0


@pytest.mark.skipif(not default_data_dir().is_dir(), reason="MoCo task files not found")
def test_moco_rows_score_known_solutions():
    he = load_task(TaskSpec(name="humaneval"))
    ex = next(e for e in he.test if e.meta["entry_point"] == "order_by_points")
    sol = ("```python\ndef order_by_points(nums):\n    def key(n):\n        s = [int(c) for c in "
           "str(abs(n))]\n        if n < 0:\n            s[0] = -s[0]\n        return sum(s)\n"
           "    return sorted(nums, key=key)\n```")
    assert he.score(sol, ex) == 1.0
    assert he.score(sol.replace("key=key", "key=abs"), ex) == 0.0
    gsm = load_task(TaskSpec(name="gsm8k", test_limit=1))
    ex = gsm.test.examples[0]
    assert gsm.score(f"Step by step ... so {ex.reference} in total.", ex) == 1.0
    assert gsm.score(f"The answer is {int(ex.reference) + 1}.", ex) == 0.0
