"""Validation images: the manifest's prompts rendered with the model as it is at a given step.

Every image of a run uses the same seed per prompt, so the images of step 100 and step 1000 (or
of two runs) differ only by the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sana_ray.manifest.schema import ValidationSpec


def prompt_filename(index: int, prompt: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in prompt.lower())[:48].strip("-")
    return f"{index:02d}-{slug or 'prompt'}.png"


@torch.no_grad()
def render(pipeline, spec: ValidationSpec, *, resolution: int, out_dir: Path, device: torch.device) -> list[Path]:
    """Generate one image per prompt into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    written = []
    for index, prompt in enumerate(spec.prompts):
        generator = torch.Generator(device="cpu").manual_seed(spec.seed + index)
        image = pipeline(
            prompt=prompt,
            negative_prompt=spec.negative_prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale,
            generator=generator,
            # Binning would snap a small test resolution to the 1024 px bin; the manifest's
            # resolution is what the user asked for.
            use_resolution_binning=False,
        ).images[0]
        path = out_dir / prompt_filename(index, prompt)
        image.save(path)
        written.append(path)
    return written
