"""Which samples each worker trains on at each micro-batch.

DDP needs every rank to run the same shapes at the same step, so batches are formed per
*bucket* (samples whose latents share a shape). Per epoch ``e``:

1. for each bucket (in bucket-id order), list its sample indices, each sample ``1 + repeats``
   times, and shuffle them with a generator seeded by ``(seed, e)``;
2. chunk them into *global* batches of ``batch_size * world_size``; the incomplete remainder is
   dropped (a different remainder each epoch, since the order is reshuffled);
3. shuffle the list of global batches (same generator) so buckets interleave.

Rank ``r`` takes ``[r * batch_size, (r + 1) * batch_size)`` of global batch ``index``. Micro-batch
indices run 0, 1, 2, ... across epochs forever, so the trainer resumes by recomputing the index
from the step: nothing but ``index`` is state. Pure Python and deterministic across processes.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter


class SamplerError(ValueError):
    """The batch plan cannot form a single global batch; the message has the numbers and the fix."""


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    # Hash (seed, epoch) to one integer: independent of PYTHONHASHSEED and of the process.
    digest = hashlib.sha256(f"sana-ray-sampler:{seed}:{epoch}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class BatchPlan:
    def __init__(
        self,
        buckets: list[int],
        repeats: list[int] | None,
        batch_size: int,
        world_size: int,
        seed: int,
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1 (got {batch_size}, {world_size})")
        if repeats is None:
            repeats = [0] * len(buckets)
        if len(repeats) != len(buckets):
            raise ValueError(f"repeats has {len(repeats)} entries for {len(buckets)} samples")
        if any(r < 0 for r in repeats):
            raise ValueError("repeats must be >= 0")
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.global_batch_size = batch_size * world_size

        members: dict[int, list[int]] = {}
        for index, (bucket, extra) in enumerate(zip(buckets, repeats)):
            members.setdefault(bucket, []).extend([index] * (1 + extra))
        self._buckets = [members[b] for b in sorted(members)]
        self._bucket_ids = sorted(members)
        self._batches_per_epoch = sum(len(m) // self.global_batch_size for m in self._buckets)
        self._cached_epoch: int | None = None
        self._cached_plan: list[list[int]] = []

        if self._batches_per_epoch == 0:
            sizes = Counter({b: len(m) for b, m in zip(self._bucket_ids, self._buckets)})
            largest = max(sizes.values(), default=0)
            detail = ", ".join(f"bucket {b}: {n}" for b, n in sorted(sizes.items())) or "no samples"
            raise SamplerError(
                f"no bucket has enough samples for one global batch of {self.global_batch_size} "
                f"(batch_size {batch_size} x {world_size} workers); samples per epoch, repeats "
                f"included, by latent shape: {detail} (largest: {largest}). Fix: add repeats to the "
                f"dataset, or lower training.batch_size or hardware.num_workers so that "
                f"batch_size x num_workers <= {largest}."
            )

    @property
    def samples_per_epoch(self) -> int:
        """Sample draws actually trained per epoch (after dropping remainders)."""
        return self._batches_per_epoch * self.global_batch_size

    def global_batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    def epoch_of(self, index: int) -> int:
        return index // self._batches_per_epoch

    def _plan(self, epoch: int) -> list[list[int]]:
        if self._cached_epoch != epoch:
            rng = _epoch_rng(self.seed, epoch)
            plan: list[list[int]] = []
            size = self.global_batch_size
            for members in self._buckets:
                order = list(members)
                rng.shuffle(order)
                plan.extend(order[i : i + size] for i in range(0, len(order) - size + 1, size))
            rng.shuffle(plan)
            self._cached_epoch, self._cached_plan = epoch, plan
        return self._cached_plan

    def global_batch(self, index: int) -> list[int]:
        """All ranks' samples of micro-batch ``index`` (rank r's are slice r)."""
        if index < 0:
            raise IndexError(f"batch index must be >= 0, got {index}")
        epoch, position = divmod(index, self._batches_per_epoch)
        return list(self._plan(epoch)[position])

    def batch(self, index: int, rank: int) -> list[int]:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range for world_size {self.world_size}")
        start = rank * self.batch_size
        return self.global_batch(index)[start : start + self.batch_size]
