"""Answer extraction and scoring, following MoCo's eval.py (rewritten, with its known gaps fixed).

Each task kind has an `extract(output, example) -> str` and a `metric(answer, example) -> float`;
`Task.score` chains them. What follows MoCo and what departs from it:
  - multiple choice: MoCo's tiers (bare letter, "answer is X", "(X)", "X)", "X.", option text),
    but the letter must be upper case outside "answer ..." markers (MoCo's case-insensitive match
    read "a" in "this is a." as option A), \\boxed{X} is read first, and within a tier the LAST
    match wins (models state the final choice at the end);
  - exact match: the last \\boxed{...} (balanced braces), else the last "final answer / the answer
    is / answer:" line, else the whole text; numeric tasks (gsm8k) fall back to the last number;
    comparison as MoCo: lists, booleans, numbers (integers exactly, decimals within 1%), then
    normalized strings (MoCo's article and comma quirks fixed, see normalize_answer), plus light
    LaTeX clean-up (\\dfrac, \\left, ^\\circ, \\text{}) for MATH;
  - F1: token F1 after SQuAD normalization, maximum over the aliases;
  - code: the fenced block (preferring one that defines the entry point), run with the row's tests
    in the sandbox; 1.0 only if every assertion passes.
"""
from __future__ import annotations

import ast
import math
import re
import string
from collections import Counter

from moco_ray.tasks.base import Example
from moco_ray.tasks.sandbox import SandboxLimits, run_python

# --- answer extraction -------------------------------------------------------------------------


def find_boxed(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\box{...}, with nested braces kept (\\frac{1}{2})."""
    found = []
    for m in re.finditer(r"\\box(?:ed)?\s*\{", text):
        depth, start = 0, m.end() - 1
        for i in range(start, len(text)):
            if i > start and text[i - 1] == "\\":  # \{ and \} are literal braces (bbh dyck)
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append(text[start + 1:i])
                break
    return found


# Tried in order; within one, the text after the LAST marker is the answer.
_MARKERS = [re.compile(p, re.IGNORECASE) for p in (
    r"final answer\s*(?:is|=)?\s*(?::|-(?=\s))?\s*",
    r"\bthe answer\s*(?:is|=)?\s*(?::|-(?=\s))?\s*",
    r"\banswer\s*:\s*",
)]
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _clean_candidate(s: str) -> str:
    s = s.strip().split("\n")[0].strip()
    return s.strip("*").strip().rstrip(". ").strip("$").strip()


def extract_final_answer(text: str) -> str:
    """The model's final answer: last \\boxed{}, else the last answer-marker line, else the text."""
    boxed = find_boxed(text)
    if boxed:
        return boxed[-1].strip()
    for pattern in _MARKERS:
        found = [_clean_candidate(text[m.end():]) for m in pattern.finditer(text)]
        found = [f for f in found if f]
        if found:
            return found[-1]
    return text.strip()


def extract_number(text: str, last: bool = True) -> str | None:
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    return nums[-1 if last else 0].replace(",", "").replace("$", "")


def extract_exact(output: str, example: Example, numeric: bool = False) -> str:
    """Exact-match extraction; `numeric` tasks (every answer a number) reduce it to one number."""
    answer = extract_final_answer(output)
    if not numeric or _as_number(answer) is not None:
        return answer
    if answer != output.strip():  # a boxed or marked answer with words around the number
        return extract_number(answer, last=False) or answer
    return extract_number(output) or answer


# --- exact match ---------------------------------------------------------------------------------

_KEEP = set("+-*/^=<>%")
_PUNCT = str.maketrans("", "", "".join(c for c in string.punctuation if c not in _KEEP))


def normalize_answer(s: str) -> str:
    """MoCo's EM normalization (lower case, no punctuation but math operators, no articles), with
    two fixes: a comma separates ("(1,2)" is not "12"), and a lone article stays, so that "(A)"
    matches bbh's "A" and an empty answer does not (MoCo reduced both to "")."""
    s = str(s).lower().replace(",", " ").translate(_PUNCT)
    s = re.sub(r"\s*([+\-*/^=<>%])\s*", r"\1", s)
    words = s.split()
    return " ".join([w for w in words if w not in ("a", "an", "the")] or words)


def _strip_latex(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "^\\circ", "^{\\circ}", "\\%",
                 "\\$", "%", "$"):
        s = s.replace(junk, "")
    return s.strip().rstrip(".")


def _as_number(s: str) -> float | None:
    t = _strip_latex(s).replace(",", "")
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+)", t)
    if m:
        num, den = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        return int(num) / int(den) if int(den) else None
    try:
        return float(t)
    except ValueError:
        return None


def _as_bool(s: str) -> bool | None:
    return {"true": True, "yes": True, "false": False, "no": False}.get(
        s.strip().lower().rstrip("."))


def _as_list(s: str) -> list | None:
    t = s.strip()
    if not (t.startswith("[") and t.endswith("]")):
        return None
    try:
        v = ast.literal_eval(t)  # literals only: no code runs
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return list(v) if isinstance(v, (list, tuple)) else None


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the prediction equals the reference as a list, boolean, number or normalized text."""
    ref_list = _as_list(reference)
    if ref_list is not None:
        pred_list = _as_list(prediction)
        if pred_list is None or len(pred_list) != len(ref_list):
            return 0.0
        pairs = zip(pred_list, ref_list, strict=True)
        return float(all(exact_match(str(p), str(r)) for p, r in pairs))
    ref_bool = _as_bool(reference)
    if ref_bool is not None:
        return float(_as_bool(prediction) == ref_bool)
    ref_num, pred_num = _as_number(reference), _as_number(prediction)
    if ref_num is not None and pred_num is not None:
        if re.fullmatch(r"-?\d+", reference.strip()):  # counts and ids: exactly
            return float(pred_num == ref_num)
        if ref_num == 0:
            return float(abs(pred_num) < 1e-9)
        return float(math.isclose(pred_num, ref_num, rel_tol=1e-2))
    ref_norm = normalize_answer(_strip_latex(reference))
    if not ref_norm:  # all punctuation (bbh dyck: ") ] }"): compare the symbols themselves
        pred = re.sub(r"\\([{}])", r"\1", prediction)  # as written inside \boxed{}
        return float(" ".join(pred.split()) == " ".join(reference.split()))
    return float(normalize_answer(_strip_latex(prediction)) == ref_norm)


def exact_metric(answer: str, example: Example) -> float:
    return exact_match(answer, str(example.reference))


# --- multiple choice -----------------------------------------------------------------------------


def _plain(s: str) -> str:
    return " ".join(re.sub(r"[\s.,;:!?]+$", "", s.strip().lower()).split())


def extract_choice(output: str, example: Example) -> str:
    """The chosen option's letter, or "" when no choice can be read from the output."""
    choices = example.choices or {}
    letters = "".join(re.escape(k) for k in choices)
    if not letters:
        return ""
    text = output.strip()
    bare = text.strip("*()[]. ").upper()
    if bare in choices:
        return bare
    for box in reversed(find_boxed(text)):
        inner = re.sub(r"\\text\{([^{}]*)\}", r"\1", box).strip("() ").upper()
        if inner in choices:
            return inner
    # The whole output restating one option ("both A and B.") is unambiguous: before letters.
    low = _plain(text)
    for letter, option in choices.items():
        if low == _plain(option):
            return letter
    one = rf"(?<![A-Za-z0-9])([{letters}])(?![A-Za-z0-9])"
    # After an answer marker a lower-case letter counts too, if nothing but punctuation follows
    # ("answer is c." yes, "the answer is a matter of..." no).
    marked = rf"(?:{one}|(?<![A-Za-z0-9])([{letters.lower()}])(?=\s*(?:[).,;:!*]|$)))"
    lead = r"\s*(?i:is|:|=)?\s*(?::|-(?=\s))?\s*(?i:option\s*)?\**\(?"
    tiers = (rf"(?i:final answer){lead}{marked}", rf"(?i:answer){lead}{marked}",
             rf"\({one}\)", rf"{one}\)", rf"{one}\.")
    for tier in tiers:
        found = [next(g for g in m.groups() if g) for m in re.finditer(tier, text)]
        if found:
            return found[-1].upper()
    # An option quoted in full: the one ending last wins (the conclusion), longer on ties.
    best, best_key = "", (-1, -1)
    for letter, option in choices.items():
        pos = low.rfind(_plain(option)) if option.strip() else -1
        n = len(_plain(option))
        if pos >= 0 and (pos + n, n) > best_key:
            best, best_key = letter, (pos + n, n)
    return best


def choice_metric(answer: str, example: Example) -> float:
    return float(bool(answer) and answer == example.reference)


# --- F1 over aliases -----------------------------------------------------------------------------


def normalize_squad(s: str) -> str:
    s = str(s).lower()
    s = "".join(c for c in s if c not in string.punctuation)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_squad(prediction).split(), normalize_squad(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_over_aliases(prediction: str, aliases: list[str]) -> float:
    return max((token_f1(prediction, a) for a in aliases), default=0.0)


def extract_f1(output: str, example: Example) -> str:
    return extract_final_answer(output)


def f1_metric(answer: str, example: Example) -> float:
    ref = example.reference
    return f1_over_aliases(answer, list(ref) if isinstance(ref, (list, tuple)) else [str(ref)])


# --- code -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def _defines(code: str, name: str) -> bool:
    pattern = rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\("
    return re.search(pattern, code, re.MULTILINE) is not None


def extract_code(output: str, example: Example) -> str:
    """The solution code: a fenced block (python-tagged or bare), else the whole output."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(output)]
    blocks = [b for lang, b in blocks if lang in ("", "python", "py", "python3")] or \
        [b for _, b in blocks]
    if not blocks:
        # An unclosed fence (output cut at max_tokens) still holds usable code.
        m = re.search(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*)", output, re.DOTALL)
        return (m.group(1) if m else output).strip("\n")
    entry = example.meta.get("entry_point")
    for body in blocks:
        if entry and _defines(body, entry):
            return body.strip("\n")
    return blocks[0].strip("\n")


def build_program(code: str, example: Example) -> str | None:
    """Solution + tests as one script; None when there is nothing to test or no function to call."""
    tests = str(example.reference or "")
    if not tests.strip() or not code.strip():
        return None
    prefix = example.meta.get("prompt_code", "")
    if prefix and code[:1] in (" ", "\t"):
        # A body-only completion of the prompt's function (HumanEval style).
        program = prefix.rstrip("\n") + "\n" + code
    else:
        # The prompt's imports and helpers first; the answer's definitions replace its stubs.
        program = (prefix + "\n\n" if prefix else "") + code
    entry = example.meta.get("entry_point")
    if not entry or not _defines(program, entry):
        m = re.search(r"^def\s+(\w+)\s*\(", code, re.MULTILINE)  # MoCo: the first function
        if m is None:
            return None
        entry = m.group(1)
    return f"{program}\n\n{tests}\n\ncandidate = {entry}\ncheck(candidate)\n"


def code_metric(answer: str, example: Example, limits: SandboxLimits | None = None) -> float:
    program = build_program(answer, example)
    if program is None:
        return 0.0
    return float(run_python(program, limits).passed)


# --- synthetic ------------------------------------------------------------------------------------


def extract_line(output: str, example: Example) -> str:
    """First non-empty line, whitespace collapsed: tiny models end answers with a newline."""
    for line in output.strip().splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def string_metric(answer: str, example: Example) -> float:
    return float(" ".join(answer.split()) == " ".join(str(example.reference).split()))
