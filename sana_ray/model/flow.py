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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = shift * u / (1 + (shift - 1) * u); identity for shift = 1, monotonic in u."""
    return shift * u / (1 + (shift - 1) * u)


def sample_u(
    batch_size: int,
    *,
    scheme: str,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """``u [B]`` in (0, 1), float32: "uniform" or "logit_normal" (sigmoid of N(logit_mean, logit_std)).

    Drawn on the generator's device (so a CPU generator works for any ``device``), then moved.
    """
    draw_device = generator.device if generator is not None else device
    if scheme == "uniform":
        u = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float32)
    elif scheme == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, device=draw_device, dtype=torch.float32)
        u = torch.sigmoid(normal * logit_std + logit_mean)
    else:
        raise ValueError(f"unknown timestep sampling scheme {scheme!r}; expected 'uniform' or 'logit_normal'")
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


def flow_matching_loss(
    transformer,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Scalar MSE (float32) between the transformer's velocity prediction at ``x_t`` and ``noise - x0``.

    The transformer gets ``timestep = 1000 * sigma`` (times its config's ``timestep_scale``, 1.0 for
    every released Sana, exactly as SanaPipeline scales the sampling timesteps).
    """
    x_t, target = flow_matching_inputs(x0, noise, sigmas)
    timestep = sigmas.to(device=x0.device, dtype=torch.float32) * (NUM_TRAIN_TIMESTEPS * _timestep_scale(transformer))
    prediction = transformer(
        hidden_states=x_t,
        encoder_hidden_states=prompt_embeds,
        encoder_attention_mask=prompt_attention_mask,
        timestep=timestep,
        return_dict=False,
    )[0]
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
