"""Rectified flow (flow matching) as Sana is trained.

Notation (per sample, latents ``x0 [B, C, H, W]``):

* ``u ~ p(u)`` on (0, 1): uniform, or logit-normal (``sigmoid(N(mean, std))``, SD3 / Sana);
* ``sigma = shift * u / (1 + (shift - 1) * u)``: the timestep shift (Sana 1.6B-1024 uses 3.0),
  which moves mass towards noisier sigmas for high resolutions;
* ``x_t = (1 - sigma) * x0 + sigma * eps`` with ``eps ~ N(0, I)``: the straight path from data
  (sigma = 0) to noise (sigma = 1);
* the transformer sees ``x_t`` and ``timestep = 1000 * sigma`` and predicts the velocity
  ``v = eps - x0`` (= d x_t / d sigma), so ``x0 = x_t - sigma * v``: the "flow_prediction"
  that DPMSolverMultistepScheduler(use_flow_sigmas=True) inverts at sampling time;
* the loss is the plain MSE between prediction and ``v``, computed in float32.

Objective options (all off by default; then the loss is exactly that plain MSE,
``F.mse_loss(prediction.float(), target.float())``): with per-element squared error
``e = (prediction - v)^2`` in float32, a per-sample scale ``s_i = lambda_i * w(sigma_i)`` (the
dataset's ``loss_weight`` times the sigma weighting, :func:`loss_weighting`) and an optional mask
``m [B, 1, h, w]`` in [0, 1] on the latent grid,

    loss = 1/B sum_i  sum_{c,p} s_i m_ip e_icp / (C sum_p m_ip)      (a sample with sum m = 0 adds 0)
    loss = 1/B sum_i  mean_{c,p}(s_i e_icp)                           (no mask; diffusers' SD3 formula)

so each image counts 1/B whatever its mask's area, its masked-out positions get exactly zero
gradient, and an all-black sample adds 0 while still counting in B. Scheduled sampling
(``model.rollout``) changes only the input ``x_t``. docs/training.md has the formulas and sources.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = shift * u / (1 + (shift - 1) * u); identity for shift = 1, monotonic in u."""
    return shift * u / (1 + (shift - 1) * u)


def sample_u(
    batch_size: int,
    *,
    scheme: str,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """``u [B]`` in (0, 1), float32: "uniform", "logit_normal" (sigmoid of N(logit_mean, logit_std))
    or "mode" (``1 - r - mode_scale (cos^2(pi r / 2) - 1 + r)``, r uniform).

    Drawn on the generator's device (so a CPU generator works for any ``device``), then moved.
    """
    draw_device = generator.device if generator is not None else device
    if scheme == "uniform":
        u = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float32)
    elif scheme == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, device=draw_device, dtype=torch.float32)
        u = torch.sigmoid(normal * logit_std + logit_mean)
    elif scheme == "mode":  # SD3's mode sampling, as diffusers' compute_density_for_timestep_sampling
        r = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float32)
        u = 1 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    else:
        raise ValueError(f"unknown timestep sampling scheme {scheme!r}; expected 'uniform', 'logit_normal' or 'mode'")
    return u.to(device) if device is not None else u


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sigmas [B]`` -> ``[B, 1, 1, ...]`` broadcastable over ``like``'s non-batch dims."""
    if sigmas.ndim != 1 or sigmas.shape[0] != like.shape[0]:
        raise ValueError(f"sigmas must have shape [{like.shape[0]}], got {tuple(sigmas.shape)}")
    return sigmas.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def flow_matching_inputs(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)``: ``x_t = (1 - sigma) * x0 + sigma * noise`` and ``target = noise - x0``."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    sigma = _per_sample(sigmas, x0)
    x_t = (1 - sigma) * x0 + sigma * noise
    target = noise - x0
    return x_t, target


def _timestep_scale(transformer) -> float:
    """The config's ``timestep_scale`` (1.0 for Sana), which SanaPipeline multiplies timesteps by.

    Looks through DDP / DeepSpeed wrappers (``.module``).
    """
    model = getattr(transformer, "module", transformer)
    config = getattr(model, "config", None)
    return float(getattr(config, "timestep_scale", 1.0) or 1.0)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32 weights of diffusers' ``compute_loss_weighting_for_sd3`` (SD3 paper, sec. 3.1):
    ``none`` 1; ``sigma_sqrt`` ``sigma^-2``; ``cosmap`` ``2 / (pi (1 - 2 sigma + 2 sigma^2))``."""
    sigmas = sigmas.float()
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"unknown loss weighting {scheme!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}")


def objective_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    sigmas: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    weighting: str = "none",
) -> torch.Tensor:
    """The scalar float32 loss of ``prediction`` against ``target`` (both ``[B, C, h, w]``); see the
    module docstring. With no mask, no sample weights and ``weighting`` none it is exactly
    ``F.mse_loss(prediction.float(), target.float())``.

    ``loss_mask [B, 1, h, w]`` in [0, 1]; ``sample_weights [B]`` (the datasets' ``loss_weight``);
    ``sigmas [B]`` (needed by a weighting other than none).
    """
    if loss_mask is None and sample_weights is None and weighting == "none":
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    error = (prediction.float() - target.float()) ** 2  # [B, C, h, w]
    batch = error.shape[0]
    scale = loss_weighting(weighting, sigmas).to(error.device) if weighting != "none" else None
    if sample_weights is not None:
        weights = sample_weights.to(device=error.device, dtype=torch.float32)
        scale = weights if scale is None else scale * weights
    if scale is not None:
        error = scale.reshape(batch, *([1] * (error.ndim - 1))) * error
    if loss_mask is None:
        return error.reshape(batch, -1).mean(1).mean()
    mask = loss_mask.to(device=error.device, dtype=torch.float32)
    if mask.shape != (batch, 1, *error.shape[2:]):
        raise ValueError(f"loss_mask must have shape [{batch}, 1, {', '.join(map(str, error.shape[2:]))}], got {tuple(mask.shape)}")
    kept = (error * mask).reshape(batch, -1).sum(1)
    # C * sum(m) per sample; an all-black sample has kept == 0 exactly, and 0 / tiny = 0 (no NaN, zero gradient).
    area = mask.reshape(batch, -1).sum(1) * error.shape[1]
    return (kept / area.clamp(min=torch.finfo(torch.float32).tiny)).mean()


def predict_velocity(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                     prompt_attention_mask: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity prediction ``[B, C, h, w]`` at ``x_t`` and ``sigmas [B]``; it gets
    ``timestep = 1000 * sigma`` (times its config's ``timestep_scale``, 1.0 for every released
    Sana, exactly as SanaPipeline scales the sampling timesteps)."""
    timestep = sigmas.to(device=x_t.device, dtype=torch.float32) * (NUM_TRAIN_TIMESTEPS * _timestep_scale(transformer))
    return transformer(
        hidden_states=x_t,
        encoder_hidden_states=prompt_embeds,
        encoder_attention_mask=prompt_attention_mask,
        timestep=timestep,
        return_dict=False,
    )[0]


def flow_matching_loss(
    transformer,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    weighting: str = "none",
    rollout_steps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Scalar loss (float32) of the transformer's velocity prediction at ``x_t`` against ``noise - x0``.

    Default: the plain MSE. ``loss_mask``, ``sample_weights`` and ``weighting``: see
    :func:`objective_loss`; ``rollout_steps [B]`` (scheduled sampling, ``model.rollout``): each
    sample's input is first rolled out ``k`` Euler steps by the transformer itself, without
    gradients, from ``k`` training timesteps above its sigma.
    """
    x_t, target = flow_matching_inputs(x0, noise, sigmas)
    if rollout_steps is not None:
        from sana_ray.model.rollout import roll_out

        def velocity(x: torch.Tensor, sigma: torch.Tensor, rows: list) -> torch.Tensor:
            return predict_velocity(transformer, x, sigma, prompt_embeds[rows], prompt_attention_mask[rows])

        x_t = roll_out(velocity, x_t, x0, noise, sigmas, rollout_steps)
    prediction = predict_velocity(transformer, x_t, sigmas, prompt_embeds, prompt_attention_mask)
    return objective_loss(prediction, target, sigmas=sigmas, loss_mask=loss_mask, sample_weights=sample_weights,
                          weighting=weighting)
