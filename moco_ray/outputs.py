"""Records to Arrow/Parquet. The schema is derived from `records.Record`; Ray Data does the writing.

Free-form fields (per-turn meta, record meta) are stored as JSON strings so that one table holds
records of every strategy without a schema clash; everything a query filters on is a typed column.
"""
from __future__ import annotations

import functools
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from moco_ray.records import ChatMessage, Record


class _Codec(NamedTuple):
    """How one annotation is stored: its Arrow type and the value conversions both ways."""

    type: pa.DataType
    encode: Callable[[Any], Any]  # model value -> what `pa.Table.from_pylist` takes
    decode: Callable[[Any], Any]  # what `pa.Table.to_pylist` gives -> a value pydantic validates
    nullable: bool = False


def _same(v: Any) -> Any:
    return v


def _json_dump(v: Any) -> str:
    return json.dumps(v, default=str)


_SCALARS = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
_CHAT = pa.struct([("role", pa.string()), ("content", pa.string())])
# `dict[str, Model]` is stored as a list of structs whose first field holds the key.
_KEY = "model"


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _codec(ann: Any, where: str) -> _Codec:
    """The codec of annotation `ann` of field `where`; TypeError when there is none, so that a
    field the table cannot hold fails at import instead of being dropped."""
    origin, args = get_origin(ann), get_args(ann)
    if origin in (Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _codec(next(a for a in args if a is not type(None)), where)
        return _Codec(inner.type, lambda v: None if v is None else inner.encode(v),
                      lambda v: None if v is None else inner.decode(v), nullable=True)
    if ann in _SCALARS:
        return _Codec(_SCALARS[ann], _same, _same)
    if origin is Literal and all(isinstance(a, str) for a in args):
        return _Codec(pa.string(), _same, _same)
    if _is_model(ann):
        return _model_codec(ann)
    if origin is list and len(args) == 1:
        # Chat messages are `dict[str, str]` by annotation but role/content structs on disk.
        item = _Codec(_CHAT, _same, _same) if args[0] == ChatMessage else _codec(args[0], where)
        return _Codec(pa.list_(item.type), lambda v: [item.encode(x) for x in v],
                      lambda v: [item.decode(x) for x in v])
    if origin is dict and len(args) == 2:
        key, val = args
        if key is str and val is Any:
            return _Codec(pa.string(), _json_dump, json.loads)
        if key in _SCALARS and val in _SCALARS:
            return _Codec(pa.map_(_SCALARS[key], _SCALARS[val]), lambda v: list(v.items()), dict)
        if key is str and _is_model(val):
            return _keyed_codec(_model_codec(val), where)
    raise TypeError(f"{where}: no Arrow type for annotation {ann!r}; map it in moco_ray/outputs.py")


def _keyed_codec(model: _Codec, where: str) -> _Codec:
    """`dict[str, Model]` as a list of {"model": key, **fields}."""
    fields = [model.type.field(i) for i in range(model.type.num_fields)]
    if any(f.name == _KEY for f in fields):
        raise TypeError(f"{where}: the value model has a field {_KEY!r}, the stored key's name")

    def decode(rows: list[dict]) -> dict:
        return {r[_KEY]: model.decode({k: v for k, v in r.items() if k != _KEY}) for r in rows}

    return _Codec(pa.list_(pa.struct([pa.field(_KEY, pa.string()), *fields])),
                  lambda v: [{_KEY: k, **model.encode(m)} for k, m in v.items()], decode)


@functools.cache
def _model_codec(cls: type[BaseModel]) -> _Codec:
    """A pydantic model as a struct of its fields, in declaration order."""
    codecs = {name: _codec(f.annotation, f"{cls.__name__}.{name}")
              for name, f in cls.model_fields.items()}

    def encode(obj: BaseModel) -> dict:
        return {name: c.encode(getattr(obj, name)) for name, c in codecs.items()}

    def decode(row: dict) -> BaseModel:
        # A column missing from older data (or null where the field can't be) takes the field's
        # default, so files written before a field was added still read.
        return cls(**{name: c.decode(row[name]) for name, c in codecs.items()
                      if name in row and (row[name] is not None or c.nullable)})

    return _Codec(pa.struct([(name, c.type) for name, c in codecs.items()]), encode, decode)


def arrow_schema(model_cls: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a table of `model_cls` rows, one column per field."""
    struct = _model_codec(model_cls).type
    return pa.schema([struct.field(i) for i in range(struct.num_fields)])


SCHEMA = arrow_schema(Record)


def record_row(r: Record) -> dict:
    return _model_codec(Record).encode(r)


def records_to_table(records: list[Record]) -> pa.Table:
    return pa.Table.from_pylist([record_row(r) for r in records], schema=SCHEMA)


def row_to_record(row: dict) -> Record:
    """Inverse of `record_row` (a Parquet row back to a typed Record)."""
    return _model_codec(Record).decode(row)


def write_records(records: list[Record], path: str | Path) -> Path:
    """Materialize records as a Parquet dataset directory with Ray Data."""
    import ray.data

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ray.data.from_arrow(records_to_table(records)).write_parquet(str(path))
    return path


def read_records(path: str | Path) -> list[Record]:
    table = pq.read_table(str(path), schema=SCHEMA)
    return [row_to_record(row) for row in table.to_pylist()]


# Parquet up to this size is read by the driver and handed to Ray Data whole. `read_parquet`
# starts its listing, footer and read tasks for any size: ~12 s a read on a 2-core machine,
# against 0.1 s for a small table read here.
SMALL_PARQUET_BYTES = 256 * 2**20


def read_dataset(path: str | Path):
    """A Ray Dataset of the Parquet at `path` (a file or a directory of files). Small local data
    is read with pyarrow on the driver (`ray.data.from_arrow`); large or remote data (an URI)
    with `ray.data.read_parquet`, in parallel tasks."""
    import ray.data

    path = str(path)
    if "://" not in path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no Parquet data at {path!r}")
        files = [p] if p.is_file() else list(p.rglob("*.parquet"))
        if sum(f.stat().st_size for f in files) <= SMALL_PARQUET_BYTES:
            return ray.data.from_arrow(pq.read_table(path))
    return ray.data.read_parquet(path)
