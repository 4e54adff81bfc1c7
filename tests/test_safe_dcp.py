"""Checkpoint metadata from an untrusted directory cannot run code when qlaunch resumes from it."""

from __future__ import annotations

import copy
import io
import os
import pickle
import shlex
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launcher.errors import UserError
from launcher.rank import safe_dcp


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


def test_real_lora_and_adamw_checkpoint_reads_back_exactly(tmp_path):
    """What TorchEngine.checkpoint_state saves (trainable weights, AdamW moments, step counters and the
    param_groups lists/floats/bools) goes through the checked reader unchanged and loads bit for bit."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    def model_and_optimizer(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 8))
        model[0].weight.requires_grad_(False)  # a frozen base weight beside trainable ones
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.99))
        return model, opt

    opts = StateDictOptions(ignore_frozen_params=True)
    model, opt = model_and_optimizer(0)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    m_sd, o_sd = get_state_dict(model, opt, options=opts)
    dcp.save({"model": m_sd, "optim": o_sd}, checkpoint_id=str(tmp_path / "ck"))

    checked, stock = safe_dcp.read_metadata(tmp_path / "ck"), pickle.loads((tmp_path / "ck" / ".metadata").read_bytes())
    assert checked.state_dict_metadata == stock.state_dict_metadata and checked.storage_data == stock.storage_data
    assert checked.planner_data == stock.planner_data and checked.version == stock.version

    model2, opt2 = model_and_optimizer(1)
    m2, o2 = get_state_dict(model2, opt2, options=opts)
    state = {"model": m2, "optim": o2}
    safe_dcp.load(state, str(tmp_path / "ck"))
    load_opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"], options=load_opts)
    trained, loaded = model.state_dict(), model2.state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in m_sd)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k, v in s1["state"].items():
        assert all(torch.equal(v[n], s2["state"][k][n]) for n in ("step", "exp_avg", "exp_avg_sq"))


# ---------------------------------------------------------------- crafted `.metadata` files, by opcode
# Each shape carries a payload that creates FLAG (os.system("touch FLAG")) when it is unpickled freely.
# The checked reader must refuse it with one line, and the flag must never appear.

DCP = "torch.distributed.checkpoint"


def _u(text: str) -> bytes:  # SHORT_BINUNICODE
    b = text.encode()
    assert len(b) < 256
    return b"\x8c" + bytes([len(b)]) + b


def _sg(module: str, name: str) -> bytes:  # STACK_GLOBAL
    return _u(module) + _u(name) + b"\x93"


def _touch(flag: Path) -> str:
    return f"touch {shlex.quote(str(flag))}"


def _system(flag: Path, via: tuple[str, str] = ("os", "system")) -> bytes:
    """Pushes the result of os.system('touch FLAG'), which runs when the stream is unpickled freely."""
    return _sg(*via) + _u(_touch(flag)) + b"\x85R"  # TUPLE1 REDUCE


def _p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


class _Payload:
    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (_touch(self.flag),))


def _real_checkpoint(d: Path):
    """A real DCP directory (a tensor and non-tensor entries) and its Metadata object."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "extra": {"step": 7, "lrs": [0.1, 0.2], "none": None}}
    dcp.save(state, checkpoint_id=str(d))
    return pickle.loads((d / ".metadata").read_bytes())


def _shapes(flag: Path, tmp_path: Path) -> dict[str, bytes]:
    meta = _real_checkpoint(tmp_path / "real")
    nested = copy.deepcopy(meta)
    nested.planner_data = {**meta.planner_data, "x": ("a", [{"b": ({"c": [_Payload(flag)]},)}])}
    in_entry = copy.deepcopy(meta)
    next(iter(in_entry.storage_data.values())).relative_path = _Payload(flag)
    in_props = copy.deepcopy(meta)
    next(v for v in in_props.state_dict_metadata.values() if hasattr(v, "properties")).size = _Payload(flag)
    evil_dir = tmp_path / "evil"  # for a DCP function that reads a checkpoint with the stock reader
    _real_checkpoint(evil_dir)
    (evil_dir / ".metadata").write_bytes(pickle.dumps(_Payload(flag)))
    record = _sg(f"{DCP}.metadata", "MetadataIndex")
    return {
        "global_proto0": f"cos\nsystem\n(V{_touch(flag)}\ntR.".encode(),  # GLOBAL MARK UNICODE TUPLE REDUCE
        "global_proto2": pickle.dumps(_Payload(flag), protocol=2),
        # protocol 4: dotted names, resolved attribute by attribute through modules the old prefix rule allowed
        "dotted_via_dcp_filesystem": _p4(_system(flag, (f"{DCP}.filesystem", "os.system"))),
        "dotted_via_dcp_metadata": _p4(_system(flag, (f"{DCP}.metadata", "os.system"))),
        "dotted_via_torch": _p4(_system(flag, ("torch", "serialization.os.system"))),
        "dotted_via_torch_in_dcp": _p4(_system(flag, (f"{DCP}.metadata", "torch.serialization.os.system"))),
        # a module function under torch.distributed.checkpoint (no dot in its name) that reads a checkpoint
        # with DCP's stock, unrestricted reader
        "dcp_function": _p4(
            _sg(f"{DCP}.format_utils", "dcp_to_torch_save") + _u(str(evil_dir)) + _u(str(flag) + ".pt") + b"\x86R"
        ),
        # allowed classes and value types called with hostile arguments
        "size_of_payload": _p4(_sg("torch", "Size") + b"]" + _system(flag) + b"a\x85R"),
        "layout_of_payload": _p4(_sg("torch.serialization", "_get_layout") + _system(flag) + b"\x85R"),
        "record_reduced_with_args": _p4(record + _u("fqn") + _system(flag) + b"\x86R"),
        # nested: the payload deep inside dicts, lists and tuples of an otherwise real metadata file
        "nested_in_planner_data": pickle.dumps(nested, protocol=4),
        "nested_in_storage_entry": pickle.dumps(in_entry, protocol=4),
        "nested_in_tensor_size": pickle.dumps(in_props, protocol=4),
        # BUILD with hostile state: a fresh record whose state dict holds the payload
        "build_state_payload": _p4(record + b")\x81}" + _u("fqn") + _system(flag) + b"sb"),
        # INST / OBJ (protocol 0/1), NEWOBJ / NEWOBJ_EX with payload arguments
        "inst": f"(V{_touch(flag)}\nios\nsystem\n.".encode(),
        "obj": f"(cos\nsystem\nV{_touch(flag)}\no.".encode(),
        "inst_of_record_with_payload": f"(cos\nsystem\n(V{_touch(flag)}\ntRi{DCP}.metadata\nMetadata\n.".encode(),
        "newobj_record_args": _p4(record + _system(flag) + b"\x85\x81"),
        "newobj_ex_record_kwargs": _p4(record + b")}" + _u("fqn") + _system(flag) + b"s\x92"),
    }


SHAPES = [
    "global_proto0", "global_proto2", "dotted_via_dcp_filesystem", "dotted_via_dcp_metadata", "dotted_via_torch",
    "dotted_via_torch_in_dcp", "dcp_function", "size_of_payload", "layout_of_payload", "record_reduced_with_args",
    "nested_in_planner_data", "nested_in_storage_entry", "nested_in_tensor_size", "build_state_payload", "inst",
    "obj", "inst_of_record_with_payload", "newobj_record_args", "newobj_ex_record_kwargs",
]  # fmt: skip


def _refused(ck: Path, target: dict) -> str:
    with pytest.raises(UserError) as info:
        safe_dcp.read_metadata(ck)
    msg = str(info.value)
    assert "refusing to unpickle" in msg and "\n" not in msg, msg
    with pytest.raises(UserError):  # the ranks' path: plain UserError, not DCP's CheckpointException
        safe_dcp.load(target, str(ck))
    return msg


@pytest.mark.parametrize("shape", SHAPES)
def test_crafted_metadata_never_runs_and_is_refused_in_one_line(tmp_path, monkeypatch, shape):
    monkeypatch.chdir(tmp_path)
    flag = tmp_path / "FLAG"
    data = _shapes(flag, tmp_path)[shape]
    # The payload is live: unpickled freely, it runs (that is what the checked reader is for).
    try:
        pickle.loads(data)
    except BaseException:  # noqa: BLE001, S110 - whatever happens after the payload ran (DCP's is a BaseException)
        pass
    assert flag.exists(), shape
    flag.unlink(missing_ok=True)
    ck = tmp_path / "ck"
    _real_checkpoint(ck)
    (ck / ".metadata").write_bytes(data)
    target = {"w": torch.zeros(2, 3), "extra": {"step": 0, "lrs": [0.0, 0.0], "none": None}}
    _refused(ck, target)
    assert not flag.exists() and not flag.with_suffix(".pt").exists()
    assert torch.equal(target["w"], torch.zeros(2, 3))


def test_build_cannot_change_a_global_object(tmp_path):
    """BUILD on something the pickle looked up (a function's attributes, a dtype, DCP's memory-format enum,
    a metadata class itself) would change it for the whole process: every such BUILD is refused."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, MetadataIndex

    layout_cache = dict(torch.serialization._get_layout.cache)
    mem = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    poison = b"}" + _u("cache") + b"}" + _u("torch.strided") + _u("poisoned") + b"ss"
    shapes = {
        "function_dict": _sg("torch.serialization", "_get_layout") + poison + b"b",
        "function_slots": _sg("torch.serialization", "_get_layout") + b"N" + poison + b"\x86b",
        "dtype": _sg("torch", "float32") + b"N}" + _u("is_signed") + b"\x88s\x86b",
        "enum_member": _sg(f"{DCP}.metadata", "_MEM_FORMAT_ENCODING") + b"K\x00\x85R}" + _u("_value_") + b"K\x02sb",
        "class_itself": _sg(f"{DCP}.metadata", "MetadataIndex") + b"N}" + _u("__hash__") + b"Nsb\x86b",
        "built_twice": _sg(f"{DCP}.metadata", "MetadataIndex") + b")\x81}" + _u("fqn") + _u("a") + b"sb}b",
        "fresh_size": _sg("torch", "Size") + b"]K\x01a\x85R}" + _u("x") + b"K\x01sb",
    }
    ck = tmp_path / "ck"
    _real_checkpoint(ck)
    for name, body in shapes.items():
        (ck / ".metadata").write_bytes(_p4(body))
        with pytest.raises(UserError, match="refusing to unpickle"):
            safe_dcp.read_metadata(ck)
        assert torch.serialization._get_layout.cache == layout_cache, name
        assert mem.value == 0 and MetadataIndex.__hash__ is not None, name
        assert not hasattr(torch.float32, "is_signed") or torch.float32.is_signed is True, name


def _sealed(meta, ck: Path) -> None:
    (ck / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))


def test_metadata_that_is_well_formed_pickle_but_not_what_dcp_writes_is_refused(tmp_path):
    """Real DCP classes only, but values that would send a rank elsewhere or make DCP misbehave: a storage
    entry outside the checkpoint directory (relative, absolute, through a link), past the end of its file,
    a stream transform, wrong types, a chunk outside its tensor. Refused in one line that echoes none of it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    outside = tmp_path / "secret.distcp"
    outside.write_bytes(b"SECRET" * 1000)
    ck = tmp_path / "ck"
    real = _real_checkpoint(ck)
    (ck / "link.distcp").symlink_to(outside)

    def entry(m):
        return next(v for k, v in m.storage_data.items() if k.fqn == "w")

    def tensor(m):
        return m.state_dict_metadata["w"]

    edits = {
        "parent": lambda m: setattr(entry(m), "relative_path", "../secret.distcp"),
        "absolute": lambda m: setattr(entry(m), "relative_path", str(outside)),
        "subdir": lambda m: setattr(entry(m), "relative_path", "sub/../../secret.distcp"),
        "dotdot": lambda m: setattr(entry(m), "relative_path", ".."),
        "hidden": lambda m: setattr(entry(m), "relative_path", ".metadata"),
        "symlink": lambda m: setattr(entry(m), "relative_path", "link.distcp"),
        "missing": lambda m: setattr(entry(m), "relative_path", "__7_0.distcp"),
        "past_end": lambda m: setattr(entry(m), "length", 10**9),
        "negative": lambda m: setattr(entry(m), "offset", -1),
        "transform": lambda m: setattr(entry(m), "transform_descriptors", ["zstd/1"]),
        "dtype_string": lambda m: setattr(tensor(m).properties, "dtype", "os.system"),
        "size_list": lambda m: setattr(tensor(m), "size", [2, 3]),
        "chunk_outside": lambda m: setattr(tensor(m).chunks[0], "sizes", torch.Size([3, 3])),
        "chunk_rank": lambda m: setattr(tensor(m).chunks[0], "offsets", torch.Size([0])),
        "entry_type": lambda m: m.state_dict_metadata.__setitem__("w", {"dtype": "float32"}),
        "bytes_with_state": lambda m: setattr(m.state_dict_metadata.__setitem__("x", BytesStorageMetadata())
                                              or m.state_dict_metadata["x"], "smuggled", "x"),
        "planner_data": lambda m: setattr(m, "planner_data", {"w": ["w", torch.float32]}),
        "storage_none": lambda m: setattr(m, "storage_data", None),
        "extra_field": lambda m: setattr(m, "__class_getitem__", "x"),
        "sdm_keys": lambda m: m.state_dict_metadata.__setitem__(7, m.state_dict_metadata["w"]),
    }  # fmt: skip
    for name, edit in edits.items():
        meta = copy.deepcopy(real)
        edit(meta)
        _sealed(meta, ck)
        target = {"w": torch.zeros(2, 3), "extra": {"step": 0, "lrs": [0.0, 0.0], "none": None}}
        msg = _refused(ck, target)
        assert "SECRET" not in msg and "secret" not in msg and "os.system" not in msg, (name, msg)
        assert torch.equal(target["w"], torch.zeros(2, 3)), name
    _sealed(real, ck)  # the unedited metadata still loads
    target = {"w": torch.zeros(2, 3), "extra": {"step": 0, "lrs": [0.0, 0.0], "none": None}}
    safe_dcp.load(target, str(ck))
    assert torch.equal(target["w"], torch.arange(6.0).reshape(2, 3))


def test_metadata_that_is_not_a_pickle_or_not_a_file_is_refused_without_echoing_it(tmp_path):
    ck = tmp_path / "ck"
    _real_checkpoint(ck)
    for data in (b"", b"SECRET-TOKEN\n", b"\x80\x04\x95", b"\x80\x04K\x01.", b"(" * 100_000 + b"."):
        (ck / ".metadata").write_bytes(data)
        msg = _refused(ck, {"w": torch.zeros(2, 3)})
        assert "SECRET" not in msg, msg
    (ck / ".metadata").unlink()
    os.mkfifo(ck / ".metadata")  # must not hang waiting for a writer
    with pytest.raises(UserError, match="not a regular file"):
        safe_dcp.read_metadata(ck)
    (ck / ".metadata").unlink()
    (ck / ".metadata").symlink_to(ck / "__0_0.distcp")
    with pytest.raises(UserError, match="not a regular file"):
        safe_dcp.read_metadata(ck)


def _entry_that_runs_code(ck: Path, flag: Path) -> None:
    """Point the non-tensor entry extra.step at a torch.save'd object whose unpickling runs the payload
    (appended to the shard file; the metadata is otherwise DCP's own)."""
    meta = pickle.loads((ck / ".metadata").read_bytes())
    shard = ck / "__0_0.distcp"
    buf = io.BytesIO()
    torch.save(_Payload(flag), buf)
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + buf.getvalue())
    info = next(v for k, v in meta.storage_data.items() if k.fqn == "extra.step")
    info.offset, info.length = offset, len(buf.getvalue())
    _sealed(meta, ck)


def test_a_non_tensor_entry_that_runs_code_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flag = tmp_path / "FLAG"
    ck = tmp_path / "ck"
    _real_checkpoint(ck)
    _entry_that_runs_code(ck, flag)
    target = {"w": torch.zeros(2, 3), "extra": {"step": 0, "lrs": [0.0, 0.0], "none": None}}
    with pytest.raises(UserError, match="not plain data") as info:  # unwrapped from DCP's CheckpointException
        safe_dcp.load(target, str(ck))
    assert "\n" not in str(info.value) and not flag.exists()
    dcp.load(target, checkpoint_id=str(ck))  # the stock loader runs it (and stores os.system's exit status)
    assert flag.exists()


def _two_rank_load(rank: int, port: int, ck: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        safe_dcp.load({"w": torch.zeros(2, 3), "extra": {"step": 0, "lrs": [0.0, 0.0], "none": None}}, ck)
        result = "loaded"
    except UserError as err:
        result = f"UserError: {err}"
    except BaseException as err:  # noqa: BLE001 - what a rank would crash with
        result = f"{type(err).__name__}"
    Path(out, f"rank{rank}").write_text(result)
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_of_a_group_gets_the_one_line_user_error(tmp_path):
    """With a process group DCP gathers each rank's failure into a CheckpointException on every rank;
    each rank must still end with the plain UserError its worker reports as one line."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    flag = tmp_path / "FLAG"
    ck = tmp_path / "ck"
    _real_checkpoint(ck)
    _entry_that_runs_code(ck, flag)
    mp.spawn(_two_rank_load, args=(free_port(), str(ck), str(tmp_path)), nprocs=2, join=True)
    results = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert all(r.startswith("UserError: ") and "not plain data" in r and "\n" not in r for r in results), results
    assert not flag.exists()


def test_a_few_bytes_cannot_make_the_reader_allocate_gigabytes(tmp_path):
    """A PUT opcode names its memo slot: the C unpickler sizes its memo table by the largest index (8 bytes
    a slot), and a length field asks the file for that many bytes. Neither may cost more than the file."""
    import tracemalloc

    ck = tmp_path / "ck"
    _real_checkpoint(ck)
    huge = (100_000_000).to_bytes(4, "little")
    shapes = [
        b"\x80\x04N\x72" + huge + b".",  # LONG_BINPUT 100M: an 800 MB table in the C unpickler
        b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"x.",  # BINBYTES8 of a terabyte
        b"\x80\x04\x95" + (2**40).to_bytes(8, "little") + b"N.",  # FRAME of a terabyte
    ]
    for data in shapes:
        (ck / ".metadata").write_bytes(data)
        tracemalloc.start()
        try:
            with pytest.raises(UserError, match="refusing to unpickle"):
                safe_dcp.read_metadata(ck)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20 * 2**20, (data, peak)
