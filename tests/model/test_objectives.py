"""Training objectives (model.flow, model.rollout): masked loss, loss weighting, per-sample
weights, scheduled sampling, and the tiny Sana 1.5 transformer -- on the tiny model, no Ray.

Float guarantees: "bit-identical" checks use ``torch.equal``. The tiny latents are [2, 4, 8, 8]
(every size a power of two), so a loss scaled by 2 has exactly twice the gradient: every scale in
the backward pass (1/B, 1/(C h w), the weight 2) is a power of two, and multiplying by one is
exact in floating point.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sana_ray.manifest.schema import ScheduledSamplingSpec
from sana_ray.model.flow import (
    flow_matching_inputs, flow_matching_loss, loss_weighting, objective_loss, predict_velocity, sample_u, shift_sigmas,
)
from sana_ray.model.rollout import (
    RolloutPlan, expected_rollout, offset_distribution, plan_rollout, roll_out, rollout_probability,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _transformer(config=None):
    from diffusers import SanaTransformer2DModel

    from sana_ray.model.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return SanaTransformer2DModel(**(config or TRANSFORMER_CONFIG)).train()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    embeds = torch.randn(2, 12, 32, generator=generator)
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[1, 7:] = 0
    return dict(x0=x0, noise=noise, embeds=embeds, mask=mask, sigmas=shift_sigmas(torch.tensor([0.3, 0.8]), 3.0))


def _loss(transformer, b, **extra):
    return flow_matching_loss(transformer, b["x0"], b["embeds"], b["mask"], sigmas=b["sigmas"], noise=b["noise"], **extra)


def _grads(transformer) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in transformer.parameters()]
    transformer.zero_grad()
    return grads


# --------------------------------------------------------------------------------------------
# The default path and the masked / weighted loss


def test_default_loss_is_the_plain_mse(batch):
    transformer = _transformer()
    x_t, target = flow_matching_inputs(batch["x0"], batch["noise"], batch["sigmas"])
    with torch.no_grad():
        prediction = predict_velocity(transformer, x_t, batch["sigmas"], batch["embeds"], batch["mask"])
        expected = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        assert torch.equal(_loss(transformer, batch), expected)
        # Every option at its "off" value takes the same path.
        assert torch.equal(_loss(transformer, batch, weighting="none", rollout_steps=None), expected)


def test_masked_positions_get_exactly_zero_gradient_and_an_all_black_sample_adds_nothing():
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    mask = torch.rand(2, 1, 8, 8, generator=generator)
    mask[0, :, :4] = 0  # sample 0: top half ignored
    mask[1] = 0  # sample 1: all black
    loss = objective_loss(prediction, target, loss_mask=mask)
    loss.backward()
    grad = prediction.grad
    assert torch.equal(grad[0, :, :4], torch.zeros_like(grad[0, :, :4]))
    assert (grad[0, :, 4:] != 0).all()  # the trained half does get a gradient
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    # The mask-weighted mean per sample; the all-black sample adds 0 but still counts in B = 2.
    error = (prediction.detach() - target) ** 2
    expected = (error[0] * mask[0]).sum() / (4 * mask[0].sum()) / 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)  # same sums, another order

    # A micro-batch of only all-black masks: loss 0, no gradient, no NaN.
    prediction.grad = None
    black = objective_loss(prediction, target, loss_mask=torch.zeros(2, 1, 8, 8))
    black.backward()
    assert black.item() == 0.0 and torch.equal(prediction.grad, torch.zeros_like(prediction))


def test_a_uniform_grey_mask_is_the_mean_over_the_image():
    generator = torch.Generator().manual_seed(2)
    prediction, target = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    grey = objective_loss(prediction, target, loss_mask=torch.full((2, 1, 8, 8), 0.5))
    torch.testing.assert_close(grey, F.mse_loss(prediction, target), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="loss_mask must have shape"):
        objective_loss(prediction, target, loss_mask=torch.ones(2, 4, 8, 8))


def test_the_mask_masks_the_loss_not_the_attention_context(batch):
    """What masking does and does not do: the masked-out positions' prediction gets no gradient
    (above), but their pixels are still the model's input, and attention and the feed-forward's
    3x3 convolutions carry them into the predictions at trained positions -- so changing only the
    masked-out region of the latents still changes the weights' gradient (docs/training.md says so)."""
    transformer = _transformer()
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :4] = 0
    _loss(transformer, batch, loss_mask=mask).backward()
    reference = _grads(transformer)
    changed = dict(batch)
    changed["x0"] = batch["x0"].clone()
    changed["x0"][:, :, :4] += 1.0  # only the masked-out rows
    _loss(transformer, changed, loss_mask=mask).backward()
    moved = _grads(transformer)
    assert any(not torch.equal(a, b) for a, b in zip(reference, moved))


def test_loss_weighting_matches_diffusers():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.linspace(0.01, 1.0, 100)
    for scheme in ("none", "sigma_sqrt", "cosmap"):
        assert torch.equal(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas)), scheme
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weighting("snr", sigmas)

    # The weighted loss is diffusers' SD3 training-script formula, bit for bit.
    generator = torch.Generator().manual_seed(3)
    prediction, target = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    two = torch.tensor([0.2, 0.9])
    for scheme in ("sigma_sqrt", "cosmap"):
        weighting = compute_loss_weighting_for_sd3(scheme, two.view(-1, 1, 1, 1))
        diffusers_loss = torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(2, -1), 1).mean()
        assert torch.equal(objective_loss(prediction, target, sigmas=two, weighting=scheme), diffusers_loss), scheme


def test_mode_sampling_matches_diffusers():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = sample_u(64, scheme="mode", mode_scale=1.29, generator=torch.Generator().manual_seed(4), device="cpu")
    theirs = compute_density_for_timestep_sampling("mode", 64, mode_scale=1.29, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ours, theirs)


def test_loss_weight_two_doubles_the_gradient(batch):
    transformer = _transformer()
    _loss(transformer, batch).backward()
    single = _grads(transformer)
    loss = _loss(transformer, batch, sample_weights=torch.tensor([2.0, 2.0]))
    loss.backward()
    doubled = _grads(transformer)
    for a, b in zip(single, doubled):
        assert torch.equal(b, 2 * a)
    with torch.no_grad():
        # The value: mean of per-sample means vs mse_loss's one mean (another summation order).
        torch.testing.assert_close(loss, 2 * _loss(transformer, batch), rtol=1e-6, atol=0)
        # Per sample: one sample at weight 2 is the mean of (2 x its loss, the other's loss).
        x_t, target = flow_matching_inputs(batch["x0"], batch["noise"], batch["sigmas"])
        prediction = predict_velocity(transformer, x_t, batch["sigmas"], batch["embeds"], batch["mask"])
        per_sample = ((prediction - target) ** 2).reshape(2, -1).mean(1)
        mixed = _loss(transformer, batch, sample_weights=torch.tensor([2.0, 1.0]))
        torch.testing.assert_close(mixed, (2 * per_sample[0] + per_sample[1]) / 2, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Scheduled sampling


def _spec(**kwargs) -> ScheduledSamplingSpec:
    return ScheduledSamplingSpec(**({"max_step_offset": 10, "probability": 1.0} | kwargs))


def test_scheduled_sampling_off_is_todays_loss_exactly(batch):
    transformer = _transformer()
    off = [ScheduledSamplingSpec(), _spec(probability=0.0), _spec(max_step_offset=0),
           _spec(ramp_steps=100, prob_start=0.0)]  # at step 0 of a ramp from 0
    for spec in off:
        assert plan_rollout(spec, seed=1, micro_batch=3, step=0, batch_size=2) is None, spec
    with torch.no_grad():
        plain = _loss(transformer, batch)
        # A plan whose samples all draw k = 0 changes nothing either.
        assert torch.equal(_loss(transformer, batch, rollout_steps=(0, 0)), plain)


def test_rollout_plans_are_deterministic_per_key_and_follow_the_strategy():
    spec = _spec(probability=0.5)
    a = plan_rollout(spec, seed=1, micro_batch=7, step=3, batch_size=16)
    assert a == plan_rollout(spec, seed=1, micro_batch=7, step=3, batch_size=16)  # a resume draws the same
    others = {plan_rollout(spec, seed=s, micro_batch=m, step=3, batch_size=16) for s, m in ((2, 7), (1, 8), (1, 9))}
    assert a not in others
    assert all(0 <= k <= 10 for k in a.steps) and a.forward_calls == max(a.steps) and a.sample_forwards == sum(a.steps)

    # The draws follow offset_distribution (the planner's arithmetic): 20,000 fixed draws (seeded,
    # so the same numbers every run); 0.012 is > 5 standard errors of a frequency near 0.1.
    for strategy in ("uniform", "biased_early", "biased_late"):
        spec = _spec(strategy=strategy)
        counts = [0] * 11
        for micro_batch in range(100):
            for k in plan_rollout(spec, seed=0, micro_batch=micro_batch, step=0, batch_size=200).steps:
                counts[k] += 1
        expected = offset_distribution(10, strategy)
        assert math.isclose(sum(expected), 1.0, rel_tol=1e-12)
        for j in range(11):
            assert abs(counts[j] / 20_000 - expected[j]) < 0.012, (strategy, j, counts[j], expected[j])
    per_sample, calls = expected_rollout(10, "uniform", 1.0, 1)
    assert per_sample == pytest.approx(5.0) and calls == pytest.approx(5.0)
    # E[max k] over a batch: the planner's forward calls per micro-batch, against 5,000 fixed draws.
    spec = _spec(probability=0.5, strategy="biased_early")
    plans = [plan_rollout(spec, seed=0, micro_batch=m, step=0, batch_size=4) for m in range(5000)]
    empirical = sum(p.forward_calls for p in plans if p is not None) / 5000
    assert empirical == pytest.approx(expected_rollout(10, "biased_early", 0.5, 4)[1], abs=0.15)  # ~5 standard errors


def test_rollout_probability_ramps_like_simpletuner():
    assert rollout_probability(_spec(probability=0.3), 0) == 0.3
    ramp = _spec(probability=0.8, prob_start=0.2, start_step=10, ramp_steps=20)
    assert [rollout_probability(ramp, s) for s in (0, 9, 10, 20, 30, 99)] == pytest.approx([0.2, 0.2, 0.2, 0.5, 0.8, 0.8])
    cosine = _spec(probability=1.0, ramp_steps=10, ramp_shape="cosine")
    assert [rollout_probability(cosine, s) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert rollout_probability(_spec(probability=1.0, start_step=5), 4) == 0.0  # prob_start before start_step


def test_a_perfect_model_rolls_out_onto_the_exact_path(batch):
    """With the true velocity (eps - x0, constant along the straight path) Euler is exact: the
    rollout lands on x_t; the forward calls are max k, each over the samples still rolling out."""
    x0, noise, sigmas = batch["x0"], batch["noise"], torch.tensor([0.3, 0.995])
    x_t, _ = flow_matching_inputs(x0, noise, sigmas)
    calls = []

    def perfect(x, sigma, rows):
        calls.append((tuple(rows), sigma.tolist()))
        return (noise - x0)[rows]

    rolled = roll_out(perfect, x_t, x0, noise, sigmas, (4, 9))
    torch.testing.assert_close(rolled, x_t, rtol=0, atol=1e-6)
    assert [rows for rows, _ in calls] == [(0, 1)] * 4 + [(1,)] * 5
    assert calls[0][1] == pytest.approx([0.304, 1.0])  # sample 1's source is cut at sigma = 1
    assert calls[-1][1][0] < 1.0 and calls[3][1][0] == pytest.approx(0.301)

    # A sample already at sigma = 1 (nowhere noisier to start from) keeps its x_t bit for bit.
    one = torch.tensor([1.0, 1.0])
    x_one, _ = flow_matching_inputs(x0, noise, one)
    assert torch.equal(roll_out(perfect, x_one, x0, noise, one, (3, 5)), x_one)


def test_rollout_uses_the_models_own_prediction_and_is_reproducible(batch):
    transformer = _transformer()
    with torch.no_grad():
        plain = _loss(transformer, batch)
        rolled = _loss(transformer, batch, rollout_steps=(3, 5))
        assert not torch.equal(rolled, plain)  # the random tiny model is far from perfect: it drifts
        assert torch.equal(_loss(transformer, batch, rollout_steps=(3, 5)), rolled)
    loss = _loss(transformer, batch, rollout_steps=(3, 5))
    loss.backward()  # gradients flow through the training forward only (the rollout ran without them)
    assert all(torch.isfinite(p.grad).all() for p in transformer.parameters())
    assert RolloutPlan((3, 5)).forward_calls == 5


# --------------------------------------------------------------------------------------------
# Sana 1.5 (qk norm)


def test_tiny_sana15_has_qk_norm_and_trains():
    from sana_ray.model.tiny import TRANSFORMER_CONFIG_SANA15

    transformer = _transformer(TRANSFORMER_CONFIG_SANA15)
    assert transformer.config.qk_norm == "rms_norm_across_heads"
    block = transformer.transformer_blocks[0]
    assert block.attn1.norm_q is not None and block.attn2.norm_k is not None
    generator = torch.Generator().manual_seed(0)
    b = dict(x0=torch.randn(2, 4, 8, 8, generator=generator), noise=torch.randn(2, 4, 8, 8, generator=generator),
             embeds=torch.randn(2, 12, 32, generator=generator), mask=torch.ones(2, 12, dtype=torch.int64),
             sigmas=shift_sigmas(torch.tensor([0.3, 0.8]), 3.0))
    loss = _loss(transformer, b, loss_mask=torch.ones(2, 1, 8, 8), weighting="cosmap", rollout_steps=(2, 0))
    loss.backward()
    assert block.attn1.norm_q.weight.grad is not None and block.attn1.norm_q.weight.grad.abs().sum() > 0
    transformer.zero_grad()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=3e-3)
    initial = _loss(transformer, b).item()
    for _ in range(25):
        optimizer.zero_grad()
        _loss(transformer, b).backward()
        optimizer.step()
    assert _loss(transformer, b).item() < 0.5 * initial
