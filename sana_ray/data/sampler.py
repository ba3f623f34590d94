"""Which samples each worker trains on at each micro-batch.

DDP needs every rank to run the same shapes at the same step, so batches are formed per
*bucket* (samples whose latents share a shape). Per epoch ``e``:

1. for each bucket (in bucket-id order), list its sample indices, each sample ``1 + repeats``
   times, and shuffle them with a generator seeded by ``(seed, e)``. With per-sample ``weights``
   (a dataset's ``probability``), each (bucket, group) keeps ``round(weight x draws)`` of its
   draws: whole copies for the integer part, and a fresh random subset each epoch for the
   fraction. The counts are fixed, so every epoch has the same number of batches;
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
        weights: list[float] | None = None,
        groups: list[int] | None = None,
        bucket_labels: list[str] | None = None,
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
        if weights is not None and len(weights) != len(buckets):
            raise ValueError(f"weights has {len(weights)} entries for {len(buckets)} samples")
        if weights is not None and any(w <= 0 for w in weights):
            raise ValueError("weights must be > 0")
        if groups is None:
            groups = [0] * len(buckets)

        members: dict[int, list[int]] = {}
        # (bucket, group) -> (draws, weight) for weighted groups; weight 1 keeps every draw.
        weighted: dict[int, list[tuple[list[int], float]]] = {}
        parts: dict[tuple[int, int], list[int]] = {}
        part_weight: dict[tuple[int, int], float] = {}
        for index, (bucket, extra) in enumerate(zip(buckets, repeats)):
            weight = 1.0 if weights is None else float(weights[index])
            if weight == 1.0:
                members.setdefault(bucket, []).extend([index] * (1 + extra))
            else:
                key = (bucket, groups[index])
                parts.setdefault(key, []).extend([index] * (1 + extra))
                part_weight[key] = weight  # one weight per group (a dataset's probability)
                members.setdefault(bucket, [])
        for (bucket, _group), draws in sorted(parts.items()):
            weighted.setdefault(bucket, []).append((draws, part_weight[(bucket, _group)]))
        self._bucket_ids = sorted(members)
        self._buckets = [members[b] for b in self._bucket_ids]
        self._weighted = [weighted.get(b, []) for b in self._bucket_ids]
        self._sizes = [
            len(m) + sum(round(len(draws) * w) for draws, w in parts_)
            for m, parts_ in zip(self._buckets, self._weighted)
        ]
        self._batches_per_epoch = sum(n // self.global_batch_size for n in self._sizes)
        self._cached_epoch: int | None = None
        self._cached_plan: list[list[int]] = []

        if self._batches_per_epoch == 0:
            sizes = Counter(dict(zip(self._bucket_ids, self._sizes)))
            largest = max(sizes.values(), default=0)
            name = (lambda b: bucket_labels[b]) if bucket_labels else (lambda b: f"bucket {b}")
            detail = ", ".join(f"{name(b)}: {n}" for b, n in sorted(sizes.items())) or "no samples"
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
            for members, parts in zip(self._buckets, self._weighted):
                order = list(members)
                for draws, weight in parts:
                    whole = int(weight)
                    order.extend(draws * whole)
                    extra = round(len(draws) * weight) - len(draws) * whole
                    if extra > 0:
                        order.extend(rng.sample(draws, extra))
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
