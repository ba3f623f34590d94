"""Loading Sana components from a hub id, a local diffusers folder, or the tiny preset.

Every loader goes through ``from_pretrained``, so a hub id and a local folder behave the same
and ``HF_HUB_OFFLINE=1`` works for anything already on disk. Remote code never runs unless the
manifest sets ``model.trust_remote_code`` (only the text encoder loader accepts the flag; default off).

The text encoder of the released Sana repos is a ``Gemma2Model`` (their model_index.json says
``["transformers", "Gemma2Model"]``); it is loaded with ``AutoModel``, which maps a gemma2
config to ``Gemma2Model``. transformers has no SDPA path for Gemma2 (attention soft-capping),
so it picks "eager" attention itself; an ``attn_implementation`` in the config is honoured.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from sana_ray.model.tiny import PRESETS, ensure_tiny_pipeline

FINGERPRINT_LENGTH = 16


def resolve_pretrained(pretrained: str, cache_root: Path) -> str:
    """'tiny' / 'tiny-sana15' -> the tiny pipeline folder under ``cache_root`` (built on first use);
    else unchanged."""
    if pretrained in PRESETS:
        return str(ensure_tiny_pipeline(Path(cache_root), pretrained))
    return pretrained


def _optional(**kwargs) -> dict:
    return {key: value for key, value in kwargs.items() if value is not None}


def load_transformer(
    source: str, *, revision: str | None = None, variant: str | None = None, torch_dtype=torch.float32
):
    """The ``SanaTransformer2DModel`` in ``source``'s ``transformer/`` subfolder."""
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel.from_pretrained(
        source, subfolder="transformer", dtype=torch_dtype, **_optional(revision=revision, variant=variant)
    )


def load_vae(source: str, *, revision: str | None = None, variant: str | None = None, torch_dtype=torch.float32):
    """The DC-AE ``AutoencoderDC`` in ``source``'s ``vae/`` subfolder."""
    from diffusers import AutoencoderDC

    return AutoencoderDC.from_pretrained(
        source, subfolder="vae", dtype=torch_dtype, **_optional(revision=revision, variant=variant)
    )


def load_text_encoder(
    source: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype=torch.float32,
    trust_remote_code: bool = False,
):
    """``(tokenizer, text_encoder)`` from ``source``'s ``tokenizer/`` and ``text_encoder/`` subfolders.

    The text encoder is returned in eval mode. The tokenizer's padding side is whatever the repo
    says; SanaPipeline.encode_prompt (and PromptEncoder) set it to "right" themselves.
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, subfolder="tokenizer", trust_remote_code=trust_remote_code, **_optional(revision=revision)
    )
    text_encoder = AutoModel.from_pretrained(
        source,
        subfolder="text_encoder",
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        **_optional(revision=revision, variant=variant),
    )
    return tokenizer, text_encoder.eval()


def load_pipeline(
    source: str,
    *,
    transformer=None,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype=torch.float32,
):
    """The whole ``SanaPipeline``; ``transformer`` (an instance) replaces the stored one if given."""
    from diffusers import SanaPipeline

    extra = {"transformer": transformer} if transformer is not None else {}
    return SanaPipeline.from_pretrained(
        source, dtype=torch_dtype, **_optional(revision=revision, variant=variant), **extra
    )


def _local_folder_digest(folder: Path) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file below ``folder``; no file is read."""
    entries = []
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        for name in files:
            path = Path(directory) / name
            try:
                stat = path.stat()  # follows symlinks (hub cache snapshots link to blobs)
            except OSError:  # a dangling link
                stat = path.lstat()
            entries.append(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}")
    digest = hashlib.sha256(b"local\0")
    for entry in sorted(entries):
        digest.update(entry.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def model_fingerprint(source: str, revision: str | None = None) -> str:
    """A short, stable hex string identifying the weights in ``source``, for cache keys.

    * a local folder: sha256 over the relative paths, sizes and mtimes of its files (weights are
      not read), so editing or replacing any file changes it;
    * ``"tiny"`` / ``"tiny-sana15"`` (unresolved): the preset's version, which is the same on every
      machine (its weights are seeded); a resolved tiny folder is a local folder like any other;
    * anything else is a hub id: sha256 of ``"<id>@<revision or 'main'>"``. Pin ``revision`` to a
      commit for a key that cannot go stale when the branch moves.
    """
    path = Path(source).expanduser()
    if source not in PRESETS and path.is_dir():
        hexdigest = _local_folder_digest(path)
    elif source in PRESETS:
        hexdigest = hashlib.sha256(f"tiny\0{PRESETS[source][0]}".encode()).hexdigest()
    else:
        hexdigest = hashlib.sha256(f"hub\0{source}@{revision or 'main'}".encode()).hexdigest()
    return hexdigest[:FINGERPRINT_LENGTH]
