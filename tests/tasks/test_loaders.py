"""Loaders: every MoCo file, JSONL, local Hugging Face datasets, synthetic specs, bad rows."""
from __future__ import annotations

import json
import pickle

import pytest

from moco_ray.config import TaskSpec, default_data_dir
from moco_ray.tasks import DevSplit, TestSplit, build_task, known_task, load_task, require_dev
from moco_ray.tasks.loaders import moco_data_dir

MOCO_TASKS = {  # name -> (kind, dev rows, test rows) as loaded (math drops rows without answers)
    "arc_challenge": ("multiple_choice", 299, 1172), "bbh": ("exact_match", 1000, 1000),
    "gsm8k": ("exact_match", 200, 1000), "humaneval": ("code", 50, 114),
    "math": ("exact_match", 949, 951), "mbpp": ("code", 487, 487),
    "medqa": ("multiple_choice", 636, 637), "mmlu_redux": ("multiple_choice", 1000, 1000),
    "popqa": ("f1", 1000, 1000), "truthfulqa": ("multiple_choice", 200, 617),
}
needs_moco = pytest.mark.skipif(not default_data_dir().is_dir(),
                                reason=f"MoCo task files not found at {default_data_dir()}")


@needs_moco
@pytest.mark.parametrize("name", sorted(MOCO_TASKS))
def test_every_moco_file_loads(name):
    kind, n_dev, n_test = MOCO_TASKS[name]
    task = load_task(TaskSpec(name=name))
    assert (task.kind, len(task.dev), len(task.test)) == (kind, n_dev, n_test)
    assert isinstance(task.dev, DevSplit) and isinstance(task.test, TestSplit)
    for split in (task.dev, task.test):
        assert len({e.id for e in split}) == len(split)  # unique ids, even for math's repeats
    ex = task.test.examples[0]
    msgs = task.prompt(ex)
    assert msgs[0]["role"] == "user" and ex.question.strip()[:40] in msgs[0]["content"]
    if kind == "multiple_choice":
        assert all(e.reference in e.choices for e in task.test)
        assert "A) " in msgs[0]["content"] and "letter" in msgs[0]["content"]
    elif kind in ("exact_match", "f1"):
        assert "\\boxed{ANSWER}" in msgs[0]["content"]
    if kind == "f1":
        assert all(isinstance(e.reference, list) and e.reference for e in task.test)
    if kind == "code":
        assert all(e.meta["entry_point"] for e in task.test)
        assert "```python" in msgs[0]["content"]


@needs_moco
def test_moco_limits_and_specifics():
    task = load_task(TaskSpec(name="arc_challenge", dev_limit=5, test_limit=7, max_tokens=9))
    assert (len(task.dev), len(task.test), task.max_tokens) == (5, 7, 9)
    # ARC rows with choices keyed "1".."4" are relabelled A-D, the answer with them.
    arc = load_task(TaskSpec(name="arc_challenge"))
    relabelled = [e for e in arc.test if "source_keys" in e.meta]
    assert relabelled and all(set(e.choices) <= set("ABCDE") for e in relabelled)
    gsm = load_task(TaskSpec(name="gsm8k", test_limit=3))
    assert gsm.extract.keywords == {"numeric": True}  # every reference is a number
    bbh = load_task(TaskSpec(name="bbh", test_limit=3))
    assert bbh.extract.keywords == {"numeric": False}
    he = load_task(TaskSpec(name="humaneval"))
    two = next(e for e in he.dev.examples + he.test.examples if "def find_zero" in e.question)
    assert two.meta["entry_point"] == "find_zero"  # the last function of the prompt, not `poly`
    math = load_task(TaskSpec(name="math"))
    dup = [e for e in math.dev if "source_id" in e.meta]
    assert dup and all(e.id.startswith(e.meta["source_id"] + "#") for e in dup)


def test_known_task_names_the_problem(tmp_path):
    (tmp_path / "mine.json").write_text(json.dumps({"dev": [], "test": []}))
    assert known_task(TaskSpec(name="mine"), tmp_path) is None
    msg = known_task(TaskSpec(name="nope"), tmp_path)
    assert "nope.json" in msg and "mine" in msg
    assert "does not exist" in known_task(TaskSpec(name="x"), tmp_path / "absent")
    assert "synthetic tasks" in known_task(TaskSpec(name="no_such", source="synthetic"))
    assert known_task(TaskSpec(name="add", source="synthetic")) is None
    assert "kinds" in known_task(TaskSpec(name="mine", kind="essay"), tmp_path)
    assert "needs `kind`" in known_task(TaskSpec(name="j", source="jsonl", path=str(tmp_path)))
    assert "colums" in known_task(TaskSpec(name="mine", options={"colums": {}}), tmp_path)
    assert "unknown roles" in known_task(TaskSpec(name="mine", options={"columns": {"q": "x"}}),
                                         tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_task(TaskSpec(name="nope"), tmp_path)


def _moco_file(tmp_path, rows, task_type="exact_match", name="t"):
    (tmp_path / f"{name}.json").write_text(json.dumps({"task_type": task_type, "dev": rows,
                                                       "test": rows}))
    return TaskSpec(name=name)


def test_bad_row_error_names_file_split_row_and_key(tmp_path):
    spec = _moco_file(tmp_path, [{"id": 1, "input": "q", "output": "1"}, {"id": 7, "input": "q"}])
    with pytest.raises(ValueError) as e:
        load_task(spec, tmp_path)
    msg = str(e.value)
    assert "t.json" in msg and "[dev]" in msg and "row 1" in msg and "id 7" in msg
    assert "'output'" in msg
    spec = _moco_file(tmp_path, [{"id": 1, "input": ["not", "text"], "output": "1"}])
    with pytest.raises(ValueError, match=r"'input' \(question\) must be a non-empty string"):
        load_task(spec, tmp_path)
    spec = _moco_file(tmp_path, [{"question": "q", "choices": {"A": "x", "B": "y"}, "answer": "C"}],
                      "multiple_choice")
    with pytest.raises(ValueError, match=r"'answer'.*'C', not one of the choices \['A', 'B'\]"):
        load_task(spec, tmp_path)
    spec = _moco_file(tmp_path, [{"question": "q", "choices": "{'A': 'x',", "answer": "A"}],
                      "multiple_choice")
    with pytest.raises(ValueError, match="'choices'.*not a dict or list literal"):
        load_task(spec, tmp_path)
    spec = _moco_file(tmp_path, [{"input": "q", "test": None}], "coding")
    with pytest.raises(ValueError, match="'test' \\(tests\\) must be a string"):
        load_task(spec, tmp_path)


def test_row_shapes_moco_accepts(tmp_path):
    rows = [{"id": "a", "question": "q1", "choices": "{'A': 'x', 'B': 'y'}", "answer": "B",
             "extra": 3},
            {"id": "b", "question": "q2", "choices": ["x", "y", "z"], "answer": 2},
            {"id": "c", "question": "q3", "choices": {"label": ["1", "2"], "text": ["u", "v"]},
             "answer": "2"}]
    task = load_task(_moco_file(tmp_path, rows, "multiple_choice"), tmp_path)
    a, b, c = task.test.examples
    assert (a.choices, a.reference, a.meta) == ({"A": "x", "B": "y"}, "B", {"extra": 3})
    assert (b.reference, b.choices["C"], c.reference, c.choices) == ("C", "z", "B",
                                                                     {"A": "u", "B": "v"})
    f1 = load_task(_moco_file(tmp_path, [{"input": "q", "output": '["x y", "z"]'},
                                         {"input": "q", "output": "plain"},
                                         {"input": "q", "output": None}], "f1_match"), tmp_path)
    assert [e.reference for e in f1.test] == [["x y", "z"], ["plain"]]  # the null row is skipped


def test_task_pickles_for_ray():
    task = build_task("mini", "exact_match", [], [{"input": "q", "output": "12"}], "inline")
    again = pickle.loads(pickle.dumps(task))
    assert again.score("\\boxed{12}", again.test.examples[0]) == 1.0
    assert again.extract.keywords == {"numeric": True}


def test_require_dev_refuses_test_split():
    task = load_task(TaskSpec(name="add", source="synthetic", dev_limit=3, test_limit=3))
    assert require_dev(task.dev, "fit") is task.dev
    with pytest.raises(TypeError, match="dev data only"):
        require_dev(task.test, "fit")
    with pytest.raises(TypeError):
        require_dev(list(task.dev.examples), "fit")


def test_jsonl_split_column_two_files_and_folder(tmp_path):
    rows = [{"input": f"{i}+1", "output": str(i + 1), "split": s}
            for i, s in enumerate(["dev", "test", "train", "test", "validation"])]
    f = tmp_path / "all.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task(TaskSpec(name="j", source="jsonl", path=str(f), kind="exact_match"))
    assert [e.reference for e in task.dev] == ["1", "5"] and [e.reference for e in task.test] == \
        ["2", "4"]
    (tmp_path / "dev.jsonl").write_text(json.dumps({"q": "x", "a": "y"}))
    (tmp_path / "test.jsonl").write_text(json.dumps({"q": "x2", "a": "y2"}))
    spec = TaskSpec(name="d", source="jsonl", path=str(tmp_path), kind="em",
                    options={"columns": {"question": "q", "answer": "a"}})
    task = load_task(spec)
    assert task.kind == "exact_match" and task.test.examples[0].question == "x2"
    spec2 = TaskSpec(name="d", source="jsonl", kind="f1", options={
        "dev_path": str(tmp_path / "dev.jsonl"), "test_path": str(tmp_path / "test.jsonl"),
        "columns": {"question": "q", "answer": "a"}})
    assert load_task(spec2).test.examples[0].reference == ["y2"]
    f.write_text('{"input": "x", "output": "1", "split": "dev"}\n{oops\n')
    with pytest.raises(ValueError, match=r"all.jsonl:2: not valid JSON"):
        load_task(TaskSpec(name="j", source="jsonl", path=str(f), kind="exact_match"))


def test_hf_local_parquet_and_json(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "ds"
    data.mkdir()
    rows = [{"question": f"q{i}", "choices": ["a", "b", "c"], "answer": i % 3} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows[:2]), data / "dev.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), data / "test.parquet")
    cache = {"cache_dir": str(tmp_path / "cache")}
    task = load_task(TaskSpec(name="loc", source="hf", path=str(data), kind="multiple_choice",
                              test_limit=3, options={"load_kwargs": cache}))
    assert len(task.dev) == 2 and len(task.test) == 3
    assert task.test.examples[0].reference == "C" and task.test.examples[0].choices["C"] == "c"
    jl = tmp_path / "rows.jsonl"
    jl.write_text("\n".join(json.dumps({"problem": f"{i}+1", "sol": i + 1}) for i in range(4)))
    spec = TaskSpec(name="j", source="hf", path="json", kind="exact_match", options={
        "load_kwargs": {"data_files": {"dev": str(jl), "test": str(jl)}, **cache},
        "dev_split": "dev", "columns": {"question": "problem", "answer": "sol"}})
    task = load_task(spec)
    ex = task.test.examples[3]
    assert ex.reference == "4" and task.score("\\boxed{4}", ex) == 1.0
    bad = spec.model_copy(update={"options": {**spec.options, "test_split": "eval"}})
    with pytest.raises(ValueError, match=r"no split 'eval'.*splits: \['dev', 'test'\]"):
        load_task(bad)


def test_build_task_from_rows_and_synthetic_spec():
    task = build_task("mini", "exact_match", [{"input": "1+1", "output": 2}],
                      [{"input": "2+2", "output": "4"}], "inline")
    assert task.score("so the answer is 4.", task.test.examples[0]) == 1.0
    syn = load_task(TaskSpec(name="my_sort", source="synthetic", dev_limit=4, test_limit=5,
                             options={"task": "sort", "seed": 3}))
    assert (syn.name, len(syn.dev), len(syn.test), syn.kind) == ("my_sort", 4, 5, "synthetic")
    assert syn.test.examples[0].question.startswith("sort ")


def test_moco_data_dir_env_then_shipped_folder_then_default(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the job in its unpacked working dir: MoCo task files
    in its ./data/moco are found there, unless $MOCO_RAY_DATA names another folder."""
    def task_file(folder, answer):
        folder.mkdir(parents=True)
        (folder / "mine.json").write_text(json.dumps({
            "task_type": "exact_match", "dev": [], "test": [{"input": "q", "output": answer}]}))

    task_file(tmp_path / "job" / "data" / "moco", "1")
    task_file(tmp_path / "elsewhere", "2")
    monkeypatch.delenv("MOCO_RAY_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "job")
    assert moco_data_dir() == tmp_path / "job" / "data" / "moco"
    assert load_task(TaskSpec(name="mine")).test.examples[0].reference == "1"

    monkeypatch.setenv("MOCO_RAY_DATA", str(tmp_path / "elsewhere"))
    assert load_task(TaskSpec(name="mine")).test.examples[0].reference == "2"

    monkeypatch.delenv("MOCO_RAY_DATA")
    monkeypatch.chdir(tmp_path)  # no ./data/moco here: the folder beside the repo
    assert moco_data_dir() == default_data_dir()
    assert "put the task files in ./data/moco" in known_task(TaskSpec(name="mine"),
                                                             tmp_path / "absent")
