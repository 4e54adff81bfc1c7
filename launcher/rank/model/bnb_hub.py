"""bitsandbytes' own 4-bit checkpoints (the hub's `*-bnb-4bit` repositories): what transformers' save_pretrained
writes for a model loaded with BitsAndBytesConfig(load_in_4bit=True). Which linears they store packed, each
weight's quant-state record checked, and the quant state rebuilt by bitsandbytes itself.

For a 4-bit weight NAME (an `n = out x in` linear weight, blocksize bs) the checkpoint holds:

    NAME                                   the packed bytes, two weights a byte (U8 [n/2, 1]; BF16 [n/4, 1] with
                                           bnb_4bit_quant_storage = bfloat16: the same bytes)
    NAME.absmax                            one scale per block: U8 [ceil(n/bs)] double-quantized, else F32
    NAME.quant_map                         F32 [16], the NF4 or FP4 code
    NAME.nested_absmax, .nested_quant_map  double quantization only: F32 [ceil(blocks/256)], F32 [256]
    NAME.quant_state.bitsandbytes__nf4     U8: a JSON record (quant_type, blocksize, dtype, shape, nested_*)

The scales are stored already double-quantized, so they are used as they are (QuantState.from_dict, the
function transformers' own loader calls): quantizing them again from dequantized values gives the same bytes
but another `offset`, i.e. other weights. Each rank reads only its bytes of NAME; the state is read whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from launcher.errors import UserError
from launcher.plan.recipe import QuantConfig

STATE_KEY = ".quant_state.bitsandbytes__"

QUANT_TYPES = ("nf4", "fp4")

# A record is ~170 bytes; the cap keeps a crafted file from making every rank parse megabytes of JSON.
MAX_RECORD_BYTES = 4096

# Keys of a record (bitsandbytes' QuantState.as_dict(packed=True)); the nested ones only with double quant.
RECORD_KEYS = frozenset(("quant_type", "blocksize", "dtype", "shape"))
NESTED_KEYS = frozenset(("nested_blocksize", "nested_dtype", "nested_offset"))

# What a record's "dtype" may name: the dtype the weight is dequantized to (the model's dtype when quantized).
RECORD_DTYPES = ("bfloat16", "float16", "float32")

# Blocksizes bitsandbytes' blockwise kernels take (the nested ones quantize the scales: 256 in practice).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def stored_4bit(src) -> dict[str, str]:
    """Weight name -> quant type ('nf4'/'fp4') of every weight the checkpoint stores in 4-bit."""
    out: dict[str, str] = {}
    for tensor in src.where:
        weight, sep, quant_type = tensor.rpartition(STATE_KEY)
        if not sep or quant_type not in QUANT_TYPES:
            continue
        if weight in out:
            raise UserError(f"{src.dir}: {weight} has both an nf4 and an fp4 quant state; a weight has one")
        out[weight] = quant_type
    return out


def hub_quant_config(q: QuantConfig, linear_names: list[str], stored: dict[str, str]) -> QuantConfig:
    """The recipe's quant section with the checkpoint's choice of 4-bit linears: every linear it stores
    dense is skipped (named in full), every one it stores packed is quantized."""
    dense = [n for n in linear_names if n + ".weight" not in stored]
    return q.model_copy(update={"skip_modules": dense})


def read_record(src, model_dir: Path, name: str) -> dict:
    """The JSON quant-state record of 4-bit weight NAME, parsed and checked (keys, types, ranges) before any
    of it is shown or used; one line naming the tensor otherwise."""
    (tensor,) = [t for t in (name + STATE_KEY + k for k in QUANT_TYPES) if t in src]
    info = src.info[tensor]
    size = info.end - info.begin
    if info.dtype != "U8" or len(info.shape) != 1 or not 0 < size <= MAX_RECORD_BYTES:
        raise UserError(
            f"{model_dir}: tensor '{tensor}' is {info.dtype} {list(info.shape)}; a bitsandbytes quant-state "
            f"record is U8 [k], a JSON object of at most {MAX_RECORD_BYTES} bytes"
        )
    raw = bytes(src.read_bytes(tensor, 0, size).numpy())
    try:
        record = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        record = None
    problem = record_problem(record, tensor.rpartition(STATE_KEY)[2])
    if problem:
        raise UserError(f"{model_dir}: tensor '{tensor}' is not a valid bitsandbytes quant-state record ({problem})")
    return record


def _no_constant(name: str):
    raise ValueError("NaN or Infinity")


def _positive_int(value: object, limit: int = 1 << 40) -> bool:
    return type(value) is int and 0 < value <= limit  # type(): bool is an int subclass


def record_problem(record: object, quant_type: str) -> str | None:
    """What is wrong with a parsed record whose tensor name says QUANT_TYPE, or None (values unseen before)."""
    if not isinstance(record, dict):
        return "not a UTF-8 JSON object"
    keys = set(record)
    nested = keys & NESTED_KEYS
    if not RECORD_KEYS <= keys or keys - RECORD_KEYS - NESTED_KEYS or nested not in (set(), NESTED_KEYS):
        return f"its keys must be {sorted(RECORD_KEYS)}, with {sorted(NESTED_KEYS)} for double quantization"
    if record["quant_type"] != quant_type:
        return f"'quant_type' differs from the tensor name's {quant_type}"
    if record["blocksize"] not in BLOCKSIZES or type(record["blocksize"]) is not int:
        return f"'blocksize' must be one of {list(BLOCKSIZES)}"
    if record["dtype"] not in RECORD_DTYPES:
        return f"'dtype' must be one of {list(RECORD_DTYPES)}"
    shape = record["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_positive_int(d, 1 << 24) for d in shape)):
        return "'shape' must be [rows, columns] (positive integers)"
    if nested:
        if record["nested_blocksize"] not in BLOCKSIZES or type(record["nested_blocksize"]) is not int:
            return f"'nested_blocksize' must be one of {list(BLOCKSIZES)}"
        if record["nested_dtype"] != "float32":
            return "'nested_dtype' must be 'float32'"
        offset = record["nested_offset"]
        if type(offset) not in (int, float) or not math.isfinite(offset):
            return "'nested_offset' must be a finite number"
    return None


def check_stored_4bit(src, model_dir: Path, name: str, shape: tuple[int, ...], q: QuantConfig) -> None:
    """4-bit weight NAME fits the skeleton's SHAPE and the recipe's quant section, and every tensor of its
    state has the dtype and size its record implies (so no read can run past it)."""
    record = read_record(src, model_dir, name)
    if record["shape"] != list(shape):
        raise UserError(
            f"{model_dir}: {name} is stored as a 4-bit weight of shape {record['shape']}, the config implies "
            f"{list(shape)} (a checkpoint of another model?)"
        )
    have = {"type": record["quant_type"], "blocksize": record["blocksize"], "double_quant": "nested_offset" in record}
    want = {"type": q.type, "blocksize": q.blocksize, "double_quant": q.double_quant}
    if have != want:
        fix = ", ".join(f"quant.{k} = {json.dumps(v)}" for k, v in have.items())
        raise UserError(
            f"{model_dir}: {name} is stored quantized with {have}, but the recipe asks for {want}; set {fix} "
            "(the checkpoint's own quantization is trained as it is)"
        )
    n = shape[0] * shape[1]
    blocks = -(-n // record["blocksize"])
    packed = src.info.get(name)
    if packed is None or 2 * (packed.end - packed.begin) != n:
        what = "missing" if packed is None else f"{packed.dtype} {list(packed.shape)}"
        raise UserError(
            f"{model_dir}: tensor '{name}' (packed 4-bit weights) is {what}; {list(shape)} needs {n // 2} bytes "
            "(U8 [n/2, 1], or the same bytes in another storage dtype)"
        )
    for suffix, dtype, numel in state_tensors(record, blocks):
        tensor = f"{name}.{suffix}"
        info = src.info.get(tensor)
        if info is None:
            raise UserError(f"{model_dir}: tensor '{tensor}' missing from the bitsandbytes 4-bit checkpoint")
        if info.dtype != dtype or list(info.shape) != [numel]:
            raise UserError(
                f"{model_dir}: tensor '{tensor}' is {info.dtype} {list(info.shape)}; the record of {name} "
                f"needs {dtype} [{numel}]"
            )


def state_tensors(record: dict, blocks: int) -> list[tuple[str, str, int]]:
    """(suffix, dtype, numel) of each tensor of a 4-bit weight's quant state, from its checked record."""
    if "nested_offset" not in record:
        return [("absmax", "F32", blocks), ("quant_map", "F32", 16)]
    nested_blocks = -(-blocks // record["nested_blocksize"])
    return [
        ("absmax", "U8", blocks),
        ("quant_map", "F32", 16),
        ("nested_absmax", "F32", nested_blocks),
        ("nested_quant_map", "F32", 256),
    ]


def hub_quant_state(src, model_dir: Path, name: str, q: QuantConfig, device):
    """The whole QuantState of 4-bit weight NAME, as bitsandbytes itself unpacks it (the record was checked
    by open_source; it is read and checked again here, on the rank that uses it). It dequantizes to
    quant.compute_dtype, as the states of qlaunch's own checkpoints do."""
    from bitsandbytes.functional import QuantState

    from launcher.rank.model.skeleton import DTYPES

    record = read_record(src, model_dir, name)
    blocks = -(-record["shape"][0] * record["shape"][1] // record["blocksize"])
    tensors = {
        suffix: src.read_raw(f"{name}.{suffix}", 0, numel, device).to(device)
        for suffix, _, numel in state_tensors(record, blocks)
    }
    state = QuantState.from_dict({**record, **tensors}, torch.device(device))
    state.dtype = DTYPES[q.compute_dtype]
    return state
