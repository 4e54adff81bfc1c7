"""The run directory as a contract: plan.json written by the launcher reads back as the same typed Plan, and a
damaged one is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.plan.memory import ModelShape
from launcher.plan.plan import Cluster, make_plan
from launcher.plan.recipe_file import load_recipe
from launcher.rundir import PLAN_FILE, RunDir, RunPlan
from tests.conftest import TINY_MODEL


@pytest.fixture
def planned(recipe_file):
    """A plan with every part filled in: CUDA env, the memory planner's estimate, a resolved 'auto'."""
    rec = load_recipe(recipe_file(), ['train.micro_batch="auto"'])
    shape = ModelShape.from_config(json.loads((TINY_MODEL / "config.json").read_text()))
    return make_plan(rec, Cluster(cuda_devices=2, gpu_memory_bytes=24 * 2**30), model=shape)


def test_plan_json_round_trips_into_the_typed_plan(tmp_path, planned):
    assert planned.memory and planned.env  # the round trip covers the nested parts too
    written = RunPlan(planned, resume_from=tmp_path / "ckpt", data_cache=tmp_path / "cache")
    (tmp_path / PLAN_FILE).write_text(written.to_json())
    assert RunDir(tmp_path).load_plan() == written


def test_plan_json_without_the_run_extras_or_optional_keys_still_loads(tmp_path, planned):
    """`qlaunch config` writes no resume_from/data_cache; an older run's plan.json lacks newer fields."""
    data = planned.to_dict()
    del data["collective_timeout_s"], data["hybrid_shard"]
    (tmp_path / PLAN_FILE).write_text(json.dumps(data))
    loaded = RunDir(tmp_path).load_plan()
    assert (loaded.resume_from, loaded.data_cache) == (None, None)
    assert loaded.plan.collective_timeout_s == planned.collective_timeout_s and loaded.plan.hybrid_shard is False


@pytest.mark.parametrize(
    "change, said",
    [
        ({"nproc": 2}, "unknown key(s) 'nproc'"),
        ({"world_size": "2"}, "'world_size' must be an integer, not a string"),
        ({"micro_batch": True}, "'micro_batch' must be an integer, not a boolean"),
        ({"env": {"A": 1}}, "'env' must be an object of strings, not an object"),
        ({"memory": []}, "'memory' must be an object or null, not an array"),
        ({"resume_from": 3}, "'resume_from' must be a string or null, not a number"),
    ],
)
def test_bad_plan_json_is_one_line_naming_it(tmp_path, planned, change, said):
    path = tmp_path / PLAN_FILE
    path.write_text(json.dumps({**planned.to_dict(), **change}))
    with pytest.raises(UserError) as err:
        RunDir(tmp_path).load_plan()
    assert str(err.value) == f"{path}: {said}"


def test_plan_json_missing_a_required_key_is_refused(tmp_path, planned):
    data = planned.to_dict()
    del data["backend"]
    (tmp_path / PLAN_FILE).write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"plan.json: missing key\(s\) 'backend'"):
        RunDir(tmp_path).load_plan()


def test_rank_files_are_named_by_the_run_dir(tmp_path):
    run = RunDir(Path(tmp_path), node="node1")
    run.create_folders()
    for rank in (3, 2):
        run.rank_log(rank).write_text("")
        run.rank_error_file(rank).write_text("{}")
    (run.logs / "rank-x.log").write_text("")  # not a rank's log
    assert sorted(run.rank_logs()) == [2, 3]
    assert [f.name for f in run.rank_error_files()] == ["rank2.error.json", "rank3.error.json"]
    assert len(RunDir(tmp_path).rank_error_files(every_node=True)) == 2
