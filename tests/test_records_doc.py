"""docs/records.md lists exactly the Parquet columns of a Record, with their Arrow types."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

from moco_ray.outputs import arrow_schema
from moco_ray.records import Record

DOC = Path(__file__).resolve().parents[1] / "docs" / "records.md"


def _fields(fields, prefix: str = ""):
    """(path, type) of every column and nested field; containers of structs by their shape."""
    for f in fields:
        name, t = prefix + f.name, f.type
        if pa.types.is_list(t) and pa.types.is_struct(t.value_type):
            yield name, "list<struct>"
            yield from _fields(list(t.value_type), name + "[].")
        elif pa.types.is_struct(t):
            yield name, "struct"
            yield from _fields(list(t), name + ".")
        else:
            yield name, str(t)


def test_every_column_is_documented_with_its_type():
    schema = dict(_fields(arrow_schema(Record)))
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| (.+) \|$", DOC.read_text(), re.MULTILINE)
    documented = {name: typ for name, typ, _ in rows}
    assert len(documented) == len(rows), "a column is documented twice"
    assert all(what.strip() for _, _, what in rows)
    missing = sorted(set(schema) - set(documented))
    gone = sorted(set(documented) - set(schema))
    assert not missing, f"columns not in docs/records.md: {missing}"
    assert not gone, f"docs/records.md lists columns the schema no longer has: {gone}"
    wrong = {n: (documented[n], t) for n, t in schema.items() if documented[n] != t}
    assert not wrong, f"documented type != schema type: {wrong}"
