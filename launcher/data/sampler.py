"""Which packed rows each rank reads at each step: the same global batch for any world size and accumulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from launcher.errors import UserError

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    pass
from launcher.data.pack import IGNORE, Packed, count_pairs, pair_segments, with_pair_top


@dataclass(frozen=True)
class StepCounts:
    """Global counts of a batch (every rank's micro-batches of a step together, or a whole validation set):
    what each micro-batch's loss is divided by, so that any split computes one device's loss."""

    tokens: int  # labelled tokens (the next-token loss's normaliser)
    pairs: int = 0  # preference pairs (DPO's and ORPO's mean is over pairs)
    chosen_tokens: int = 0  # tokens after the first of every chosen sequence (ORPO's NLL, as TRL's)


def batch_counts(data: Packed, idx: list[int], preference: bool) -> StepCounts:
    """The counts of rows `idx` of data."""
    i = torch.as_tensor(idx, dtype=torch.long)
    labels = data.labels[i]
    tokens = int((labels[:, 1:] != IGNORE).sum())
    if not preference:
        return StepCounts(tokens)
    pos = data.position_ids[i]
    seg = pair_segments(pos)
    chosen = int(((seg % 2 == 1) & (pos != 0)).sum())
    return StepCounts(tokens, count_pairs(pos), chosen)


class StepBatches:
    """This rank's micro-batches of each step, built on a host thread one step ahead of the GPU.

    The step loop asks for step s and names the step it will ask for next; that one is collated (and, for a
    GPU, pinned so the copy to the device does not block) while the GPU computes step s. The step loop only
    waits when a batch is not ready yet: that wait is the data time it reports.

    The loss is normalised by counts of the whole global batch (label tokens, pairs). Every rank holds the whole
    (packed) training set and the sampler's global batch, so each rank counts them itself: no collective,
    and no device->host copy that would make the host wait for the GPU at every step start.
    """

    def __init__(self, data: Packed, sampler: StepSampler, pin: bool, preference: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.data, self.sampler, self.pin, self.preference = data, sampler, pin, preference
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qlaunch-batches")
        self._ahead: tuple[int, object] | None = None  # (step, Future of build(step))

    def counts(self, step: int) -> StepCounts:
        """The global batch's counts at `step` (every rank's micro-batches together)."""
        return batch_counts(self.data, self.sampler.global_batch(step), self.preference)

    def build(self, step: int) -> tuple[list[dict[str, torch.Tensor]], StepCounts]:
        micro = [self.data.collate(idx) for idx in self.sampler.micro_batches(step)]
        if self.preference:
            micro = [with_pair_top(b) for b in micro]
        if self.pin:
            micro = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in micro]
        return micro, self.counts(step)

    def get(self, step: int, then: int | None) -> tuple[list[dict[str, torch.Tensor]], StepCounts]:
        """(micro-batches, global counts) of `step`; starts building `then` (None: nothing more)."""
        if self._ahead is not None and self._ahead[0] == step:
            out = self._ahead[1].result()
        else:
            out = self.build(step)
        self._ahead = (then, self._pool.submit(self.build, then)) if then is not None else None
        return out


class StepSampler:
    """Global batch of step s = samples perm[s*G:(s+1)*G] (a fresh seeded permutation per epoch).

    Rank r's micro-step a gets positions [(a*W + r)*mb, +mb) of that global batch: disjoint across ranks,
    the same global batch at any world size, and resumable from the step number alone. `next()` walks the
    steps with a cursor that state_dict()/load_state_dict() save and restore (a checkpoint stores it; a
    resumed run, at any world size, then sees exactly the samples the uninterrupted run would have).
    """

    def __init__(self, n: int, global_batch: int, micro_batch: int, world: int, rank: int, seed: int):
        if n < global_batch:
            raise UserError(f"the training data has {n} packed samples, fewer than train.global_batch = {global_batch}")
        self.n, self.G, self.mb, self.W, self.r, self.seed = n, global_batch, micro_batch, world, rank, seed
        self.steps_per_epoch = n // global_batch
        self.accum = global_batch // (micro_batch * world)
        self.step = 0
        self._cached: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        # Read the cache once and return what was checked: StepBatches' thread and the step loop may ask for
        # different epochs at once, and re-reading self._cached could return the other thread's epoch.
        cached = self._cached
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cached = self._cached = (epoch, torch.randperm(self.n, generator=g))
        return cached[1]

    def global_batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[k * self.G : (k + 1) * self.G].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        gb = self.global_batch(step)
        return [gb[(a * self.W + self.r) * self.mb : (a * self.W + self.r + 1) * self.mb] for a in range(self.accum)]

    def next(self) -> list[list[int]]:
        """This rank's micro-batches of the cursor's step; advances the cursor."""
        out = self.micro_batches(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "n": self.n, "global_batch": self.G, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("n", "global_batch", "seed"):
            if state.get(k) != mine[k]:
                what = {"n": "packed training samples", "global_batch": "train.global_batch", "seed": "train.seed"}
                raise UserError(
                    f"cannot resume: the checkpoint was taken with {what[k]} = {state.get(k)}, this run has "
                    f"{mine[k]}; a resumed run would not see the samples the interrupted one would have"
                )
        self.step = int(state["step"])
