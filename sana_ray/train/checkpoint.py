"""Training checkpoints: what a resumed run needs to continue exactly where it stopped.

A checkpoint folder holds::

    transformer.safetensors   the trained weights (unwrapped from DDP)
    optimizer.pt              optimizer and lr-scheduler state
    state.json                step, micro-batch position, manifest fingerprint; written LAST

The folder is written under a fresh temporary directory and handed to Ray Train, which copies
it into the run's storage and only then records it as the latest checkpoint. ``state.json`` is
written last, so a folder without it is incomplete and ``load`` refuses it instead of resuming
from half a checkpoint.

Randomness needs no saved state: the noise and timesteps of micro-batch ``i`` on rank ``r`` come
from a generator seeded by ``(seed, r, i)`` (see ``train.loop``), and the data order is a pure
function of ``(seed, epoch)`` (see ``data.sampler``). Restoring the step restores both.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "transformer.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    micro_batches: int  # micro-batches consumed (step * gradient_accumulation_steps)
    fingerprint: str  # identity of the training spec that produced this checkpoint
    loss: float


class IncompleteCheckpoint(RuntimeError):
    pass


def save(folder: Path, *, model: torch.nn.Module, optimizer, lr_scheduler, state: TrainState) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}, folder / OPTIMIZER)
    tmp = folder / (STATE + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.replace(tmp, folder / STATE)


def read_state(folder: Path) -> TrainState:
    path = folder / STATE
    if not path.exists():
        raise IncompleteCheckpoint(f"checkpoint {folder} has no {STATE}: it was not completely written")
    return TrainState(**json.loads(path.read_text()))


def load(folder: Path, *, model: torch.nn.Module, optimizer, lr_scheduler, device: torch.device) -> TrainState:
    state = read_state(folder)
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=str(device)))
    saved = torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    return state
