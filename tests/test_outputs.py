"""Records survive the trip to Parquet (through Ray Data) and back, with the typed schema."""
from __future__ import annotations

from moco_ray.outputs import SCHEMA, read_records, records_to_table, write_records
from moco_ray.records import Cost, Record, Turn


def _rec(i: int) -> Record:
    return Record(run="r", generation=1, job="j", strategy="s", task="t", split="dev",
                  example_id=str(i), prompt="p", output=f"o{i}", reference="o1",
                  score=float(i == 1),
                  trace=[Turn(model="m0", step="gen", prompt="p", output="x", version=2,
                              meta={"mean_logprob": -0.5, "nested": {"a": [1, 2]}})],
                  model_versions={"m0": 2}, cost={"m0": Cost(calls=1, prompt_tokens=7)},
                  meta={"votes": {"o1": 2}})


def test_table_schema_and_roundtrip(ray_session, tmp_path):
    recs = [_rec(i) for i in range(5)]
    t = records_to_table(recs)
    assert t.schema == SCHEMA and t.num_rows == 5
    path = write_records(recs, tmp_path / "records")
    back = sorted(read_records(path), key=lambda r: r.example_id)
    assert back == recs


def test_records_without_trace_or_cost():
    r = Record(strategy="s", task="t", split="test", example_id="1", prompt="p", output="o")
    assert records_to_table([r]).column("cost").to_pylist() == [[]]


def test_read_dataset_small_on_driver_large_by_ray_data(ray_session, tmp_path, monkeypatch):
    import pytest
    import ray.data

    from moco_ray import outputs

    path = write_records([_rec(i) for i in range(5)], tmp_path / "recs")
    reads = []
    real_read = ray.data.read_parquet
    monkeypatch.setattr(ray.data, "read_parquet", lambda p: reads.append(p) or real_read(p))
    small = outputs.read_dataset(path)
    assert reads == []  # read on the driver
    monkeypatch.setattr(outputs, "SMALL_PARQUET_BYTES", 0)  # every file is "large" now
    large = outputs.read_dataset(path)
    assert reads == [str(path)]

    def ids(ds):
        return sorted(r["example_id"] for r in ds.take_all())

    assert ids(small) == ids(large) == sorted(_rec(i).example_id for i in range(5))
    assert small.schema().names == large.schema().names
    with pytest.raises(FileNotFoundError, match="no Parquet data"):
        outputs.read_dataset(tmp_path / "missing")
