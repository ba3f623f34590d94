"""Gradient checkpointing every n-th block gives the same loss and gradients as none."""

from __future__ import annotations

import torch

from sana_ray.model.flow import flow_matching_loss
from sana_ray.model.tiny import TRANSFORMER_CONFIG
from sana_ray.train.activations import checkpointed_blocks, enable_gradient_checkpointing


def test_checkpointed_blocks():
    assert checkpointed_blocks(5, 1) == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, 2) == [0, 2, 4]
    assert checkpointed_blocks(5, 9) == [0]


def _loss_and_grads(interval: int | None, calls: list[int]):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(**(TRANSFORMER_CONFIG | {"num_layers": 4})).train()  # the tiny preset, 4 blocks
    if interval is not None:
        enable_gradient_checkpointing(transformer, interval)
    for i, block in enumerate(transformer.transformer_blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    embeds = torch.randn(2, 6, 32, generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    loss = flow_matching_loss(transformer, latents, embeds, mask, sigmas=torch.tensor([0.3, 0.8]),
                              noise=torch.randn(latents.shape, generator=g))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def test_interval_matches_no_checkpointing():
    plain_calls, every_calls, second_calls = [], [], []
    loss, grads = _loss_and_grads(None, plain_calls)
    n = len(plain_calls)
    assert n == 4
    for interval, calls in ((1, every_calls), (2, second_calls)):
        other_loss, other_grads = _loss_and_grads(interval, calls)
        torch.testing.assert_close(other_loss, loss, rtol=0, atol=0)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-6, atol=1e-7)
    # Recomputed blocks run forward twice: every block with interval 1, blocks 0, 2, ... with 2.
    assert len(every_calls) == 2 * n
    assert sorted(second_calls) == sorted(list(range(n)) + checkpointed_blocks(n, 2))
