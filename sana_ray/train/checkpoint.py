"""Training checkpoints: what a resumed run needs to continue exactly where it stopped.

A checkpoint folder holds what the strategy writes plus the EMA and the train state::

    DDP:        transformer.safetensors, optimizer.pt (optimizer, lr schedule, fp16 loss scaler)
    DeepSpeed:  deepspeed/zero/...  (every rank's ZeRO shards; lr schedule in the client state)
    ema.safetensors or ema-rank-NNNNN.safetensors (ZeRO-3: one partition per rank), when EMA is on
    state.json  step, micro-batch position, manifest fingerprint; written LAST, by rank 0

Every rank writes its part into its own fresh temporary folder and reports it to Ray Train,
which copies all ranks' folders into one checkpoint in the run's storage and only then records
it as the latest. ``state.json`` is written last, so a folder without it is incomplete and
``load`` refuses it instead of resuming from half a checkpoint.

Randomness needs no saved state: the noise and timesteps of micro-batch ``i`` on rank ``r`` come
from a generator seeded by ``(seed, r, i)`` (see ``train.loop``), and the data order is a pure
function of ``(seed, epoch)`` (see ``data.sampler``). Restoring the step restores both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sana_ray.files import write_json_atomic

STATE = "state.json"


@dataclass
class TrainState:
    step: int  # optimizer steps completed (skipped non-finite steps included)
    micro_batches: int  # micro-batches consumed (step * gradient_accumulation_steps)
    fingerprint: str  # identity of the training spec that produced this checkpoint
    loss: float
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient, in total
    nonfinite_in_a_row: int = 0  # ... and how many of the latest were, in a row


class IncompleteCheckpoint(RuntimeError):
    pass


def save(folder: Path, *, strategy, ema, state: TrainState, rank: int) -> None:
    """This rank's part of a checkpoint (collective under DeepSpeed: every rank must call it)."""
    folder.mkdir(parents=True, exist_ok=True)
    strategy.save(folder, rank)
    if ema is not None:
        ema.save(folder, rank)
    if rank == 0:
        write_json_atomic(folder / STATE, asdict(state))


def read_state(folder: Path) -> TrainState:
    path = folder / STATE
    if not path.exists():
        raise IncompleteCheckpoint(f"checkpoint {folder} has no {STATE}: it was not completely written")
    return TrainState(**json.loads(path.read_text()))


def load(folder: Path, *, strategy, ema, rank: int) -> TrainState:
    state = read_state(folder)
    strategy.load(folder)
    if ema is not None:
        ema.load(folder, rank)
    return state
