"""A tiny, RANDOM Sana pipeline built from configs, for the quickstart and the tests.

``ensure_tiny_pipeline(root)`` writes a complete diffusers ``SanaPipeline`` folder (the
``save_pretrained`` layout: ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``model_index.json``) under ``root / "tiny-sana-v1"``.

The weights are RANDOM: a fixed torch seed makes them identical on every machine, but they
learn nothing useful and generate noise. They exist so that the real loading, caching,
training and sampling code paths (``from_pretrained``, ``SanaPipeline.encode_prompt``,
``AutoencoderDC.encode``, the flow-matching loss, ``SanaPipeline.__call__``) run on a CPU in
seconds, with no download.

The components mirror the structure of the released Sana checkpoints at toy sizes:

* ``SanaTransformer2DModel``: 4 latent channels, 2 layers, 2 heads x 16 (inner dim 32),
  cross-attention 2 x 16 = 32, ``caption_channels`` 32 (= the text encoder's hidden size),
  patch size 1, ``sample_size`` 16 (latent pixels: 64 px images through the 4x VAE; 16 is also
  one of the sizes SanaPipeline's resolution binning accepts, and the cheapest).
* ``AutoencoderDC``: three stages (8, 16, 32 channels; ResBlock, ResBlock, EfficientViTBlock),
  so the spatial downsampling is 4x (the real DC-AE is 32x); 4 latent channels;
  ``scaling_factor`` 0.41407 as in the real DC-AE.
* ``Gemma2Model``: hidden 32, 2 layers, 4 heads, 2 kv heads, head_dim 8, and
  ``max_position_embeddings`` 2048, because SanaPipeline's default instruction prefix is
  ~1,060 characters and the byte-level tokenizer below makes ~1 token per character.
  Gemma2 has no SDPA support in transformers 5 (soft-capping), so attention is "eager"
  (transformers also picks eager by default when loading it).
* ``GemmaTokenizer``: Gemma's special tokens at Gemma's ids (<pad> 0, <eos> 1, <bos> 2,
  <unk> 3, <mask> 4), the 256 byte-fallback tokens <0x00>..<0xFF>, and "▁" (Gemma's space
  marker); no merges. Any text, unicode included, encodes to bytes without <unk>.
* ``DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
  prediction_type="flow_prediction")``: the sampling scheduler the released Sana repos ship.

``tiny-sana15`` (``model.pretrained: tiny-sana15``) is the same pipeline with a Sana 1.5
transformer: ``qk_norm="rms_norm_across_heads"`` (RMSNorm over all heads of the queries and keys
of both attentions, as the released SANA1.5_1.6B / 4.8B diffusers configs), in its own folder
``tiny-sana15-v1``, so its caches (keyed by the folder's files) never mix with ``tiny``'s.

Change any config here and you must bump ``TINY_VERSION`` / ``TINY_SANA15_VERSION`` (the folder
names), so that caches of the old folder are never mistaken for the new one.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path

TINY = "tiny"
TINY_VERSION = "tiny-sana-v1"
TINY_SANA15 = "tiny-sana15"
TINY_SANA15_VERSION = "tiny-sana15-v1"
SEED = 0

# The weights come from torch's global RNG (seeded per component); serialize builds in one
# process so that two threads cannot interleave their draws.
_BUILD_LOCK = threading.Lock()

TEXT_HIDDEN_SIZE = 32
LATENT_CHANNELS = 4
VAE_SCALING_FACTOR = 0.41407

TRANSFORMER_CONFIG = dict(
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=16,
    cross_attention_dim=2 * 16,
    caption_channels=TEXT_HIDDEN_SIZE,
    mlp_ratio=2.5,
    dropout=0.0,
    attention_bias=False,
    sample_size=16,
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=None,
)

# Sana 1.5: the diffusers SANA1.5_*_diffusers transformer configs add exactly this to Sana 1.0's.
SANA15_QK_NORM = "rms_norm_across_heads"
TRANSFORMER_CONFIG_SANA15 = TRANSFORMER_CONFIG | dict(qk_norm=SANA15_QK_NORM)

VAE_CONFIG = dict(
    in_channels=3,
    latent_channels=LATENT_CHANNELS,
    attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 32),
    decoder_block_out_channels=(8, 16, 32),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,)),
    decoder_qkv_multiscales=((), (), (5,)),
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"),
    decoder_act_fns=("relu", "relu", "silu"),
    scaling_factor=VAE_SCALING_FACTOR,
)

SPECIAL_TOKENS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
SPACE_MARKER = "\u2581"  # "▁": Gemma's tokenizer normalizes " " to this
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + 1

TEXT_ENCODER_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=TEXT_HIDDEN_SIZE,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=8,
    max_position_embeddings=2048,
    sliding_window=4096,
    pad_token_id=SPECIAL_TOKENS["<pad>"],
    eos_token_id=SPECIAL_TOKENS["<eos>"],
    bos_token_id=SPECIAL_TOKENS["<bos>"],
)

SCHEDULER_CONFIG = dict(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")


def _tiny_vocab() -> dict[str, int]:
    vocab = dict(SPECIAL_TOKENS)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    vocab[SPACE_MARKER] = len(vocab)
    assert len(vocab) == VOCAB_SIZE
    return vocab


def build_tiny_tokenizer():
    """A Gemma tokenizer with only specials + byte tokens: built in memory, no download."""
    from transformers import GemmaTokenizer

    return GemmaTokenizer(
        vocab=_tiny_vocab(),
        merges=[],
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=TEXT_ENCODER_CONFIG["max_position_embeddings"],
    )


# preset name -> (folder name, transformer config)
PRESETS = {TINY: (TINY_VERSION, TRANSFORMER_CONFIG), TINY_SANA15: (TINY_SANA15_VERSION, TRANSFORMER_CONFIG_SANA15)}


def build_tiny_components(preset: str = TINY) -> dict:
    """The five pipeline components, freshly built with fixed seeds (identical every time)."""
    transformer_config = PRESETS[preset][1]
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    def seeded(offset: int, build):
        # fork_rng: leave the caller's global RNG state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED + offset)
            return build()

    with _BUILD_LOCK:
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            transformer = seeded(1, lambda: SanaTransformer2DModel(**transformer_config))
            vae = seeded(2, lambda: AutoencoderDC(**VAE_CONFIG))
            text_config = Gemma2Config(**TEXT_ENCODER_CONFIG, attn_implementation="eager")
            text_encoder = seeded(3, lambda: Gemma2Model(text_config))
        finally:
            torch.set_default_dtype(previous_dtype)
    return dict(
        tokenizer=build_tiny_tokenizer(),
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
    )


def _is_complete(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def ensure_tiny_pipeline(root: Path, preset: str = TINY) -> Path:
    """Write (once) the tiny random SanaPipeline folder of ``preset`` (``tiny`` or ``tiny-sana15``)
    under ``root`` and return its path.

    The folder is built in a temporary sibling and renamed into place, so a crash never leaves a
    half-written folder and concurrent callers all end up with the same, complete folder.
    """
    root = Path(root).expanduser().absolute()  # Ray workers may run in another working directory
    version = PRESETS[preset][0]
    final = root / version
    if _is_complete(final):
        return final
    if final.exists():
        raise RuntimeError(f"{final} exists but is not a complete pipeline folder (no model_index.json); delete it")

    from diffusers import SanaPipeline

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{version}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pipe = SanaPipeline(**build_tiny_components(preset))
        pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else renamed theirs into place first: theirs is as good as ours.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
