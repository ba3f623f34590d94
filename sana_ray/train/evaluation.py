"""Stable evaluation loss (SimpleTuner's "stable eval loss") on the held-out ``dataset_type: eval`` sets.

The training loss of a step is noisy: a different batch, timestep and noise draw every step. To
compare checkpoints (and the trials of a sweep) we measure the *training objective* on fixed
held-out data under fixed randomness:

* every eval sample is evaluated at the same ``n`` sigmas, the midpoints of ``n`` equal slices
  of (0, 1): ``sigma_j = (j + 0.5) / n``. Their mean is the midpoint-rule estimate of the loss
  integrated uniformly over sigma. **They do not depend on ``training.flow_shift``** (nor on the
  timestep sampling scheme): the shift only changes *where training spends its samples*; if the
  eval sigmas moved with it, two trials of a sweep that differ in shift would be scored on
  different tasks and their numbers would not be comparable. With fixed sigmas the per-sigma
  curves show what a shift trades (better at high noise, worse at low noise, say);
* the noise of (sample, sigma) comes from a generator seeded by ``(evaluation.seed, dataset,
  sample, timestep index)``: the same for every rank, world size, training seed, lr and shift;
* each sample uses its first caption, with no caption dropout;
* the forward pass and the loss are the training ones: ``model.flow.flow_matching_loss`` on the
  strategy's model (DDP / DeepSpeed engine) under the strategy's autocast, but with
  ``torch.no_grad()`` and the model in eval mode, and with the *trained* weights (never the EMA).

Work is split into *items* (a batch of same-shape samples of one dataset at one sigma). The item
list depends only on the data, ``batch_size`` and the number of sigmas. Rank ``r`` runs items
``r, r + W, r + 2W, ...`` and writes each item's loss sum into its slot of a vector that is zero
elsewhere; an all-reduce SUM of that vector (every slot has one non-zero contributor, so the sum
is exact) gives every rank the same per-item sums, which are then combined in a fixed order. The
result is therefore identical, bit for bit, for any world size. Every rank runs the same number
of forward passes (the ranks with one item fewer repeat an item and drop its value), because
under ZeRO-3 every forward all-gathers the partitioned weights: a rank that stopped early would
leave the others waiting forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

if TYPE_CHECKING:  # pragma: no cover
    from sana_ray.data.cache import CacheReader, CacheSet
    from sana_ray.manifest.schema import Spec

EVAL_METRIC = "eval_loss"


def eval_sigmas(num_timesteps: int) -> torch.Tensor:
    """``[n]`` float32: ``(j + 0.5) / n`` for ``j = 0 .. n-1``, evenly spaced in (0, 1), ascending.

    No flow shift is applied, on purpose (see the module docstring).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return ((torch.arange(num_timesteps, dtype=torch.float64) + 0.5) / num_timesteps).float()


def sigma_label(sigma: float) -> str:
    """Metric-name part of one eval sigma: ``sigma_0.0179`` (4 decimals: distinct for up to 1000 sigmas)."""
    return f"sigma_{sigma:.4f}"


def noise_seed(seed: int, dataset: str, sample: int, timestep: int) -> int:
    """A 63-bit seed for the noise of one eval sample at one eval sigma. Nothing about the run
    (rank, world size, training seed, lr, shift) goes in, so every trial sees the same noise."""
    digest = hashlib.sha256(f"sana-ray-eval-noise:{seed}:{dataset}:{sample}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def eval_due(step: int, spec: "Spec") -> bool:
    """Evaluate after this step? Every ``evaluation.every_steps`` (default: every checkpoint) and at the last step."""
    every = spec.evaluation.every_steps or spec.training.checkpoint_every
    return step % every == 0 or step == spec.training.steps


# --------------------------------------------------------------------------------------------
# The plan: which forward passes, and which rank runs which


@dataclass(frozen=True)
class EvalItem:
    """One forward pass: some samples of one dataset (all of one latent shape) at one sigma."""

    dataset: int  # position in the evaluator's dataset list
    samples: tuple[int, ...]  # sample indices within that dataset
    timestep: int  # index into the eval sigmas


def plan_items(buckets: list[list[int]], batch_size: int, num_timesteps: int) -> list[EvalItem]:
    """Every (batch, sigma) pair, in a fixed order. ``buckets[d][i]``: the latent bucket of sample
    ``i`` of dataset ``d``. Batches hold up to ``batch_size`` samples of one bucket, in sample order.
    Depends on nothing else, so neither do the batches (and with them the numbers) of any item."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = []
    for d, sample_buckets in enumerate(buckets):
        by_bucket: dict[int, list[int]] = {}
        for i, bucket in enumerate(sample_buckets):
            by_bucket.setdefault(bucket, []).append(i)
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            for start in range(0, len(members), batch_size):
                chunk = tuple(members[start : start + batch_size])
                items += [EvalItem(d, chunk, t) for t in range(num_timesteps)]
    return items


def rank_items(num_items: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """``(item, counted)`` pairs rank ``rank`` runs: items ``rank, rank + W, ...``, padded with an
    uncounted repeat of item 0 so that every rank runs ``ceil(num_items / W)`` forward passes
    (lock-step for ZeRO-3, whose every forward is a collective)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    mine = [(i, True) for i in range(rank, num_items, world_size)]
    per_rank = -(-num_items // world_size)
    return mine + [(0, False)] * (per_rank - len(mine))


# --------------------------------------------------------------------------------------------
# The result


@dataclass
class DatasetEval:
    name: str
    samples: int
    loss: float  # mean over samples and sigmas
    per_timestep: list[float]  # mean over samples, one per sigma


@dataclass
class EvalResult:
    """Eval losses after one evaluation; every rank holds the same one."""

    sigmas: list[float]
    loss: float  # mean over every eval sample (all datasets pooled) and every sigma
    per_timestep: list[float]  # mean over every eval sample, one per sigma; their mean is ``loss``
    datasets: list[DatasetEval] = field(default_factory=list)
    seconds: float = 0.0

    def report_metrics(self) -> dict[str, float]:
        """What goes into ``ray.train.report`` at a checkpoint (what a sweep's scheduler can
        compare): ``eval_loss`` and ``eval_loss/<dataset>`` for each eval dataset."""
        return {EVAL_METRIC: self.loss} | {f"{EVAL_METRIC}/{d.name}": d.loss for d in self.datasets}

    def mlflow_metrics(self) -> dict[str, float]:
        """What rank 0 logs to MLflow: ``eval_loss``, ``eval_loss/sigma_<s>`` per sigma, and with
        several eval datasets the same per dataset (``eval_loss/<dataset>``,
        ``eval_loss/<dataset>/sigma_<s>``); ``eval_time_s``. Non-finite values are left out (MLflow
        cannot plot them); the Ray report keeps them."""
        labels = [sigma_label(s) for s in self.sigmas]
        metrics = {EVAL_METRIC: self.loss} | {f"{EVAL_METRIC}/{l}": v for l, v in zip(labels, self.per_timestep)}
        if len(self.datasets) > 1:
            for d in self.datasets:
                metrics[f"{EVAL_METRIC}/{d.name}"] = d.loss
                metrics |= {f"{EVAL_METRIC}/{d.name}/{l}": v for l, v in zip(labels, d.per_timestep)}
        metrics["eval_time_s"] = self.seconds
        return {k: v for k, v in metrics.items() if math.isfinite(v)}


# --------------------------------------------------------------------------------------------
# The evaluator


def _all_reduce_sum(vector: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum over ranks (NCCL reduces GPU tensors only; gloo takes them where they are)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return vector
    if torch.distributed.get_world_size() == 1:
        return vector
    moved = vector.to(device)
    torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM)
    return moved.cpu()


class Evaluator:
    """Computes the stable eval loss of the model a strategy holds; see the module docstring.

    ``sets``: ``(name, data)`` per eval dataset, where ``data`` has ``batch(indices, key=None)``,
    ``buckets`` and ``len`` (a ``data.cache.CacheReader``; every rank reads all of them). Build one per worker and call :meth:`evaluate` on every rank at the same steps.
    """

    def __init__(
        self,
        sets: list[tuple[str, "CacheReader"]],
        *,
        num_timesteps: int,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if not sets:
            raise ValueError("no eval datasets to evaluate on")
        self.names = [name for name, _ in sets]
        self.data = [data for _, data in sets]
        self.sigmas = eval_sigmas(num_timesteps)
        self.seed = seed
        self.device = torch.device(device)
        self.items = plan_items([list(d.buckets) for d in self.data], batch_size, num_timesteps)
        self.mine = rank_items(len(self.items), rank, world_size)
        self._last_batch: tuple = (None, None)

    @classmethod
    def from_spec(cls, spec: "Spec", sets: list[tuple[str, "CacheReader"]], *, rank: int, world_size: int,
                  device: torch.device) -> "Evaluator":
        """The run's evaluator: only ``spec.evaluation`` (and the eval batch size's default,
        ``training.batch_size``) matter; the shift, sampling scheme, seed and lr do not."""
        evaluation = spec.evaluation
        return cls(
            sets,
            num_timesteps=evaluation.num_timesteps,
            seed=evaluation.seed,
            batch_size=evaluation.batch_size or spec.training.batch_size,
            rank=rank,
            world_size=world_size,
            device=device,
        )

    @property
    def num_forwards(self) -> int:
        """Forward passes this rank runs per evaluation (the same on every rank)."""
        return len(self.mine)

    def _item_loss_sum(self, model, item: EvalItem) -> torch.Tensor:
        """Sum over the item's samples of their MSE at the item's sigma (float64, on the CPU)."""
        from sana_ray.model.flow import flow_matching_loss

        name, data = self.names[item.dataset], self.data[item.dataset]
        if self._last_batch[0] != (item.dataset, item.samples):  # an item's batch is read once for all its sigmas
            self._last_batch = ((item.dataset, item.samples), data.batch(list(item.samples), key=None))  # first caption, no dropout
        batch = self._last_batch[1]
        latents = batch["latents"]
        noise = torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(noise_seed(self.seed, name, i, item.timestep)))
            for i in item.samples
        ])
        sigmas = self.sigmas[item.timestep].expand(len(item.samples))
        loss = flow_matching_loss(
            model,
            latents.to(self.device),
            batch["prompt_embeds"].to(self.device).float(),  # the store's dtype (bf16 for bf16 training) -> as training feeds it
            batch["prompt_attention_mask"].to(self.device),
            sigmas=sigmas.to(self.device),
            noise=noise.to(self.device),
        )
        # The training loss is the mean over the batch's elements; samples of a batch share a
        # shape, so batch mean x batch size is the sum of the per-sample means.
        return loss.detach().double().cpu() * len(item.samples)

    def local_sums(self, model, autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """``[num_items]`` float64: this rank's items' loss sums, zero in the other ranks' slots.

        Call under ``torch.no_grad()`` with the model in eval mode (:meth:`evaluate` does both).
        """
        sums = torch.zeros(len(self.items), dtype=torch.float64)
        for index, counted in self.mine:
            with autocast():
                value = self._item_loss_sum(model, self.items[index])
            if counted:
                sums[index] = value
        return sums

    def combine(self, sums: torch.Tensor) -> EvalResult:
        """The eval losses from the per-item sums of *every* item (after the all-reduce)."""
        num_t = len(self.sigmas)
        totals = torch.zeros(len(self.data), num_t, dtype=torch.float64)
        for item, value in zip(self.items, sums.tolist()):
            totals[item.dataset, item.timestep] += value
        counts = torch.tensor([len(d) for d in self.data], dtype=torch.float64)
        datasets = [
            DatasetEval(name, int(count), float(row.sum() / (count * num_t)), (row / count).tolist())
            for name, row, count in zip(self.names, totals, counts)
        ]
        pooled = totals.sum(dim=0)
        total = counts.sum()
        return EvalResult(
            sigmas=self.sigmas.tolist(),
            loss=float(pooled.sum() / (total * num_t)),
            per_timestep=(pooled / total).tolist(),
            datasets=datasets,
        )

    def evaluate(self, model, module: torch.nn.Module | None = None,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> EvalResult:
        """Every rank calls this at the same step (collective). ``model``: what training calls
        (the DDP / DeepSpeed wrapper); ``module``: the transformer whose train/eval mode is restored
        afterwards (default ``model``); ``autocast``: the strategy's autocast."""
        started = time.perf_counter()
        module = module if module is not None else model
        was_training = module.training
        model.train(False)  # DeepSpeed's engine forwards train()/eval() to its module
        try:
            with torch.no_grad():
                sums = self.local_sums(model, autocast)
        finally:
            model.train(was_training)
        result = self.combine(_all_reduce_sum(sums, self.device))
        result.seconds = time.perf_counter() - started
        return result


# --------------------------------------------------------------------------------------------
# Building one inside a train worker


def build_evaluator(spec: "Spec", eval_sets: dict[str, "CacheSet"], *, rank: int, world_size: int,
                    device: torch.device) -> Evaluator | None:
    """The evaluator for a run, or None when it does not evaluate (no eval datasets, or
    ``evaluation.enabled: false``)."""
    wanted = spec.evaluation_datasets()
    sets = {name: cache_set for name, cache_set in eval_sets.items() if name in wanted}
    if not sets:
        return None
    # Streamed like the training data (data.cache.reader): rows are read per forward pass, so an
    # eval set costs its index, not a copy of its tensors (nor of the shared text cache).
    from sana_ray.data.cache import open_reader

    readers = [(name, open_reader(cache_set)) for name, cache_set in sets.items()]
    return Evaluator.from_spec(spec, readers, rank=rank, world_size=world_size, device=device)
