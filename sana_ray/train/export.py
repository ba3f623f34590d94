"""Export the trained transformer as a complete diffusers pipeline folder.

The folder holds the trained transformer plus the base model's VAE, text encoder, tokenizer and
scheduler, so ``diffusers.SanaPipeline.from_pretrained(folder)`` loads it with nothing else.
It is written to a temporary sibling and renamed into place: a crash mid-export leaves the
previous export (or none), never half of one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sana_ray.files import replace_dir


def export_pipeline(
    transformer: torch.nn.Module,
    *,
    base_source: str,
    out_dir: Path,
    revision: str | None = None,
    variant: str | None = None,
) -> Path:
    from sana_ray.model.loading import load_pipeline

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{time.time_ns()}")
    pipeline = load_pipeline(base_source, transformer=transformer, revision=revision, variant=variant)
    pipeline.save_pretrained(str(tmp), safe_serialization=True)
    replace_dir(tmp, out_dir)
    return out_dir
