"""Untrusted model directories: safetensors headers, the index, config.json and qlaunch_quant.json.

Every crafted file is real bytes (a valid file from safetensors.torch.save_file with its header rewritten).
The safetensors library is the authority: every file the validator refuses, the library refuses too, and
files it accepts (however odd) are accepted. Through the CLI, each gives one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from launcher.errors import UserError
from launcher.plan.recipe_file import load_recipe
from launcher.rank.model.sources import HeaderError, SafetensorsSource, header_length, parse_header, read_quant_meta
from tests.conftest import BASE_RECIPE, ROOT, TINY_MODEL, assert_one_line_error, run_cli

# ------------------------------------------------------------------ crafting


def _valid_file(path: Path) -> Path:
    save_file(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.bfloat16),
            "c": torch.arange(5, dtype=torch.uint8),
        },
        str(path),
        metadata={"format": "pt"},
    )
    return path


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict | bytes, data: bytes, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if n is None else n).to_bytes(8, "little") + raw + data


def _last(h: dict) -> str:
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])


def _first(h: dict) -> str:
    return min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])


def _with(h: dict, name: str, **entry) -> dict:
    return {**h, name: {**h[name], **entry}}


def _shift_last(h: dict, data: bytes) -> bytes:
    last = _last(h)
    b, e = h[last]["data_offsets"]
    k = len(data) - (e - b)
    return _join(_with(h, last, data_offsets=[b + 4, e + 4]), data[:k] + b"\0" * 4 + data[k:])


def _overlap(h: dict, data: bytes) -> bytes:
    last = _last(h)
    b, e = h[last]["data_offsets"]
    return _join(_with(h, last, data_offsets=[b - 1, e - 1]), data[:-1])


# name -> (the rule's words in the message, crafted bytes from (header, data) of a valid file)
CRAFTED = {
    "negative offset": ("0 <= begin <= end", lambda h, d: _join(_with(h, "a", data_offsets=[-24, 0]), d)),
    "begin after end": ("0 <= begin <= end", lambda h, d: _join(_with(h, "a", data_offsets=[24, 0]), d)),
    "three offsets": ("0 <= begin <= end", lambda h, d: _join(_with(h, "a", data_offsets=[0, 24, 30]), d)),
    "overlap": ("overlap", _overlap),
    "gap": ("gap", _shift_last),
    "span too short for the shape": ("different number of bytes", lambda h, d: _join(_with(h, "a", shape=[2, 4]), d)),
    "dtype disagrees with the bytes": ("different number of bytes", lambda h, d: _join(_with(h, "a", dtype="F16"), d)),
    "past the end": ("past the end", lambda h, d: _join(h, d[:-3])),
    "trailing bytes": ("after the last tensor", lambda h, d: _join(h, d + b"\0" * 4)),
    "header not an object": ("not a JSON object", lambda h, d: _join(b"[1, 2, 3]", d)),
    "header a string": ("not a JSON object", lambda h, d: _join(b'"abc"', d)),
    "entry not an object": ("entry is not an object", lambda h, d: _join({**h, "a": [1, 2, 3]}, d)),
    "entry without shape": (
        "has no 'shape'",
        lambda h, d: _join({**h, "a": {k: v for k, v in h["a"].items() if k != "shape"}}, d),
    ),
    "unknown dtype": ("unknown dtype", lambda h, d: _join(_with(h, "b", dtype="BF17"), d)),
    "dtype not a string": ("unknown dtype", lambda h, d: _join(_with(h, "b", dtype=16), d)),
    "float in shape": ("non-negative integers", lambda h, d: _join(_with(h, "a", shape=[2.0, 3.0]), d)),
    "bool in shape": ("non-negative integers", lambda h, d: _join(_with(h, "a", shape=[True, 6]), d)),
    "negative dimension": ("non-negative integers", lambda h, d: _join(_with(h, "a", shape=[-2, -3]), d)),
    "NaN in shape": ("NaN", lambda h, d: _join(json.dumps(_with(h, "a", shape=[float("nan")])).encode(), d)),
    "metadata not strings": ("__metadata__", lambda h, d: _join({**h, "__metadata__": {"format": 1}}, d)),
    "header not JSON": ("not valid JSON", lambda h, d: _join(b'{"a": {"dtype": ', d)),
    "header not UTF-8": ("not UTF-8", lambda h, d: _join(b'{"\xff\xfe": {}}', d)),
    "header size beyond the file": ("past the end of the file", lambda h, d: _join(h, d, n=10_000)),
    "header size above the cap": ("100 MB", lambda h, d: _join(h, d, n=200_000_000)),
    "header size all ones": ("100 MB", lambda h, d: _join(h, d, n=(1 << 64) - 1)),
    "deeply nested header": ("nested too deeply", lambda h, d: _join(b"[" * 100_000 + b"]" * 100_000, d)),
    "empty header": ("not valid JSON", lambda h, d: _join(b"", d)),
    "shorter than 8 bytes": ("shorter than the 8-byte header size", lambda h, d: b"\x05\x00\x00"),
}

# Odd but valid: the library accepts them, so must qlaunch.
ODD_VALID = {
    "no tensors": lambda h, d: _join(b"{}", b""),
    "padding spaces": lambda h, d: _join(json.dumps(h).encode() + b"       ", d),
    "extra key in an entry": lambda h, d: _join(_with(h, "a", note="x"), d),
    "no metadata": lambda h, d: _join({k: v for k, v in h.items() if k != "__metadata__"}, d),
    "zero-size tensor": lambda h, d: _join({**h, "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}, d),
    "scalar": lambda h, d: _join({"s": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}}, b"\0" * 8),
    "4-bit floats": lambda h, d: _join({"f": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}, b"\0" * 3),
}


def _parse(blob: bytes):
    n = header_length(blob[:8], len(blob))
    return parse_header(blob[8 : 8 + n], len(blob) - 8 - n)


def _library_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception:
        return True
    return False


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_refused_by_the_rule_and_by_the_library(tmp_path, case):
    rule, craft = CRAFTED[case]
    h, d = _split(_valid_file(tmp_path / "ok.safetensors").read_bytes())
    blob = craft(h, d)
    with pytest.raises(HeaderError) as err:
        _parse(blob)
    assert rule in str(err.value), (case, str(err.value))
    bad = tmp_path / "m" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(blob)
    assert _library_refuses(bad), f"{case}: the safetensors library accepts it, so it is not invalid"
    with pytest.raises(UserError) as err:
        SafetensorsSource(bad.parent)
    msg = str(err.value)
    assert f"{bad}: corrupt safetensors file" in msg and rule in msg and "\n" not in msg, msg
    n = int.from_bytes(blob[:8], "little")
    # (without the path: pytest's numbered tmp directory may hold the same digits)
    assert str(n) not in msg.replace(str(bad), "") or n < 100, f"the header size field's value leaked: {msg}"


@pytest.mark.parametrize("case", sorted(ODD_VALID))
def test_odd_but_valid_headers_accepted_like_the_library(tmp_path, case):
    h, d = _split(_valid_file(tmp_path / "ok.safetensors").read_bytes())
    f = tmp_path / "m" / "model.safetensors"
    f.parent.mkdir()
    f.write_bytes(ODD_VALID[case](h, d))
    assert not _library_refuses(f)
    src = SafetensorsSource(f.parent)
    with safe_open(str(f), framework="pt") as lib:
        assert sorted(src.where) == sorted(lib.keys())
        for name in lib.keys():
            assert src.shape(name) == tuple(lib.get_slice(name).get_shape())


def test_real_files_accepted_and_read_as_the_library_reads_them(tmp_path):
    """The shipped model, and a file of every readable dtype: same tensors, same values as load_file."""
    f = tmp_path / "m" / "model.safetensors"
    f.parent.mkdir()
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "f32": torch.randn(2, 2, 2),
        "u8": torch.arange(9, dtype=torch.uint8),
        "i64": torch.arange(3),
        "f8": torch.zeros(4, dtype=torch.float8_e4m3fn),
    }
    save_file(tensors, str(f))
    for directory in (TINY_MODEL, f.parent):
        src = SafetensorsSource(directory)
        for file in directory.glob("*.safetensors"):
            ref = load_file(str(file))
            assert sorted(n for n in src.where if src.where[n] == file) == sorted(ref)
            for name, t in ref.items():
                if t.dtype in (torch.bfloat16, torch.float16, torch.float32):
                    assert torch.equal(src.read_flat(name, 0, t.numel()), t.reshape(-1))
        src.close()


def test_reads_stay_inside_their_tensor(tmp_path):
    """A read past a tensor's last element would return its neighbour's bytes: refused."""
    src = SafetensorsSource(TINY_MODEL)
    name = "model.norm.weight"
    n = src.shape(name)[0]
    assert src.read_flat(name, 0, n).numel() == n
    with pytest.raises(UserError, match=rf"tensor {name} has {n} elements, elements \[0, {n + 1}\)"):
        src.read_flat(name, 0, n + 1)


# ------------------------------------------------------------------ files that are not files


def _model_copy(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(TINY_MODEL, d)
    return d


@pytest.mark.parametrize("kind", ["a directory", "a device"])
def test_directory_or_device_named_safetensors(tmp_path, kind):
    d = _model_copy(tmp_path)
    if kind == "a directory":
        (d / "extra.safetensors").mkdir()
    else:
        (d / "extra.safetensors").symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(UserError, match=rf"extra.safetensors: the safetensors file is {kind}; it must be a regular"):
        SafetensorsSource(d)


def test_the_library_has_the_last_word(tmp_path, monkeypatch):
    """A file qlaunch's own rules let through but the safetensors library refuses is refused, and none
    of the library's words (which quote header bytes) reach the message."""

    h, d = _split(_valid_file(tmp_path / "ok.safetensors").read_bytes())
    f = tmp_path / "m" / "model.safetensors"
    f.parent.mkdir()
    f.write_bytes(_join(_with(h, "b", dtype="SECRET_DTYPE"), d))
    monkeypatch.setattr("launcher.rank.model.sources.parse_header", lambda header, size: {})  # a validator with a hole
    with pytest.raises(UserError) as err:
        SafetensorsSource(f.parent)
    assert str(err.value) == f"{f}: corrupt safetensors file (the safetensors library refuses it)"


def test_fifo_named_safetensors_does_not_block(tmp_path):
    """Opened with O_NONBLOCK and refused by fstat: in a child process, so a regression cannot hang the suite."""
    d = _model_copy(tmp_path)
    os.mkfifo(d / "extra.safetensors")
    code = "import sys\nfrom launcher.rank.model.sources import SafetensorsSource\nSafetensorsSource(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(d)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "extra.safetensors: the safetensors file is a FIFO" in r.stderr, r.stderr


def test_symlink_to_another_file_leaks_none_of_its_bytes(tmp_path):
    """A *.safetensors symlink to a private file: refused, and the message quotes nothing of it (the first
    8 bytes used to appear as the 'header length' integer)."""
    d = _model_copy(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2 and more private text\n")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(secret)
    with pytest.raises(UserError) as err:
        SafetensorsSource(d)
    msg = str(err.value)
    assert "corrupt safetensors file" in msg
    leaked = str(int.from_bytes(secret.read_bytes()[:8], "little"))
    assert leaked not in msg and "password" not in msg and "hunter2" not in msg, msg
    # A small header size over a JSON-ish file: the JSON error is json's fixed wording and a position.
    secret.write_bytes((20).to_bytes(8, "little") + b'{"token": "s3cr3t-value-9"}')
    with pytest.raises(UserError) as err:
        SafetensorsSource(d)
    assert "s3cr3t" not in str(err.value) and "not valid JSON" in str(err.value), str(err.value)


# ------------------------------------------------------------------ the index


def _index(d: Path, weight_map) -> Path:
    p = d / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return p


@pytest.mark.parametrize(
    "fname",
    [
        "../model.safetensors",
        "/etc/passwd.safetensors",
        "sub/model.safetensors",
        "..",
        "config.json",
        "a\nb.safetensors",
    ],
)
def test_index_names_only_files_in_the_model_directory(tmp_path, fname):
    d = _model_copy(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # what '../' would reach
    _index(d, {"model.norm.weight": fname})
    with pytest.raises(UserError, match=r"weight_map\['model.norm.weight'\] must be the name of a \*.safetensors file"):
        SafetensorsSource(d)


@pytest.mark.parametrize(
    "index, rule",
    [
        ("[1, 2]", "must be a JSON object, not an array"),
        ('{"weight_map": {}}', "'weight_map' is empty"),
        ('{"weight_map": [1]}', "'weight_map' must be an object"),
        ('{"weight_map": {"x": 3}}', "'weight_map' must be an object"),
        ('{"metadata": {}}', "'weight_map' must be an object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_index(tmp_path, index, rule):
    d = _model_copy(tmp_path)
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UserError, match=rule):
        SafetensorsSource(d)


def test_index_maps_a_tensor_to_a_file_without_it(tmp_path):
    d = _model_copy(tmp_path)
    save_file({"other": torch.zeros(2)}, str(d / "model-00002-of-00002.safetensors"))
    _index(d, {"model.norm.weight": "model-00002-of-00002.safetensors"})
    with pytest.raises(UserError, match="maps tensor 'model.norm.weight' to model-00002-of-00002.safetensors, which"):
        SafetensorsSource(d)


def test_index_decides_which_files_are_read(tmp_path):
    """With an index, a stray *.safetensors beside the shards (e.g. a consolidated copy) is not read."""
    d = _model_copy(tmp_path)
    names = load_file(str(d / "model.safetensors"))
    _index(d, dict.fromkeys(names, "model.safetensors"))
    (d / "stray.safetensors").write_bytes(b"not a safetensors file at all")
    assert sorted(SafetensorsSource(d).where) == sorted(names)


def test_tensor_in_two_files(tmp_path):
    d = _model_copy(tmp_path)
    save_file({"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}, str(d / "second.safetensors"))
    with pytest.raises(
        UserError, match="tensor 'model.norm.weight' is in both model.safetensors and second.safetensors"
    ):
        SafetensorsSource(d)


# ------------------------------------------------------------------ qlaunch_quant.json


@pytest.mark.parametrize(
    "text, rule",
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"type": "nf4", "blocksize": 64}', "'format' must be 'qlaunch-4bit-v1'"),
        ('{"format": "qlaunch-4bit-v1", "type": "int3", "blocksize": 64}', "'type' must be 'nf4' or 'fp4'"),
        ('{"format": "qlaunch-4bit-v1", "type": "nf4", "blocksize": 63}', "'blocksize' must be 32, 64, 128 or 256"),
        (
            '{"format": "qlaunch-4bit-v1", "type": "nf4", "blocksize": 64, "quantized": ["w"], "shapes": {}}',
            "'shapes' must give the shape of every tensor",
        ),
        (
            '{"format": "qlaunch-4bit-v1", "type": "nf4", "blocksize": 64, "quantized": ["w"], "shapes": {"w": [-1]}}',
            "[rows, columns]",
        ),
    ],
)
def test_malformed_quant_record(tmp_path, text, rule):
    (tmp_path / "qlaunch_quant.json").write_text(text)
    with pytest.raises(UserError) as err:
        read_quant_meta(tmp_path)
    assert rule in str(err.value) and "qlaunch_quant.json" in str(err.value), str(err.value)


def test_quant_record_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "qlaunch_quant.json")
    with pytest.raises(UserError, match="qlaunch_quant.json: the qlaunch quantize record is a FIFO"):
        read_quant_meta(tmp_path)  # O_NONBLOCK: returns at once


@pytest.fixture(scope="module")
def prequant(tmp_path_factory) -> Path:
    from launcher.launch.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("pq") / "tiny-nf4"
    return quantize_checkpoint(str(TINY_MODEL), str(out), "nf4", 64, ["lm_head"])


def _recipe(tmp_path: Path, model: Path, *overrides: str):
    p = tmp_path / "recipe.toml"
    p.write_text(BASE_RECIPE.replace(str(TINY_MODEL), str(model)))
    return load_recipe(p, list(overrides))


def test_prequantized_packed_tensor_of_the_wrong_size(tmp_path, prequant):
    """A .qweight one element short used to be read past its end (into the next tensor's bytes)."""
    from launcher.launch import preflight

    d = tmp_path / "pq"
    shutil.copytree(prequant, d)
    f = d / "model.safetensors"
    sd = load_file(str(f))
    name = next(n for n in sd if n.endswith(".qweight"))
    preflight.check(_recipe(tmp_path, d))  # the checkpoint as written passes
    sd[name] = sd[name][:-1].clone()
    save_file(sd, str(f))
    with pytest.raises(UserError, match=rf"tensor '{name}' is U8 \[\d+\]; the config's .* needs U8 \[\d+\]"):
        preflight.check(_recipe(tmp_path, d))


def test_prequantized_layers_must_be_the_recipes(tmp_path, prequant):
    """quant.skip_modules other than quantize's --skip: the ranks would look for tensors that are not there."""
    from launcher.launch import preflight

    rec = _recipe(tmp_path, prequant, 'quant.skip_modules=["lm_head", "down_proj"]')
    with pytest.raises(UserError, match=r"keeps dense model.layers.0.mlp.down_proj.weight, which this `qlaunch quanti"):
        preflight.check(rec)
    rec = _recipe(tmp_path, prequant, "quant.skip_modules=[]")
    with pytest.raises(UserError, match=r"quantizes lm_head.weight, which this `qlaunch quantize` checkpoint keeps"):
        preflight.check(rec)


# ------------------------------------------------------------------ config.json


def _config(d: Path, **changes) -> dict:
    cfg = json.loads((TINY_MODEL / "config.json").read_text())
    return {**cfg, **changes}


CONFIGS = {
    "not JSON": (b'{"model_type": "llama",', "the model config is not valid JSON (Expecting"),
    "an array": (b"[1, 2]", "the model config must be a JSON object, not an array"),
    "not UTF-8": (
        b'{"model_type": "llama", "x": "\xff"}',
        "the model config is not UTF-8 text (invalid byte at offset",
    ),
    "deeply nested": (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply to parse"),
    "no model_type": ({"model_type": None}, "no model_type"),
    "unknown model_type": ({"model_type": "foo"}, "model_type foo is not an architecture transformers"),
    "model_type not a name": ({"model_type": "x\u001b[31m" * 50}, "model_type is not an architecture transformers"),
    "architectures a string": ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of class names"),
    "model_type of another family": ({"model_type": "gpt2"}, "model_type 'gpt2' does not match architectures"),
    "field of the wrong type": ({"hidden_size": "abc"}, "validation error for field 'hidden_size'"),
    "no layers": ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    "negative size": ({"hidden_size": -64}, "hidden_size must be a positive integer"),
    "kv heads that do not divide": ({"num_key_value_heads": 3}, "num_key_value_heads must be a positive integer"),
    "no kv heads": ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    "bad max positions": ({"max_position_embeddings": -5}, "max_position_embeddings must be a positive integer"),
    "100,000 layers": (
        {"num_hidden_layers": 100_000},
        "num_hidden_layers is larger than any real model's (at most 1,024)",
    ),
    "huge hidden size": ({"hidden_size": 1 << 21}, "hidden_size is larger than any real model's (at most 1,048,576)"),
    "huge intermediate size": ({"intermediate_size": 1 << 30}, "intermediate_size is larger than any real model's"),
    "huge vocabulary": ({"vocab_size": 1 << 25}, "vocab_size is larger than any real model's (at most 16,777,216)"),
    "huge head_dim": ({"head_dim": 1 << 17}, "head_dim is larger than any real model's"),
    "huge max positions": ({"max_position_embeddings": 1 << 40}, "max_position_embeddings is larger than any real"),
    "unknown activation": ({"hidden_act": "nope"}, "transformers cannot build LlamaForCausalLM from this config"),
    "unknown rope type": (
        {"rope_parameters": {"rope_type": "bogus", "rope_theta": 1.0}},
        "transformers cannot build LlamaForCausalLM",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_malformed_config_is_one_line_naming_it(tmp_path, case):
    from launcher.launch import preflight

    content, rule = CONFIGS[case]
    d = _model_copy(tmp_path)
    raw = content if isinstance(content, bytes) else json.dumps(_config(d, **content)).encode()
    (d / "config.json").write_bytes(raw)
    with pytest.raises(UserError) as err:
        preflight.check(_recipe(tmp_path, d))
    msg = str(err.value)
    assert msg.startswith(f"{d / 'config.json'}: ") and rule in msg and "\n" not in msg, msg
    for value in ("abc", "nope", "bogus", "\x1b"):
        assert value not in msg, f"a value of the file is quoted: {msg}"


def test_config_that_is_a_fifo(tmp_path):
    from launcher.launch import preflight

    d = _model_copy(tmp_path)
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    with pytest.raises(UserError, match="config.json: the model config is a FIFO; it must be a regular file"):
        preflight.check(_recipe(tmp_path, d))


def test_model_path_that_is_a_file(tmp_path):
    from launcher.launch import preflight

    f = tmp_path / "model.safetensors"
    shutil.copy(TINY_MODEL / "model.safetensors", f)
    with pytest.raises(UserError, match="model.path = .*: not a directory"):
        preflight.check(_recipe(tmp_path, f))


# ------------------------------------------------------------------ seq_len vs the model's positions


def test_seq_len_above_max_positions_warns_before_spawn(tmp_path, capsys):
    """Tiny's config allows 512 positions: 1024 warns on stderr (one line), 512 does not. Not an error."""
    from launcher.launch import preflight

    preflight.check(_recipe(tmp_path, TINY_MODEL, "data.seq_len=512"))
    assert capsys.readouterr().err == ""
    preflight.check(_recipe(tmp_path, TINY_MODEL, "data.seq_len=1024"))
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: data.seq_len = 1024 exceeds the model's max_position_embeddings = 512 (config.json); "
        "positions past it are untrained unless the model's rope scaling extends them"
    ]


def test_seq_len_warning_reads_the_text_config_of_a_multimodal_config():
    from transformers import AutoConfig

    from launcher.launch.preflight import seq_len_warning
    from launcher.plan.model_info import max_positions

    config = AutoConfig.for_model("llava", text_config={"model_type": "llama", "max_position_embeddings": 4096})
    assert max_positions(config) == 4096
    assert seq_len_warning(8192, 4096) and seq_len_warning(4096, 4096) is None and seq_len_warning(8192, None) is None


# ------------------------------------------------------------------ through the CLI: one line, exit 2


def _cli_error(tmp_path: Path, model: Path, expect: list[str]) -> str:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BASE_RECIPE.replace(str(TINY_MODEL), str(model)))
    r = run_cli("run", str(recipe), cwd=tmp_path, timeout=120)
    return assert_one_line_error(r, expect, tmp_path / "runs")


def test_cli_negative_offset(tmp_path):
    """The crafted file that used to train silently (loss 6.3e35): one line before any rank starts."""
    d = _model_copy(tmp_path)
    f = d / "model.safetensors"
    h, data = _split(f.read_bytes())
    first = _first(h)
    b, e = h[first]["data_offsets"]
    f.write_bytes(_join(_with(h, first, data_offsets=[b - 64, e - 64]), data))
    _cli_error(tmp_path, d, [f"{f}: corrupt safetensors file", "0 <= begin <= end"])


def test_cli_fifo_weights_and_config(tmp_path):
    d = _model_copy(tmp_path)
    os.mkfifo(d / "extra.safetensors")
    _cli_error(tmp_path, d, ["extra.safetensors: the safetensors file is a FIFO"])
    (d / "extra.safetensors").unlink()
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    _cli_error(tmp_path, d, ["config.json: the model config is a FIFO"])


def test_cli_symlink_to_a_private_file(tmp_path):
    d = _model_copy(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(secret)
    msg = _cli_error(tmp_path, d, ["model.safetensors: corrupt safetensors file"])
    assert "hunter2" not in msg and str(int.from_bytes(b"password", "little")) not in msg


def test_cli_index_pointing_outside(tmp_path):
    d = _model_copy(tmp_path)
    _index(d, {"model.norm.weight": "../model.safetensors"})
    _cli_error(tmp_path, d, ["model.safetensors.index.json: weight_map['model.norm.weight'] must be the name"])


def test_cli_malformed_configs(tmp_path):
    d = _model_copy(tmp_path)
    (d / "config.json").write_text('{"model_type": ')
    _cli_error(tmp_path, d, [f"{d / 'config.json'}: the model config is not valid JSON"])
    (d / "config.json").write_text(json.dumps(_config(d, model_type="foo")))
    _cli_error(tmp_path, d, ["model_type foo is not an architecture transformers", "llama, mistral, qwen2, qwen3"])
    # transformers logs a warning quoting the rope type before the build fails: not a second line
    (d / "config.json").write_text(json.dumps(_config(d, rope_parameters={"rope_type": "bogus", "rope_theta": 1.0})))
    msg = _cli_error(tmp_path, d, ["config.json: transformers cannot build LlamaForCausalLM from this config"])
    assert "bogus" not in msg


def test_cli_malformed_quant_record(tmp_path, prequant):
    d = tmp_path / "pq"
    shutil.copytree(prequant, d)
    (d / "qlaunch_quant.json").write_text("{")
    _cli_error(tmp_path, d, ["qlaunch_quant.json: the qlaunch quantize record is not valid JSON"])


def test_cli_quantize_refuses_a_bad_header_and_writes_nothing(tmp_path):
    d = _model_copy(tmp_path)
    f = d / "model.safetensors"
    h, data = _split(f.read_bytes())
    f.write_bytes(_join(h, data + b"\0" * 8))  # trailing bytes
    out = tmp_path / "out"
    r = run_cli("quantize", str(d), "-o", str(out), cwd=tmp_path, timeout=120)
    assert_one_line_error(r, [f"{f}: corrupt safetensors file", "after the last tensor"], tmp_path / "runs")
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    (d / "config.json").unlink()
    r = run_cli("quantize", str(d), "-o", str(out), cwd=tmp_path, timeout=120)
    assert_one_line_error(r, ["not a model directory (no config.json)"], tmp_path / "runs")


def test_a_relative_hub_id_is_never_looked_up_in_the_current_directory(tmp_path, monkeypatch):
    """The recipe makes local paths absolute; what stays relative is a hub id, and a planted ./org/name
    folder where qlaunch runs must not stand in for the hub's model (or tokenizer)."""
    from launcher.data.tokenizer import build_tokenizer
    from launcher.plan.model_info import resolve_model_dir

    planted = tmp_path / "someorg" / "somemodel"
    shutil.copytree(TINY_MODEL, planted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: the lookup must fail, not find the folder
    rec_path = tmp_path / "elsewhere" / "r.toml"
    rec_path.parent.mkdir()
    rec_path.write_text(BASE_RECIPE.replace(str(TINY_MODEL), "someorg/somemodel"))
    rec = load_recipe(rec_path)
    assert rec.model.path == "someorg/somemodel"
    with pytest.raises(UserError, match="could not fetch from the hub"):
        resolve_model_dir(rec)
    rec = rec.model_copy(update={"model": rec.model.model_copy(update={"tokenizer": "./someorg/somemodel"})})
    with pytest.raises(UserError, match=r"model.tokenizer = './someorg/somemodel': no such directory"):
        build_tokenizer(rec, TINY_MODEL)


# The sizes of real models (from their config.json), which the upper bounds must leave alone.
REAL_CONFIG_SIZES = {
    "Llama-3.1-405B": dict(
        vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
        num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=131072,
    ),
    "gemma-3-27b (text)": dict(
        vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, max_position_embeddings=131072,
    ),
    "Llama-4-Scout (text)": dict(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=10485760,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REAL_CONFIG_SIZES))
def test_real_model_sizes_pass_the_size_check(name):
    from launcher.plan.model_info import config_size_problem

    assert config_size_problem(REAL_CONFIG_SIZES[name]) is None


@pytest.mark.parametrize(
    "key,value",
    [("num_hidden_layers", 100_000), ("num_hidden_layers", 1025), ("hidden_size", 1 << 21), ("vocab_size", 1 << 25),
     ("intermediate_size", 1 << 30), ("num_attention_heads", 8192), ("max_position_embeddings", 1 << 40)],
)  # fmt: skip
def test_sizes_no_real_model_has_are_refused_naming_the_key(key, value):
    """A config.json with 100,000 layers used to hang preflight while it built the meta skeleton."""
    from launcher.plan.model_info import config_size_problem

    sizes = {**REAL_CONFIG_SIZES["Llama-3.1-405B"], key: value}
    problem = config_size_problem(sizes)
    assert problem is not None and problem.startswith(f"{key} is larger than any real model's"), problem
    assert str(value) not in problem


# ---------------------------------------------------------------- quantize: what it reads and copies


def _quantize(src: Path, out: Path, quant_type: str = "nf4", blocksize: int = 64) -> tuple[Path, list[str]]:
    from launcher.launch.quantize import quantize_checkpoint

    warnings: list[str] = []
    return quantize_checkpoint(str(src), str(out), quant_type, blocksize, ["lm_head"], warn=warnings.append), warnings


def test_quantize_copies_only_model_files_inside_the_model_directory(tmp_path):
    """`notes.txt -> ../id_secret` was copied into OUT (shutil.copy2 follows links): a private file in a
    checkpoint the user may share. Links inside the directory are fine; the rest is left out, with a warning."""
    d = _model_copy(tmp_path)
    (tmp_path / "id_secret").write_text("PRIVATE KEY")
    (d / "notes.txt").symlink_to("../id_secret")
    (d / "README.md").write_text("# tiny\n")
    (d / "chat_template.jinja").symlink_to("tokenizer_config.json")  # a link inside: copied as a file
    (d / "id_rsa").write_text("PRIVATE KEY")  # no kind of file a model directory holds
    (d / "old.json").symlink_to("gone.json")  # dangling
    os.mkfifo(d / "pipe.txt")  # copying it would block forever
    (d / "original").mkdir()  # e.g. a hub snapshot's original/ weights: not part of the checkpoint
    (d / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    out, warnings = _quantize(d, tmp_path / "out")
    copied = sorted(p.name for p in out.iterdir())
    assert copied == sorted([*(p.name for p in TINY_MODEL.iterdir() if p.suffix != ".safetensors"),
                             "README.md", "chat_template.jinja", "model.safetensors", "qlaunch_quant.json"])  # fmt: skip
    assert not (out / "chat_template.jinja").is_symlink()
    assert (out / "chat_template.jinja").read_bytes() == (d / "tokenizer_config.json").read_bytes()
    assert warnings == [
        f"warning: not copied into {out}: 'id_rsa' (not a kind of file a model directory holds), 'notes.txt' (a "
        "link to a file outside the model directory), 'old.json' (a dangling link), 'pipe.txt' (not a regular file)"
    ]
    assert not any(b"PRIVATE" in p.read_bytes() for p in out.iterdir())


def test_quantize_follows_a_hub_snapshots_links_into_its_blobs(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in TINY_MODEL.iterdir():  # as huggingface_hub lays a snapshot out: links to ../../blobs/<hash>
        shutil.copy(f, blobs / f"h-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/h-{f.name}")
    out, warnings = _quantize(snap, tmp_path / "out")
    assert warnings == []
    assert (out / "tokenizer.json").read_bytes() == (TINY_MODEL / "tokenizer.json").read_bytes()


def test_quantize_refuses_a_config_json_linked_from_outside(tmp_path):
    d = _model_copy(tmp_path)
    (tmp_path / "elsewhere.json").write_text((d / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("../elsewhere.json")
    with pytest.raises(UserError) as err:
        _quantize(d, tmp_path / "out")
    assert str(err.value) == (
        f"{d / 'config.json'}: a link to a file outside the model directory; the quantized checkpoint needs it"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize(
    "quant_type,blocksize,expect",
    [
        ("fp8", 64, "--type 'fp8': input should be 'nf4' or 'fp4'"),
        ("nf4", 7, "--blocksize 7: input should be 32, 64, 128 or 256"),
    ],
)
def test_quantize_flag_errors_name_the_flag(tmp_path, quant_type, blocksize, expect):
    """They said `qlaunch quantize: Input should be ...` without naming the flag."""
    with pytest.raises(UserError) as err:
        _quantize(TINY_MODEL, tmp_path / "out", quant_type, blocksize)
    assert str(err.value) == expect


def test_quantize_of_a_file_says_it_is_a_file(tmp_path):
    """`quantize /etc/hostname` said `not a model directory (no such directory)`."""
    (tmp_path / "hostname").write_text("box\n")
    with pytest.raises(UserError) as err:
        _quantize(tmp_path / "hostname", tmp_path / "out")
    assert "not a model directory (a file, not a directory; one holds config.json and *.safetensors)" in str(err.value)
    with pytest.raises(UserError, match=r"not a model directory \(no such directory;"):
        _quantize(tmp_path / "nope", tmp_path / "out")


def test_cli_quantize_prints_only_its_own_lines(tmp_path):
    """bitsandbytes' kernels line and transformers' notes came with every quantize; the left-out file is
    named in one warning line."""
    d = _model_copy(tmp_path)
    (tmp_path / "id_secret").write_text("PRIVATE KEY")
    (d / "notes.txt").symlink_to("../id_secret")
    out = tmp_path / "out"
    r = run_cli("quantize", str(d), "-o", str(out), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"warning: not copied into {out}: 'notes.txt' (a link to a file outside the model directory)"
    ]
    assert r.stdout == f"wrote {out}\n" and not (out / "notes.txt").exists()


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("model-00001-of-00002.safetensors", True),
        (".hidden", True),  # a dot file is still a file of the directory (DCP's reader refuses it on its own)
        ("a" * 255, True),
        ("", False),
        (".", False),
        ("..", False),
        ("../model.safetensors", False),
        ("/etc/passwd", False),
        ("sub/model.safetensors", False),
        ("sub\\model.safetensors", False),
        ("model\0.safetensors", False),
        ("model\n.safetensors", False),
        ("a" * 256, False),
        (7, False),
        (None, False),
    ],
)
def test_plain_file_name_means_a_file_directly_inside_the_directory(name, plain):
    # The one rule every untrusted listing (a model index, a saved dataset, a checkpoint's meta and DCP
    # metadata) is checked with before a name it holds is joined to its directory.
    from launcher.safe_files import plain_file_name

    assert plain_file_name(name) is plain
