"""Pixels <-> Sana latents through the DC-AE (``AutoencoderDC``).

Sana trains on ``vae.encode(pixels).latent * scaling_factor`` (the DC-AE has no sampled
posterior: the latent is deterministic) and SanaPipeline decodes ``latents / scaling_factor``.
"""

from __future__ import annotations

import torch


class LatentEncoder:
    """Encodes ``[B, 3, H, W]`` pixels in [-1, 1] to ``[B, C, H/f, W/f]`` scaled latents and back.

    ``f`` is ``downsample_factor`` (32 for Sana's DC-AE, 4 for the tiny preset). The VAE is moved
    to ``device``/``dtype`` and put in eval mode; encode/decode run without gradients.
    """

    def __init__(self, vae, *, device, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = vae.to(device=self.device, dtype=dtype).eval()
        self.scaling_factor = float(self.vae.config.scaling_factor)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        device,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        variant: str | None = None,
    ) -> "LatentEncoder":
        from sana_ray.model.loading import load_vae

        return cls(load_vae(source, revision=revision, variant=variant, torch_dtype=dtype), device=device, dtype=dtype)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side, computed as SanaPipeline computes vae_scale_factor."""
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels.shape)}")
        f = self.downsample_factor
        if pixels.shape[-2] % f or pixels.shape[-1] % f:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} must be a multiple of {f}")
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return self.vae.encode(pixels).latent * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` scaled latents -> ``[B, 3, h*f, w*f]`` pixels (about [-1, 1]; not clamped)."""
        latents = latents.to(device=self.device, dtype=self.dtype)
        return self.vae.decode(latents / self.scaling_factor).sample
