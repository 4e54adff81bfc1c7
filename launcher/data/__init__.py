"""Data: load records, render them, tokenize, pack into seq_len, and sample global batches deterministically.

Interface used by the ranks (keep it stable):
  tokenizer.build_tokenizer(recipe, model_dir) -> tokenizer
  cache.build_data(recipe, tokenizer, rank, world, cache_dir) -> (train: Packed, val: Packed | None)
  sampler.StepSampler(n, global_batch, micro_batch, world, rank, seed).micro_batches(step) -> list[list[int]]
  pack.Packed.collate(indices) -> {"input_ids", "labels", "position_ids"} LongTensors [B, seq_len]
and by the launcher, before anything is written:
  check.check(recipe) -> None (the quick check), cache.prepare(recipe, cache_dir) -> None (every row)

The flow, per dataset: source (file, saved dataset, hub name) -> rows -> each row validated and rendered
into text segments marked trainable or not -> token ids + labels per document -> over-long policy ->
validation carve -> weighted mixture -> documents packed into rows of seq_len. The result is a pure
function of (data files, tokenizer, data settings, seed), so one process per cache directory computes it,
stores it under a fingerprint of those inputs, and every other rank memory-maps the same file.

No attention across packed documents: rows carry no attention mask; their position_ids restart at 0 for
each document, and transformers (checked on 5.17 and 5.24, sdpa and eager; flash-attention uses the same
position_ids for its varlen path) derives a block-diagonal causal mask from them whenever attention_mask
is None (masking_utils.find_packed_sequence_indices). tests/test_data.py proves it: the loss of a packed
batch equals the loss of the same documents one by one. The first token of every document carries no
label, because in a packed row it would otherwise be predicted from the previous document's last token.
"""
