"""Upper bounds on recipe and command-line numbers: far beyond any real run, they stop a huge value at
validation, in one line, before it overflows an int64 in torch or numpy, allocates without end or spawns
more processes than a machine can hold. Pure constants: the CLI imports them without pydantic."""

from __future__ import annotations

# Optimizer steps (max_steps, warmup, every-N cadences): the longest real runs take ~1e6.
MAX_STEPS = 10**9

# Passes over the data; with at most ~1e12 samples an epoch, steps still fit an int64.
MAX_EPOCHS = 1_000_000

# Tokens per row: above any context length a model is fine-tuned at (the longest are ~1e6 tokens).
MAX_SEQ_LEN = 2**20

# Sequences per optimizer step over all ranks, and per rank per forward pass.
MAX_GLOBAL_BATCH = 2**20

MAX_MICRO_BATCH = 2**16

# Seeds: numpy's default_rng takes non-negative ints only, and torch generators get seed * 1_000_003 +
# epoch (the step sampler), which stays below 2**63 for any seed below 2**31.
SEED_LIMIT = 2**31

# A dataset repeated more often than this in one epoch is a typo; it would also make the epoch's index
# arrays (weight x rows) enormous.
MAX_DATASET_WEIGHT = 1000.0

# Ranks per node (no node holds more accelerators; CPU ranks are processes), nodes per run.
MAX_GPUS_PER_NODE = 1024

MAX_NODES = 65536

# GiB per GPU (launch.gpu_memory_gb, --gpu-mem-gb): 64 TiB, beyond any card.
MAX_GPU_MEMORY_GB = 65536.0
