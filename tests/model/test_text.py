"""PromptEncoder == SanaPipeline.encode_prompt, on the tiny RANDOM pipeline."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from sana_ray.model.text import DEFAULT_INSTRUCTION, PromptEncoder
from sana_ray.model.tiny import ensure_tiny_pipeline

PROMPTS = [
    "a cat",
    "A very long caption, " + "with many repeated clauses describing the scene in detail, " * 12,  # > 300 tokens
    "",
    "Ünïcödé: 日本語のキャプション 🙂 — naïve café",
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the 2 cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return ensure_tiny_pipeline(tmp_path_factory.getbasetemp() / "sana-tiny")


@pytest.fixture(scope="module")
def pipeline(tiny_path):
    from diffusers import SanaPipeline

    return SanaPipeline.from_pretrained(tiny_path)


def test_default_instruction_equals_diffusers_default():
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert DEFAULT_INSTRUCTION == default


@pytest.mark.parametrize("instruction", [DEFAULT_INSTRUCTION, None], ids=["instruction", "no-instruction"])
def test_prompt_encoder_matches_pipeline(tiny_path, pipeline, instruction):
    encoder = PromptEncoder.from_pretrained(str(tiny_path), device="cpu", dtype=torch.float32, instruction=instruction)
    embeds, mask = encoder.encode(PROMPTS)

    with torch.no_grad():
        expected_embeds, expected_mask, _, _ = pipeline.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, complex_human_instruction=instruction, max_sequence_length=300
        )
    assert embeds.shape == (len(PROMPTS), 300, 32) and embeds.dtype == torch.float32
    assert mask.shape == (len(PROMPTS), 300) and mask.dtype == torch.int64
    assert torch.equal(embeds, expected_embeds)
    assert torch.equal(mask, expected_mask)
    assert torch.isfinite(embeds).all()

    long_tokens = len(encoder.tokenizer.encode(PROMPTS[1]))
    assert long_tokens > 300
    assert mask[1].all()  # the long caption fills every kept position
    if instruction:
        # The byte-level tokenizer makes ~1 token per character of the ~1,060-character prefix:
        # the real path needs the tiny Gemma2's 2,048 positions.
        prefix_tokens = len(encoder.tokenizer.encode("\n".join(instruction)))
        assert 1000 < prefix_tokens < 2048 - 300
    else:
        assert mask[2].tolist() == [1] + [0] * 299  # "" is BOS only
    assert not mask[0].all()  # short caption: right padding is masked

    if not instruction:  # (cheap without the ~1,060-token prefix)
        # Same answer one prompt at a time as in a batch (right padding does not leak).
        single, single_mask = encoder.encode([PROMPTS[0]])
        torch.testing.assert_close(single[0], embeds[0])
        assert torch.equal(single_mask[0], mask[0])


def test_prompt_encoder_options(tiny_path, pipeline):
    from sana_ray.model.loading import load_text_encoder

    tokenizer, text_encoder = load_text_encoder(str(tiny_path))
    encoder = PromptEncoder(tokenizer, text_encoder, device="cpu", dtype=torch.bfloat16, max_sequence_length=77)
    embeds, mask = encoder.encode(["a dog", "two dogs"])
    assert embeds.shape == (2, 77, 32) and embeds.dtype == torch.bfloat16
    assert mask.shape == (2, 77) and mask.dtype == torch.int64
    with torch.no_grad():
        expected, _, _, _ = pipeline.encode_prompt(
            ["a dog", "two dogs"],
            do_classifier_free_guidance=False,
            complex_human_instruction=DEFAULT_INSTRUCTION,
            max_sequence_length=77,
        )
    assert torch.equal(embeds, expected.to(torch.bfloat16))

    empty, empty_mask = encoder.encode([])
    assert empty.shape == (0, 77, 32) and empty_mask.shape == (0, 77)
    with pytest.raises(TypeError):
        encoder.encode("a dog")
