"""`moco-ray lineage`: each model's versions, what produced them and their weights' sha256, on
an evolution run dir written by the loop's own writers (tests/workflows/conftest.py)."""
from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from moco_ray.cli import app
from moco_ray.models.checkpoint import sha256_file
from moco_ray.workflows.lineage import as_json, lineage


def _by_version(versions):
    return {v.version: v for v in versions}


def test_lineage_of_every_model(evolution_run):
    run, run_dir = evolution_run, evolution_run.run_dir
    tree = lineage(run_dir)
    assert list(tree) == ["m0", "m1", "m2"]

    m0 = _by_version(tree["m0"])
    assert sorted(m0) == [0, 1, 2]
    assert [(v.generation, v.parent) for v in tree["m0"]] == [(0, None), (1, 0), (2, 1)]
    assert m0[2].live and not m0[1].live
    # The base dir has no manifest: its weights are hashed here; checkpoints carry theirs.
    assert m0[0].sha256 == {"model.safetensors": run.sha["m0"][0]}
    assert m0[0].sha256_from == "computed" and m0[0].strategy is None and m0[0].sft is None
    for g in (1, 2):
        v = m0[g]
        assert v.sha256 == {"model.safetensors": run.sha["m0"][g]}
        assert v.sha256_from == "manifest"
        assert (v.strategy, v.recipe, v.keep) == ("text_majority_vote", "multi_student_kd",
                                                  "all")
        assert v.sft.rows == run.sft_rows[(g, "m0")]
        # The manifest's relative data path is read from this run dir.
        assert v.sft.path == str(run_dir / f"gen_{g}" / "data" / "m0")
        assert (v.method, v.steps) == ("lora", 2)

    m1 = _by_version(tree["m1"])
    assert m1[2].failed and "tensor shapes" in m1[2].failed and m1[1].live
    assert m1[2].generation == 2 and m1[2].parent == 1

    # m2's generation-2 checkpoint never reached the pool: no version number, parent v1.
    [unswapped] = [v for v in tree["m2"] if v.version is None]
    assert (unswapped.generation, unswapped.parent, unswapped.live) == (2, 1, False)
    assert unswapped.sha256["model.safetensors"] == run.sha["m2"][2]

    assert list(lineage(run_dir, "m1")) == ["m1"]
    quick = _by_version(lineage(run_dir, "m0", hash_files=False)["m0"])
    assert (quick[0].sha256, quick[0].sha256_from) == ({}, "not hashed")
    assert quick[1].sha256 == m0[1].sha256


def test_lineage_of_a_moved_run_dir_reads_its_own_files(evolution_run, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(evolution_run.run_dir, moved)
    shutil.rmtree(evolution_run.run_dir)  # the original paths in the run's files are gone
    tree = lineage(moved, verify=True)
    v1 = _by_version(tree["m0"])[1]
    assert v1.path == str(moved / "gen_1" / "checkpoints" / "m0") and v1.verified == "ok"
    assert v1.parent == 0 and _by_version(tree["m0"])[2].parent == 1

    # An altered weight file is caught by --verify (the manifest's hash stays as recorded).
    f = moved / "gen_2" / "checkpoints" / "m0" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    v2 = _by_version(lineage(moved, "m0", verify=True)["m0"])[2]
    assert "does not match the sha256" in v2.verified
    assert v2.sha256["model.safetensors"] != sha256_file(f)


def test_lineage_cli(evolution_run, tmp_path):
    run_dir = evolution_run.run_dir
    res = CliRunner().invoke(app, ["lineage", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == as_json(lineage(run_dir))

    res = CliRunner().invoke(app, ["lineage", str(run_dir), "m0"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "m1" not in out and "v2, generation 2, live" in out
    assert evolution_run.sha["m0"][2] in out and "SFT rows 20" in out
    # The tree nests each version under its parent.
    assert out.index("v0, starting weights") < out.index("v1, generation 1") \
        < out.index("v2, generation 2")

    res = CliRunner().invoke(app, ["lineage", str(run_dir), "nope"])
    assert res.exit_code == 2 and "no model 'nope'" in res.output and "m0" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["lineage", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "not an evolution run dir" in " ".join(res.output.split())
