"""Prompt -> (prompt_embeds, prompt_attention_mask), exactly as SanaPipeline encodes prompts.

Sana conditions on the last hidden state of a Gemma2 text encoder. The released pipeline
prepends a "complex human instruction" to every (lower-cased, stripped) caption, tokenizes
to ``len(instruction tokens) + max_sequence_length - 2`` tokens padded on the right, runs the
encoder, and keeps the BOS position plus the last ``max_sequence_length - 1`` positions
(Sana paper, section 3.1). ``PromptEncoder`` runs diffusers' own ``SanaPipeline.encode_prompt``
on a pipeline that holds only the tokenizer and the text encoder, so the training-time
embeddings cannot drift from what the pipeline computes at sampling time.
"""

from __future__ import annotations

import torch

# SanaPipeline.__call__'s default `complex_human_instruction` (diffusers 0.42), kept here as
# data so that importing this module does not import diffusers. tests/model/test_text.py
# checks that it still equals the installed diffusers' default.
DEFAULT_INSTRUCTION: list[str] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
]


class PromptEncoder:
    """Encodes captions into Sana's text conditioning.

    ``encode(prompts)`` returns ``(prompt_embeds [B, max_sequence_length, C] in dtype,
    prompt_attention_mask [B, max_sequence_length] int64)``, identical to
    ``SanaPipeline.encode_prompt(prompts, do_classifier_free_guidance=False,
    complex_human_instruction=instruction, max_sequence_length=max_sequence_length)``.
    ``instruction=None`` (or an empty list) encodes the bare captions.

    The text encoder is moved to ``device`` and put in eval mode; it runs in its own dtype and
    the embeddings are cast to ``dtype`` (``from_pretrained`` loads it in ``dtype`` directly).
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        *,
        device,
        dtype: torch.dtype = torch.float32,
        instruction: list[str] | None = DEFAULT_INSTRUCTION,
        max_sequence_length: int = 300,
    ):
        from diffusers import SanaPipeline

        self.device = torch.device(device)
        self.dtype = dtype
        self.instruction = list(instruction) if instruction else None
        self.max_sequence_length = int(max_sequence_length)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(self.device).eval()
        self._pipeline = SanaPipeline(
            tokenizer=tokenizer, text_encoder=self.text_encoder, vae=None, transformer=None, scheduler=None
        )
        self._pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        device,
        dtype: torch.dtype = torch.float32,
        instruction: list[str] | None = DEFAULT_INSTRUCTION,
        max_sequence_length: int = 300,
        revision: str | None = None,
        variant: str | None = None,
        trust_remote_code: bool = False,
    ) -> "PromptEncoder":
        from sana_ray.model.loading import load_text_encoder

        tokenizer, text_encoder = load_text_encoder(
            source, revision=revision, variant=variant, torch_dtype=dtype, trust_remote_code=trust_remote_code
        )
        return cls(
            tokenizer,
            text_encoder,
            device=device,
            dtype=dtype,
            instruction=instruction,
            max_sequence_length=max_sequence_length,
        )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a string")
        if not prompts:
            hidden_size = self.text_encoder.config.hidden_size
            return (
                torch.zeros(0, self.max_sequence_length, hidden_size, dtype=self.dtype, device=self.device),
                torch.zeros(0, self.max_sequence_length, dtype=torch.int64, device=self.device),
            )
        prompt_embeds, prompt_attention_mask, _, _ = self._pipeline.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self.device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.instruction,
        )
        return prompt_embeds.to(self.dtype), prompt_attention_mask.to(torch.int64)
