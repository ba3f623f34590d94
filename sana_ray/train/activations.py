"""Gradient checkpointing of every n-th transformer block.

diffusers' ``SanaTransformer2DModel.forward`` runs each block through
``self._gradient_checkpointing_func(block, *args)`` when ``gradient_checkpointing`` is on, and
``enable_gradient_checkpointing(func)`` lets the caller supply that function. We supply one that
checkpoints blocks 0, n, 2n, ... (``torch.utils.checkpoint``, non-reentrant, as diffusers' own)
and runs the others normally, so their activations stay in memory. The module tree and the
state-dict keys are untouched (nothing is wrapped), so checkpoints and exports are the same with
or without it; the loss and gradients are identical too.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def enable_gradient_checkpointing(transformer: torch.nn.Module, interval: int = 1) -> None:
    if interval < 1:
        raise ValueError(f"gradient checkpointing interval must be >= 1, got {interval}")
    index = {id(block): i for i, block in enumerate(transformer.transformer_blocks)}

    def checkpoint_every_nth(block: torch.nn.Module, *args):
        if index.get(id(block), 0) % interval == 0:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(checkpoint_every_nth)


def checkpointed_blocks(num_blocks: int, interval: int) -> list[int]:
    """Indices of the blocks that ``enable_gradient_checkpointing(..., interval)`` recomputes."""
    return [i for i in range(num_blocks) if i % interval == 0]
