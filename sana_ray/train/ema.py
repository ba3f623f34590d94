"""Exponential moving average of the transformer's weights.

``ema = decay * ema + (1 - decay) * weights`` every ``update_every`` optimizer steps (before
``start_step`` the EMA simply copies the weights). The shadow is kept in float32, on the
training device or on the CPU (``on_cpu``).

It shadows ``strategy.local_weights()``: the whole model under DDP and ZeRO-1/2 (every rank
keeps the same EMA; rank 0 saves it), and this rank's flat partition of each parameter under
ZeRO-3 (each rank keeps and saves only its 1/N, so the EMA never needs the full model on one
GPU; export gathers the partitions on rank 0 with ``strategy.gather_weights``). The update is
element-wise, so averaging partitions is the same as averaging whole tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sana_ray.manifest.schema import EmaSpec

FILE = "ema.safetensors"
SHARD_FILE = "ema-rank-{rank:05d}.safetensors"


class EMA:
    def __init__(self, weights: dict[str, torch.Tensor], spec: EmaSpec, *, sharded: bool = False) -> None:
        self.spec = spec
        self.sharded = sharded
        self.shadow = {
            name: w.detach().to(device="cpu" if spec.on_cpu else w.device, dtype=torch.float32, copy=True)
            for name, w in weights.items()
        }

    def decay_at(self, step: int) -> float:
        """The decay applied by the update after optimizer step ``step`` (1-based); 0 copies the weights."""
        return 0.0 if step <= self.spec.start_step else self.spec.decay

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor], step: int) -> bool:
        """Called after every optimizer step ``step`` (1-based); updates every ``update_every`` steps."""
        if step % self.spec.update_every:
            return False
        weight = 1.0 - self.decay_at(step)
        for name, shadow in self.shadow.items():
            shadow.lerp_(weights[name].detach().to(device=shadow.device, dtype=torch.float32), weight)
        return True

    def file_name(self, rank: int) -> str:
        return SHARD_FILE.format(rank=rank) if self.sharded else FILE

    def save(self, folder: Path, rank: int) -> None:
        """ZeRO-3 partitions: every rank writes its own file; otherwise rank 0 writes the one copy."""
        from safetensors.torch import save_file

        if not self.sharded and rank != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.shadow.items()}, str(folder / self.file_name(rank)))

    def load(self, folder: Path, rank: int) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(folder / self.file_name(rank)))
        missing = sorted(set(self.shadow) - set(saved))
        if missing:
            raise KeyError(f"EMA in {folder} lacks {len(missing)} weights, e.g. {missing[0]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(saved[name])
