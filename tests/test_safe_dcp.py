"""Checkpoint metadata from an untrusted directory cannot run code when qlaunch resumes from it."""

from __future__ import annotations

import os
import pickle
import traceback

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launcher import safe_dcp


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_real_checkpoint_round_trips(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "extra": {"step": 7, "lrs": [0.1, 0.2]}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    target = {"w": torch.zeros(2, 3), "extra": {"step": 0, "lrs": [0.0, 0.0]}}
    safe_dcp.load(target, str(tmp_path / "ck"))
    assert torch.equal(target["w"], state["w"]) and target["extra"] == {"step": 7, "lrs": [0.1, 0.2]}


def test_crafted_metadata_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": torch.ones(2)}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(BaseException) as info:  # DCP wraps our UserError in its CheckpointException
        safe_dcp.load({"w": torch.zeros(2)}, str(tmp_path / "ck"))
    assert "refusing to unpickle" in "".join(traceback.format_exception(info.value))
    assert not (tmp_path / "PWNED").exists()
    # The stock reader would have run it: that is what this module exists for.
    with pytest.raises(BaseException):  # noqa: B017 - whatever DCP raises after the payload ran
        dcp.load({"w": torch.zeros(2)}, checkpoint_id=str(tmp_path / "ck"))
    assert (tmp_path / "PWNED").exists()
