"""Packed rows on CUDA: the GPU attention kernels also keep packed documents apart.

Needs only torch and transformers (no datasets/pydantic), so it also runs as a script on a bare GPU host:
`python tests/test_data_gpu.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.data.pack import IGNORE, Docs, pack
from launcher.rank.loss import CausalLMLoss

TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"
CASES = [(a, d) for a in ("sdpa", "eager", "flash_attention_2") for d in ("float32", "bfloat16")]


def _docs(n: int = 40, seed: int = 0) -> Docs:
    rng = np.random.default_rng(seed)
    docs = []
    for length in rng.integers(4, 90, size=n):
        ids = rng.integers(3, 500, size=int(length)).astype(np.int32)
        labels = ids.copy()
        labels[0] = IGNORE
        docs.append((ids, labels))
    return Docs.from_docs(docs)


def losses(attn: str, dtype: str, device: str = "cuda") -> dict[str, float]:
    """Summed token loss of the packed rows, of the same documents one per row, and of a leaky control."""
    from transformers import AutoModelForCausalLM

    docs = _docs()
    packed, single = pack(docs, 128, 2, packing=True), pack(docs, 128, 2, packing=False)
    assert len(packed) < len(single) // 2
    model = AutoModelForCausalLM.from_pretrained(
        str(TINY_MODEL), dtype=getattr(torch, dtype), attn_implementation=attn
    ).to(device)
    f = CausalLMLoss(model).eval()
    out = {}
    with torch.no_grad():
        for name, p in (("packed", packed), ("single", single)):
            b = {k: v.to(device) for k, v in p.collate(list(range(len(p)))).items()}
            s, n = f(b["input_ids"], b["labels"], b["position_ids"])
            out[name], out[f"n_{name}"] = float(s), int(n)
            if name == "packed":
                leaky = torch.arange(p.seq_len, device=device).expand_as(b["position_ids"])
                out["leaky"] = float(f(b["input_ids"], b["labels"], leaky)[0])
    return out


def _check(out: dict[str, float], dtype: str) -> None:
    assert out["n_packed"] == out["n_single"] > 0
    ref = out["single"]
    if dtype == "float32":
        assert abs(out["packed"] - ref) <= 1e-5 * abs(ref), out
        assert abs(out["leaky"] - ref) > 50 * abs(out["packed"] - ref), out
    else:  # bf16 rounding hides the (small) leak of this tiny model; agreement is still required
        assert abs(out["packed"] - ref) <= 1e-2 * abs(ref), out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn,dtype", CASES)
def test_packed_loss_equals_unpacked_loss_on_cuda(attn: str, dtype: str) -> None:
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
        if dtype == "float32":
            pytest.skip("flash-attention runs in half precision only")
    _check(losses(attn, dtype), dtype)


if __name__ == "__main__":
    import transformers

    print(f"torch {torch.__version__}  transformers {transformers.__version__}  cuda {torch.cuda.is_available()}")
    failed = 0
    for attn, dtype in CASES:
        try:
            out = losses(attn, dtype)
            _check(out, dtype)
            print(f"ok    {attn:18s} {dtype:8s} {out}")
        except ImportError as err:
            print(f"skip  {attn:18s} {dtype:8s} {err}")
        except Exception as err:  # noqa: BLE001 - a report of every case, then the exit status
            failed += 1
            print(f"FAIL  {attn:18s} {dtype:8s} {type(err).__name__}: {err}")
    sys.exit(1 if failed else 0)
