"""Raw rows (MoCo's shape) -> `Example`s, with one clear error per bad row.

Columns each kind reads (role -> default column; `options.columns` remaps any role):
  multiple_choice: question, choices (dict letter -> text, its string repr, a list, or
                   {"label": [...], "text": [...]}), answer (a key, or an index into the choices)
  exact_match:     input, output (str or number; rows whose output is null are skipped: MoCo's
                   math file has 12 and no metric can score them)
  f1:              input, output (a list of aliases, its JSON string as in popqa, or one string)
  code:            input, test (defines `check(candidate)`), entry_point (optional: else the last
                   function of the prompt's code, or the function the prompt's `assert` calls)
Keys outside these go to `Example.meta`. Ids are kept as strings; a repeated id (MoCo's math file
repeats 154) gets "#2", "#3"... so records stay unique, with the original in meta["source_id"].
"""
from __future__ import annotations

import ast
import builtins
import json
import logging
import re
from collections import Counter
from typing import Any

from moco_ray.tasks.base import Example

log = logging.getLogger(__name__)

KINDS = ("multiple_choice", "exact_match", "f1", "code")
_ALIASES = {"mc": "multiple_choice", "em": "exact_match", "f1_match": "f1", "coding": "code"}
_DEFAULTS = {
    "multiple_choice": {"id": "id", "question": "question", "choices": "choices",
                        "answer": "answer"},
    "exact_match": {"id": "id", "question": "input", "answer": "output"},
    "f1": {"id": "id", "question": "input", "answer": "output"},
    "code": {"id": "id", "question": "input", "tests": "test", "entry_point": "entry_point"},
}
COLUMN_ROLES = sorted({r for cols in _DEFAULTS.values() for r in cols})
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_kind(kind: str) -> str | None:
    """The project's kind for a kind or MoCo task_type name; None when unknown."""
    kind = _ALIASES.get(kind, kind)
    return kind if kind in KINDS else None


def is_numeric_answer(refs: list[Any]) -> bool:
    """True when every reference is a plain number (gsm8k), so extraction may fall back to one."""
    return bool(refs) and all(isinstance(r, str) and _NUMBER.fullmatch(r.strip()) for r in refs)


class _Row:
    """One row being converted: knows where it is, for error messages."""

    def __init__(self, row: Any, cols: dict[str, str], where: str, split: str, index: int):
        self.cols, self.loc = cols, f"{where} [{split}] row {index}"
        if not isinstance(row, dict):
            raise ValueError(  # noqa: TRY004 (every row problem is a ValueError)
                f"{self.loc}: expected an object, got {type(row).__name__}")
        self.row, self.used = row, {cols["id"]}
        rid = row.get(cols["id"])
        self.id = str(rid) if rid is not None else f"{split}-{index}"
        self.loc += f" (id {self.id})"

    def get(self, role: str, required: bool = True) -> Any:
        col = self.cols[role]
        self.used.add(col)
        if col not in self.row and required:
            raise ValueError(f"{self.loc}: missing key {col!r} ({role}); keys: {sorted(self.row)}")
        return self.row.get(col)

    def error(self, role: str, msg: str) -> ValueError:
        return ValueError(f"{self.loc}: key {self.cols[role]!r} ({role}) {msg}")

    def text(self, role: str) -> str:
        v = self.get(role)
        if not isinstance(v, str) or not v.strip():
            raise self.error(role, f"must be a non-empty string; got {type(v).__name__} {v!r:.60}")
        return v

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.row.items() if k not in self.used}


def _choices(r: _Row) -> tuple[dict[str, str], dict[str, str]]:
    """(letter -> text, original key -> letter). Non-letter keys ('1234' in ARC) become A, B..."""
    raw = r.get("choices")
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)  # MoCo files may store the dict's repr
        except (ValueError, SyntaxError):
            raise r.error("choices",
                          f"is a string but not a dict or list literal: {raw!r:.60}") from None
    if isinstance(raw, dict) and set(raw) == {"label", "text"}:  # hub ARC's layout
        if len(raw["label"]) != len(raw["text"]):
            raise r.error("choices", f"has {len(raw['label'])} labels for {len(raw['text'])} texts")
        raw = dict(zip(map(str, raw["label"]), raw["text"], strict=True))
    if isinstance(raw, (list, tuple)):
        raw = {str(i): v for i, v in enumerate(raw)}
    if not isinstance(raw, dict) or not 2 <= len(raw) <= 26:
        raise r.error("choices", f"must hold 2-26 options (dict, list or repr); got {raw!r:.60}")
    bad = [k for k, v in raw.items() if not isinstance(v, (str, int, float))]
    if bad:
        raise r.error("choices", f"option {bad[0]!r} is not text")
    keys = [str(k) for k in raw]
    letters = keys
    if not all(len(k) == 1 and k in _LETTERS for k in keys):
        letters = list(_LETTERS[:len(keys)])
    return ({ltr: str(v) for ltr, v in zip(letters, raw.values(), strict=True)},
            dict(zip(keys, letters, strict=True)))


def _answer_letter(r: _Row, keymap: dict[str, str]) -> str:
    ans = r.get("answer")
    if isinstance(ans, str) and ans.strip() in keymap:
        return keymap[ans.strip()]
    if isinstance(ans, int) and not isinstance(ans, bool):
        if str(ans) in keymap:
            return keymap[str(ans)]
        if 0 <= ans < len(keymap):  # an index, as in hub datasets such as MMLU
            return list(keymap.values())[ans]
    raise r.error("answer", f"is {ans!r}, not one of the choices {list(keymap)}")


def _aliases(r: _Row) -> list[str] | None:
    out = r.get("answer")
    if out is None:
        return None
    if isinstance(out, str) and out.strip().startswith("["):
        out = _list_literal(out)
    if isinstance(out, str):
        out = [out]
    if not isinstance(out, list) or not out or not all(isinstance(a, str) for a in out):
        raise r.error("answer", f"must be a string or a list of strings; got {out!r:.60}")
    return out


def _list_literal(s: str) -> Any:
    """popqa keeps its aliases as a JSON list in a string; fall back to a Python literal, then
    to the string itself (an answer that merely starts with "[")."""
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass  # not JSON; try a Python literal next
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


def prompt_code(question: str) -> str:
    """The Python source in a code prompt (HumanEval: after 'Complete the following...'), or ""."""
    m = re.search(r"^(?:from |import |def |class |@)", question, re.MULTILINE)
    if not m:
        return ""
    src = question[m.start():]
    try:
        ast.parse(src)
    except SyntaxError:
        return ""
    return src


def entry_point(question: str, code: str) -> str | None:
    """The function the tests call: the prompt's last top-level def, else the one `assert` calls."""
    if code:
        defs = [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)]
        if defs:
            return defs[-1]
    m = re.search(r"\bassert\b(.*)", question)
    if m:
        for call in re.finditer(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", m.group(1)):
            if not hasattr(builtins, call.group(1)):
                return call.group(1)
    return None


def to_example(kind: str, r: _Row) -> Example | None:
    question = r.text("question")
    if kind == "multiple_choice":
        choices, keymap = _choices(r)
        answer = _answer_letter(r, keymap)
        meta = r.meta()
        if list(keymap) != list(choices):
            meta["source_keys"] = list(keymap)
        return Example(id=r.id, question=question, reference=answer, choices=choices, meta=meta)
    if kind == "exact_match":
        ref = r.get("answer")
        if ref is None:
            return None
        if isinstance(ref, bool) or not isinstance(ref, (str, int, float)):
            raise r.error("answer", f"must be a string or number; got {type(ref).__name__}")
        return Example(id=r.id, question=question, reference=str(ref), meta=r.meta())
    if kind == "f1":
        aliases = _aliases(r)
        return None if aliases is None else Example(id=r.id, question=question, reference=aliases,
                                                    meta=r.meta())
    tests = r.get("tests")
    if not isinstance(tests, str):
        raise r.error("tests", f"must be a string of test code; got {type(tests).__name__}")
    code = prompt_code(question)
    entry = r.get("entry_point", required=False) or entry_point(question, code)
    meta = {**r.meta(), "entry_point": entry, "prompt_code": code}
    return Example(id=r.id, question=question, reference=tests, meta=meta)


def to_examples(kind: str, rows: list[Any], columns: dict[str, str], where: str,
                split: str) -> tuple[Example, ...]:
    cols = {**_DEFAULTS[kind], **columns}
    out, skipped, seen = [], [], Counter()
    for i, raw in enumerate(rows):
        r = _Row(raw, cols, where, split, i)
        ex = to_example(kind, r)
        if ex is None:
            skipped.append(r.id)
            continue
        seen[ex.id] += 1
        if seen[ex.id] > 1:
            ex = ex.model_copy(update={"id": f"{ex.id}#{seen[ex.id]}",
                                       "meta": {**ex.meta, "source_id": ex.id}})
        out.append(ex)
    if skipped:
        log.warning("%s [%s]: skipped %d row(s) without a reference: ids %s", where, split,
                    len(skipped), skipped[:10])
    return tuple(out)
