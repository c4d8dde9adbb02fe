"""The Parquet schema and the row conversions are derived from `Record`, and stay what they were."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, Field

from moco_ray.outputs import SCHEMA, arrow_schema, records_to_table, row_to_record
from moco_ray.records import Cost, Record, Turn

# The hand-written schema the derivation replaced: Parquet files written with it must still read.
_TURN = pa.struct([("model", pa.string()), ("step", pa.string()), ("prompt", pa.string()),
                   ("output", pa.string()), ("version", pa.int64()), ("meta", pa.string())])
_COST = pa.struct([("model", pa.string()), ("calls", pa.int64()), ("prompt_tokens", pa.int64()),
                   ("completion_tokens", pa.int64()), ("engine_seconds", pa.float64())])
EXPECTED = pa.schema([
    ("run", pa.string()), ("generation", pa.int64()), ("job", pa.string()),
    ("strategy", pa.string()), ("task", pa.string()), ("split", pa.string()),
    ("example_id", pa.string()), ("prompt", pa.string()), ("output", pa.string()),
    ("chat", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("reference", pa.string()), ("score", pa.float64()), ("trace", pa.list_(_TURN)),
    ("model_versions", pa.map_(pa.string(), pa.int64())), ("cost", pa.list_(_COST)),
    ("meta", pa.string()),
])


class ExtendedRecord(Record):
    note: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class Unmappable(BaseModel):
    name: str
    ids: set[int]


def _full(i: int, score: float | None) -> Record:
    return Record(
        run="r", generation=3, job="j", strategy="debate", task="gsm8k", split="test",
        example_id=str(i), prompt="p", output="o",
        chat=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "p"}],
        reference="o", score=score,
        trace=[Turn(model="m0", step="gen", prompt="p", output="x", version=2,
                    meta={"mean_logprob": -0.5, "nested": {"a": [1, 2]}}),
               Turn(model="m1", step="judge", prompt="q", output="y")],
        model_versions={"m0": 2, "m1": 0},
        cost={"m0": Cost(calls=2, prompt_tokens=7, completion_tokens=5, engine_seconds=0.25),
              "m1": Cost(calls=1)},
        meta={"votes": {"o": 2}, "flag": True},
    )


def test_derived_schema_is_the_hand_written_one():
    assert SCHEMA == EXPECTED
    assert arrow_schema(Record) == EXPECTED


def test_full_record_round_trips_through_parquet():
    recs = [_full(0, None), _full(1, 0.75)]
    sink = pa.BufferOutputStream()
    pq.write_table(records_to_table(recs), sink)
    table = pq.read_table(pa.BufferReader(sink.getvalue()))
    assert table.schema == EXPECTED
    assert [row_to_record(row) for row in table.to_pylist()] == recs


def test_extension_fields_become_columns():
    schema = arrow_schema(ExtendedRecord)
    assert schema.names == EXPECTED.names + ["note", "extra"]
    assert schema.field("note").type == pa.string()
    assert schema.field("extra").type == pa.string()  # free-form: JSON text


def test_rows_missing_a_column_take_the_field_default():
    # What a file written before a field was added gives: the column is absent (or null).
    row = records_to_table([_full(0, 1.0)]).to_pylist()[0]
    del row["reference"]
    assert row_to_record({**row, "meta": None}) == _full(0, 1.0).model_copy(
        update={"reference": "", "meta": {}})


def test_unmappable_annotation_names_the_field():
    with pytest.raises(TypeError, match=r"Unmappable\.ids"):
        arrow_schema(Unmappable)
