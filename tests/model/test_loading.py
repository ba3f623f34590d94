"""The tiny preset folder, the loaders and the model fingerprint (CPU, offline, tiny RANDOM components)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from sana_ray.model.tiny import TINY, TINY_VERSION, ensure_tiny_pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the 2 cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    # Idempotent: every test module asks for the same folder under the session's base temp.
    return ensure_tiny_pipeline(tmp_path_factory.getbasetemp() / "sana-tiny")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(file).items():
            tensors[f"{file.relative_to(folder).as_posix()}:{name}"] = tensor
    return tensors


def test_tiny_pipeline_is_deterministic_and_atomic(tiny_path, tmp_path):
    other = ensure_tiny_pipeline(tmp_path)
    assert other == tmp_path / TINY_VERSION
    # Nothing but the final folder is left behind (no temp sibling).
    assert [p.name for p in tmp_path.iterdir()] == [TINY_VERSION]
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (other / sub).is_dir()
    assert (other / "model_index.json").is_file()

    ours, theirs = _weights(tiny_path), _weights(other)
    assert ours.keys() == theirs.keys()
    assert any(key.startswith("transformer/") for key in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    # A second call reuses the folder without rewriting it.
    mtime = (other / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_pipeline(tmp_path) == other
    assert (other / "model_index.json").stat().st_mtime_ns == mtime


def test_tiny_pipeline_concurrent_builders_end_with_one_valid_folder(tmp_path):
    barrier = threading.Barrier(2)
    results, errors = [], []

    def build():
        try:
            barrier.wait()
            results.append(ensure_tiny_pipeline(tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [tmp_path / TINY_VERSION] * 2
    assert [p.name for p in tmp_path.iterdir()] == [TINY_VERSION]
    assert (tmp_path / TINY_VERSION / "model_index.json").is_file()


def test_incomplete_final_folder_is_an_error(tmp_path):
    (tmp_path / TINY_VERSION).mkdir()
    with pytest.raises(RuntimeError, match="not a complete pipeline"):
        ensure_tiny_pipeline(tmp_path)


def test_pipeline_loads_offline_and_generates_64px(tiny_path):
    from diffusers import SanaPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe = SanaPipeline.from_pretrained(tiny_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    assert pipe.text_encoder.config._attn_implementation == "eager"
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.flow_shift == 3.0
    image = pipe(
        "a red cube on a table",
        height=64,
        width=64,
        num_inference_steps=2,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_resolve_pretrained(tiny_path):
    from sana_ray.model.loading import resolve_pretrained

    assert resolve_pretrained(TINY, tiny_path.parent) == str(tiny_path)
    assert resolve_pretrained("Efficient-Large-Model/Sana_1600M_1024px_diffusers", tiny_path.parent) == (
        "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
    )
    assert resolve_pretrained("/some/local/folder", tiny_path.parent) == "/some/local/folder"


def test_loaders(tiny_path):
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Model

    from sana_ray.model.loading import load_pipeline, load_text_encoder, load_transformer, load_vae

    source = str(tiny_path)
    transformer = load_transformer(source)
    assert isinstance(transformer, SanaTransformer2DModel)
    assert transformer.config.in_channels == 4 and transformer.config.caption_channels == 32
    assert transformer.config.cross_attention_dim == 2 * 16 and transformer.config.num_layers == 2
    assert next(transformer.parameters()).dtype == torch.float32

    assert next(load_transformer(source, torch_dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16

    vae = load_vae(source)
    assert isinstance(vae, AutoencoderDC)
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == pytest.approx(0.41407)

    tokenizer, text_encoder = load_text_encoder(source)
    assert isinstance(text_encoder, Gemma2Model)
    assert not text_encoder.training
    assert text_encoder.config._attn_implementation == "eager"
    assert text_encoder.config.hidden_size == transformer.config.caption_channels
    assert text_encoder.config.max_position_embeddings == 2048
    # Gemma's special-token ids; BOS added, right padding, no <unk> for arbitrary unicode.
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.padding_side == "right"
    text = "Héllo wörld, 日本語 🙂\tend"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    batch = tokenizer(["a", "abcdef"], padding="max_length", max_length=10, return_tensors="pt")
    assert batch.input_ids[0, -1].item() == tokenizer.pad_token_id
    assert batch.attention_mask[0].tolist() == [1, 1] + [0] * 8

    pipe = load_pipeline(source, transformer=transformer)
    assert isinstance(pipe, SanaPipeline)
    assert pipe.transformer is transformer
    assert isinstance(load_pipeline(source).transformer, SanaTransformer2DModel)


def test_model_fingerprint(tiny_path, tmp_path):
    from sana_ray.model.loading import model_fingerprint

    first = model_fingerprint(str(tiny_path))
    assert first == model_fingerprint(str(tiny_path))
    assert len(first) == 16 and int(first, 16) >= 0

    # The same files with the same mtimes elsewhere: the same fingerprint (no absolute paths).
    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)  # copy2 keeps mtimes
    assert model_fingerprint(str(copy)) == first

    # Changing a file changes it: content (size), then only the mtime.
    config = copy / "transformer" / "config.json"
    config.write_text(config.read_text() + "\n")
    changed = model_fingerprint(str(copy))
    assert changed != first
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_fingerprint(str(copy)) not in (first, changed)
    # A new file changes it too.
    (copy / "extra.txt").write_text("x")
    assert len({first, changed, model_fingerprint(str(copy))}) == 3

    hub = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
    assert model_fingerprint(hub) == model_fingerprint(hub, None) == model_fingerprint(hub, "main")
    assert model_fingerprint(hub, "abc123") != model_fingerprint(hub)
    assert model_fingerprint(TINY) == model_fingerprint(TINY)
    assert model_fingerprint(TINY) != model_fingerprint(hub)


def test_latent_encoder_round_trip(tiny_path):
    from sana_ray.model.latents import LatentEncoder

    encoder = LatentEncoder.from_pretrained(str(tiny_path), device="cpu")
    assert encoder.downsample_factor == 4
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encoder.encode(pixels)
    assert latents.shape == (2, 4, 16, 16)
    assert not latents.requires_grad and torch.isfinite(latents).all()
    expected = encoder.vae.encode(pixels).latent * 0.41407
    torch.testing.assert_close(latents, expected.detach())
    decoded = encoder.decode(latents)
    assert decoded.shape == (2, 3, 64, 64) and torch.isfinite(decoded).all()
    torch.testing.assert_close(decoded, encoder.vae.decode(latents / 0.41407).sample.detach())
    with pytest.raises(ValueError, match="multiple of 4"):
        encoder.encode(torch.zeros(1, 3, 62, 64))


def test_tiny_sana15_preset_is_tiny_with_qk_norm_in_its_own_folder(tiny_path):
    """``pretrained: tiny-sana15``: the same seeded VAE and text encoder as ``tiny``, a transformer
    with Sana 1.5's qk norm, in its own versioned folder (so neither preset's caches are the other's)."""
    from sana_ray.model.loading import load_transformer, model_fingerprint, resolve_pretrained
    from sana_ray.model.tiny import TINY_SANA15, TINY_SANA15_VERSION

    folder = Path(resolve_pretrained(TINY_SANA15, tiny_path.parent))
    assert folder == tiny_path.parent / TINY_SANA15_VERSION and folder != tiny_path
    transformer = load_transformer(str(folder))
    assert transformer.config.qk_norm == "rms_norm_across_heads"
    assert transformer.transformer_blocks[0].attn1.norm_q is not None
    ours, tiny = _weights(folder), _weights(tiny_path)
    for key in (k for k in tiny if not k.startswith("transformer/")):
        assert torch.equal(ours[key], tiny[key]), key
    assert {k for k in ours if "norm_q" in k} and not {k for k in tiny if "norm_q" in k}
    assert model_fingerprint(TINY_SANA15) != model_fingerprint(TINY)
    assert model_fingerprint(str(folder)) != model_fingerprint(str(tiny_path))
