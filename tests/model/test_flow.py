"""Rectified-flow pieces: the shift, u sampling, x_t / target, and the loss on the tiny transformer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sana_ray.model.flow import flow_matching_inputs, flow_matching_loss, sample_u, shift_sigmas


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the 2 cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_shift_sigmas_matches_flow_match_euler_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    # The scheduler's unshifted sigmas are timesteps/1000 for timesteps = 1000, 999, ..., 1;
    # it stores the shifted ones in .sigmas and .timesteps = 1000 * shifted sigmas.
    u = torch.from_numpy(np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy()) / 1000
    torch.testing.assert_close(shift_sigmas(u, shift), scheduler.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(shift_sigmas(u, shift) * 1000, scheduler.timesteps, rtol=0, atol=1e-3)


def test_shift_sigmas_matches_dpmsolver_flow_sigmas():
    from diffusers import DPMSolverMultistepScheduler

    from sana_ray.model.tiny import SCHEDULER_CONFIG

    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(20)
    u = 1 - np.linspace(1, 1 / 1000, 21)  # the scheduler's unshifted flow sigmas
    expected = torch.from_numpy(np.flip(u)[:-1].copy())
    torch.testing.assert_close(
        shift_sigmas(expected, 3.0).float(), scheduler.sigmas[:-1].float(), rtol=0, atol=1e-6
    )


def test_shift_sigmas_identity_monotonic_endpoints():
    u = torch.linspace(0, 1, 101)
    assert torch.equal(shift_sigmas(u, 1.0), u)
    for shift in (0.5, 3.0, 6.0):
        sigma = shift_sigmas(u, shift)
        assert (sigma[1:] > sigma[:-1]).all()
        assert sigma[0] == 0 and sigma[-1] == pytest.approx(1.0)
        if shift > 1:
            assert (sigma[1:-1] > u[1:-1]).all()  # a shift > 1 moves mass towards noise
    assert shift_sigmas(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)


def test_sample_u():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_u(20_000, scheme="uniform", logit_mean=0.0, logit_std=1.0, generator=generator, device="cpu")
    assert uniform.shape == (20_000,) and uniform.dtype == torch.float32
    assert (uniform >= 0).all() and (uniform < 1).all()
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)

    for mean, std in ((0.0, 1.0), (0.5, 1.0), (-1.0, 0.5)):
        u = sample_u(20_000, scheme="logit_normal", logit_mean=mean, logit_std=std, generator=generator, device="cpu")
        assert (u > 0).all() and (u < 1).all()
        assert u.median().item() == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.015)

    a = sample_u(8, scheme="logit_normal", logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(1), device="cpu")
    b = sample_u(8, scheme="logit_normal", logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(1), device="cpu")
    assert torch.equal(a, b)
    assert sample_u(3, scheme="uniform", logit_mean=0.0, logit_std=1.0, generator=None, device="cpu").shape == (3,)
    with pytest.raises(ValueError, match="logit_normal"):
        sample_u(3, scheme="cosine", logit_mean=0.0, logit_std=1.0, generator=None, device="cpu")


def test_flow_matching_inputs():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    sigmas = torch.tensor([0.0, 1.0, 0.25])
    x_t, target = flow_matching_inputs(x0, noise, sigmas)
    assert x_t.shape == target.shape == x0.shape
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])
    torch.testing.assert_close(target, noise - x0)
    # target is the velocity d x_t / d sigma, and x0 = x_t - sigma * target.
    torch.testing.assert_close(x0, x_t - sigmas.view(-1, 1, 1, 1) * target)
    with pytest.raises(ValueError):
        flow_matching_inputs(x0, noise, torch.tensor([0.5]))


def test_target_is_what_the_sana_sampler_inverts():
    """DPMSolver(prediction_type="flow_prediction") turns our target back into x0 at every step."""
    from diffusers import DPMSolverMultistepScheduler

    from sana_ray.model.tiny import SCHEDULER_CONFIG

    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    for index in range(10):
        scheduler._step_index = index  # convert_model_output reads sigmas[step_index]
        sigma = scheduler.sigmas[index].float()
        # The scheduler's timestep for this sigma is 1000 * sigma (cast to an integer), the scale
        # the loss feeds the transformer.
        assert 0 <= 1000 * sigma.item() - scheduler.timesteps[index].item() < 1
        x_t, target = flow_matching_inputs(x0, noise, sigma.expand(2))
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
        torch.testing.assert_close(x_t, alpha_t * x0 + sigma_t * noise)  # same forward process
        x0_pred = scheduler.convert_model_output(target, sample=x_t)
        torch.testing.assert_close(x0_pred, x0, atol=1e-5, rtol=1e-5)


def _tiny_transformer():
    from diffusers import SanaTransformer2DModel

    from sana_ray.model.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return SanaTransformer2DModel(**TRANSFORMER_CONFIG)


def test_flow_matching_loss_trains_the_tiny_transformer():
    transformer = _tiny_transformer().train()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    prompt_embeds = torch.randn(2, 12, 32, generator=generator)
    prompt_attention_mask = torch.ones(2, 12, dtype=torch.int64)
    prompt_attention_mask[1, 7:] = 0
    sigmas = shift_sigmas(torch.tensor([0.3, 0.8]), 3.0)

    def loss_fn():
        return flow_matching_loss(
            transformer, x0, prompt_embeds, prompt_attention_mask, sigmas=sigmas, noise=noise
        )

    loss = loss_fn()
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in transformer.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    transformer.zero_grad()

    optimizer = torch.optim.AdamW(transformer.parameters(), lr=3e-3)
    initial = loss.item()
    for _ in range(25):
        optimizer.zero_grad()
        step_loss = loss_fn()
        step_loss.backward()
        optimizer.step()
    final = loss_fn().item()
    assert final < 0.5 * initial, (initial, final)
