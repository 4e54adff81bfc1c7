"""The model of one rank: skeleton, quantized layers, shards, the sources they are read from.

Order matters and is the whole point of this package:
  1. build the architecture on the meta device (no memory),
  2. swap target linears for bitsandbytes 4-bit (or LLM.int8) layers and inject LoRA (still meta),
  3. let the backend shard the parameters (FSDP2 `fully_shard`) — shards are still meta,
  4. allocate each rank's local shards and fill them, tensor by tensor, from a sliceable source.
No rank ever holds a whole tensor it does not own, and no rank waits for another to broadcast weights.

4-bit layout: bitsandbytes quantizes in independent blocks of `blocksize` consecutive elements of the
flattened weight, so rank r can quantize just the blocks under its shard and get the very bytes a
whole-tensor quantization would give. The per-block scales (absmax) are computed the same way for the
blocks each rank owns and all-gathered (they are 1/32 to 1/8 of the packed bytes): every rank needs all
of them to dequantize the all-gathered weight.

8-bit layout (LLM.int8): one int8 row per output feature plus one fp32 scale per row (`Int8Params` CB and
SCB). The scales are not a parameter, so a backend that partitions and re-gathers parameters would move the
rows without them; the recipe therefore allows 8-bit only where weights are replicated (backend 'none',
ZeRO-2), and every rank quantizes whole tensors.
"""
