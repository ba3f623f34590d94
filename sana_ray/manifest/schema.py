"""The manifest, as typed pydantic models.

A manifest is shaped like a Kubernetes object::

    apiVersion: sana-ray/v1
    kind: TrainingRun
    metadata: {name: ...}
    spec: {model, datasets, training, validation, hardware, tracking, output}

Every model forbids unknown keys, so a typo is an error that names the key and the
closest valid one (see ``sana_ray.manifest.errors``). Defaults here are the documented
defaults: ``sana-ray validate`` prints the manifest with all of them filled in.

This module imports nothing heavy: ``sana-ray validate`` must answer in well under a second.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sana_ray.manifest.names import NAME_PATTERN, NAME_RULE
from sana_ray.manifest.values import INT_MAX, check_value
from sana_ray.redaction import uri_credentials

API_VERSION = "sana-ray/v1"

# Sana's DC-AE downsamples images 32x; the tiny preset's VAE downsamples 4x. Resolutions are
# multiples of 32 so that one rule holds for both.
RESOLUTION_MULTIPLE = 32


class Strict(BaseModel):
    """Base for every manifest section: unknown keys are errors, values are validated on assignment.

    No NaN or infinity in any number, and no silent coercion that hides a mistake: a boolean is
    not a number, a number is not a boolean, a quoted number is not a number; no NUL in a string,
    no empty path or URI for a path (see ``values.check_value``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_lax_coercion(cls, value: Any, info) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None:
            check_value(value, field.annotation)
        return value


class Metadata(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        description="Run name: lower-case letters, digits, '.', '_' and '-', starting and ending with a letter or "
        "digit, at most 63 characters (like a Kubernetes name). Names the MLflow run and the output folder.",
    )
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form tags, copied to MLflow.")


class ModelSpec(Strict):
    pretrained: str = Field(
        description="A Hugging Face hub id (e.g. Efficient-Large-Model/Sana_1600M_1024px_diffusers or the Sana 1.5 "
        "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers), a local diffusers folder, or 'tiny' ('tiny-sana15': "
        "with Sana 1.5's qk norm) for small RANDOM Sana components built from configs (for the quickstart and tests; "
        "it learns nothing useful).",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(default=None, description="Weights variant, e.g. 'bf16' or 'fp16'.")
    trust_remote_code: bool = Field(default=False, description="Allow code from the model repo to run. Off unless you ask.")
    max_sequence_length: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=300, description="Text tokens kept after the instruction prefix (Sana uses 300)."
    )
    use_instruction_prefix: bool = Field(
        default=True,
        description="Prepend SanaPipeline's complex human instruction to every caption, as Sana was trained.",
    )
    text_embeds_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="dtype the cached text embeddings are stored in (the encoder always runs in float32). auto: "
        "bfloat16 when training computes in bf16 (mixed_precision bf16, or auto on GPUs), else float32. Under bf16 "
        "autocast the transformer's first use of the embeddings is the caption_projection linear layer, which casts "
        "them to bf16 anyway, so bfloat16 loses nothing there and halves the text cache (at Sana's 300 x 2304, "
        "2.76 MB a caption in float32); float32 training needs float32.",
    )


CaptionStrategy = Literal["textfile", "filename", "instanceprompt", "metadata"]
ResolutionType = Literal["pixel", "pixel_area", "area"]
DatasetType = Literal["image", "eval", "text_embeds"]

# Aspect ratios (width / height) that crop_aspect closest / random choose from by default.
DEFAULT_ASPECT_BUCKETS: tuple[float, ...] = (0.5, 0.5625, 0.6667, 0.75, 1.0, 1.3333, 1.5, 1.7778, 2.0)

# Fields that mean nothing for a `dataset_type: text_embeds` entry (rejected there when set).
_IMAGE_ONLY_FIELDS = frozenset(
    {
        "path", "caption_strategy", "instance_prompt", "metadata_file", "caption_column", "file_column",
        "caption_dropout_probability", "resolution", "resolution_type", "minimum_image_size",
        "maximum_image_size", "target_downsample_size", "crop", "crop_style", "crop_aspect",
        "crop_aspect_buckets", "repeats", "is_regularisation_data", "probability", "vae_batch_size",
        "cache_latents", "mask_path", "loss_weight",
    }
)


def _check_multiple_of_32(value: int) -> int:
    if value % RESOLUTION_MULTIPLE:
        lower = value // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE
        raise ValueError(
            f"must be a multiple of {RESOLUTION_MULTIPLE} (the DC-AE downsamples 32x); "
            f"try {lower or RESOLUTION_MULTIPLE} or {lower + RESOLUTION_MULTIPLE}"
        )
    return value


class DatasetSpec(Strict):
    """One entry of spec.datasets: a folder of images (or, with dataset_type text_embeds, the text-embedding store).

    See docs/data.md for how each option changes the training images and for SimpleTuner's names.
    """

    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        description="Names the dataset's cache folder and its metrics (eval_loss/<name>): the same rule as "
        "metadata.name (" + NAME_RULE + ").",
    )
    path: Path = Field(
        description="Folder of images (searched recursively). Relative paths are relative to the manifest. "
        "Not used (and not needed) by a dataset_type text_embeds entry."
    )
    dataset_type: DatasetType = Field(
        default="image",
        description="image: trained on; eval: never trained on (held out for an evaluation loss); "
        "text_embeds: not images but the settings of the text-embedding cache (cache_dir, write_batch_size).",
    )
    disabled: bool = Field(default=False, description="Ignore this entry entirely (as if it were not in the list).")
    caption_strategy: CaptionStrategy = Field(
        default="textfile",
        description="textfile: a sibling .txt per image, one caption per line (one line chosen per sample); "
        "filename: the cleaned file name; instanceprompt: instance_prompt for every image; "
        "metadata: a caption column of metadata_file (JSONL, CSV or Parquet).",
    )
    instance_prompt: str | None = None
    metadata_file: Path | None = Field(
        default=None,
        description="caption_strategy metadata: a .jsonl, .csv or .parquet file with a file column and a caption "
        "column (a caption cell may be a list: one is chosen per sample). Relative paths are relative to the dataset folder.",
    )
    caption_column: str = Field(default="caption", description="Metadata column holding the caption(s).")
    file_column: str = Field(default="file", description="Metadata column holding the image path (relative to the dataset folder, or absolute).")
    caption_dropout_probability: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0,
        description="Chance that a sample is trained with the empty prompt (encoded as SanaPipeline encodes "
        "negative_prompt=''), which teaches the unconditional branch classifier-free guidance uses.",
    )
    resolution_type: ResolutionType = Field(
        default="pixel", description="How resolution, minimum_image_size, maximum_image_size and target_downsample_size are measured."
    )
    resolution: int | float = Field(
        default=1024,
        description="Training size: pixels of the short edge (resolution_type pixel), the side of a square of the "
        "same area (pixel_area), or megapixels (area, e.g. 1.0). Pixel sizes are multiples of 32.",
    )
    minimum_image_size: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Skip (and count as 'too small') images smaller than this, in resolution_type units. null: keep all (small ones are upscaled)."
    )
    maximum_image_size: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Images larger than this (resolution_type units) are first downsampled to target_downsample_size."
    )
    target_downsample_size: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Size (resolution_type units) that images above maximum_image_size are downsampled to before cropping. null: maximum_image_size."
    )
    crop: bool = Field(default=True, description="Crop to the crop_aspect shape. false: keep each image's aspect ratio (sides trimmed to multiples of 32).")
    crop_style: Literal["center", "centre", "random", "corner"] = Field(
        default="center", description="Where the crop is taken: center; random (a fixed random place per image); corner (top-left)."
    )
    crop_aspect: Literal["square", "preserve", "closest", "random"] = Field(
        default="square",
        description="Shape of the crop: square; preserve (the image's aspect); closest (the nearest of crop_aspect_buckets); "
        "random (one of crop_aspect_buckets, fixed per image).",
    )
    crop_aspect_buckets: list[Annotated[float, Field(gt=0.1, lt=10)]] | None = Field(
        default=None, description=f"Aspect ratios (width/height) for crop_aspect closest/random. null: {list(DEFAULT_ASPECT_BUCKETS)}."
    )
    repeats: Annotated[int, Field(ge=0)] = Field(default=0, description="Extra passes over this dataset per epoch (0 = seen once).")
    is_regularisation_data: bool = Field(
        default=False, description="Marks regularisation (prior-preservation) data: reported separately; its share of training is set with probability."
    )
    probability: Annotated[float, Field(gt=0, le=100)] = Field(
        default=1.0,
        description="Sampling weight: each epoch draws round(probability x images x (1 + repeats)) samples of this dataset "
        "(a different subset each epoch when below 1).",
    )
    loss_weight: Annotated[float, Field(gt=0, le=100)] = Field(
        default=1.0,
        description="OneTrainer's concept loss weight: every sample of this dataset has its loss multiplied by it "
        "(2 doubles the dataset's gradient). Independent of probability, which sets how often it is drawn. "
        "Training datasets only (the eval loss is unweighted).",
    )
    mask_path: Path | None = Field(
        default=None,
        description="Masked loss: a folder of mask images named like the images (same relative path and stem, any "
        "image extension; white = train, black = ignore, grey = weight in between). Each mask gets the image's "
        "crop and resize, is averaged down to the latent grid and cached beside the latents; the loss is the "
        "mask-weighted mean (docs/training.md). A missing, unreadable or differently sized mask skips its image "
        "(counted in the data report). Relative paths are relative to the manifest. Training datasets only.",
    )
    vae_batch_size: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Images per VAE forward (and per latent shard file). null: 8."
    )
    write_batch_size: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="text_embeds entries: captions per text-encoder forward (and per shard file). null: 8."
    )
    cache_latents: bool = Field(
        default=True,
        description="true: the VAE latents are encoded once, into the latent cache, before training. false "
        "(SimpleTuner's vae_cache_disable): no latent cache for this dataset; every training worker loads, "
        "crops and VAE-encodes each batch's images right before the forward pass (same geometry and latents "
        "as the cache; for datasets too large for the cache's disk, at the cost of a VAE forward per sample "
        "per step). Captions are still cached. Training datasets only (not dataset_type eval).",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where this entry's cache goes (image datasets: latents; text_embeds: text embeddings). "
        "Relative paths are relative to output.cache_dir. null: under output.cache_dir.",
    )

    @field_validator("resolution")
    @classmethod
    def _resolution_in_units(cls, value: int | float, info) -> int | float:
        if not math.isfinite(value):  # allow_inf_nan refuses these first; kept so int() below never raises
            raise ValueError(f"expected a finite number, got {value}")
        if info.data.get("resolution_type") == "area":
            if not 0 < value <= 64:
                raise ValueError(f"resolution_type 'area' takes megapixels (e.g. 1.0 or 0.25), got {value}")
            return float(value)
        if value != int(value) or value < RESOLUTION_MULTIPLE:
            raise ValueError(f"must be a whole number of pixels >= {RESOLUTION_MULTIPLE} (or set resolution_type: area for megapixels)")
        return _check_multiple_of_32(int(value))

    @model_validator(mode="before")
    @classmethod
    def _text_embeds_needs_no_path(cls, data):
        if isinstance(data, dict) and data.get("dataset_type") == "text_embeds":
            fields = cls.model_fields
            # Re-validation on assignment passes every field: only values other than the default count.
            extra = sorted(k for k in data if k in _IMAGE_ONLY_FIELDS and k != "path" and data[k] != fields[k].get_default(call_default_factory=True))
            if extra:
                raise ValueError(
                    f"a dataset_type text_embeds entry takes only name, cache_dir, write_batch_size and disabled; "
                    f"remove {', '.join(extra)}"
                )
            if data.get("path") is None:
                data = {**data, "path": "."}
        return data

    @model_validator(mode="after")
    def _check(self) -> "DatasetSpec":
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError("caption_strategy 'instanceprompt' needs instance_prompt to be set")
        if self.caption_strategy == "metadata" and self.metadata_file is None:
            raise ValueError("caption_strategy 'metadata' needs metadata_file (a .jsonl, .csv or .parquet file)")
        if self.minimum_image_size and self.maximum_image_size and self.minimum_image_size > self.maximum_image_size:
            raise ValueError("minimum_image_size is larger than maximum_image_size")
        if self.target_downsample_size is not None and self.maximum_image_size is None:
            raise ValueError("target_downsample_size needs maximum_image_size (images above it are downsampled)")
        if self.dataset_type == "eval" and not self.cache_latents:
            raise ValueError("cache_latents: false is for training datasets; a dataset_type eval set is always cached (it is small and read at every evaluation)")
        if self.dataset_type == "eval" and (self.mask_path is not None or self.loss_weight != 1.0):
            raise ValueError(
                "mask_path and loss_weight are for training datasets: the eval loss of a dataset_type eval set is "
                "unmasked and unweighted so that it stays comparable between runs and trials; remove them here"
            )
        return self


OptimizerName = Literal["adamw", "optimi-adamw", "lion", "adamw8bit", "paged-lion8bit", "came"]


class OptimizerSpec(Strict):
    name: OptimizerName = Field(
        default="adamw",
        description="adamw: torch.optim.AdamW; optimi-adamw: torch-optimi's AdamW (Kahan summation for 16-bit "
        "weights); lion: torch-optimi's Lion; adamw8bit / paged-lion8bit: bitsandbytes' 8-bit AdamW / paged "
        "8-bit Lion; came: CAME (came-pytorch, a factored, memory-saving Adam-like optimizer).",
    )
    lr: Annotated[float, Field(gt=0)] = 1e-4
    betas: tuple[float, float] | None = Field(
        default=None,
        description="null: the optimizer's own default ((0.9, 0.999) for the AdamW kinds and CAME, (0.9, 0.99) for Lion).",
    )
    came_beta3: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.9999, description="CAME only: its third beta (the average of the update's instability)."
    )
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    eps: Annotated[float, Field(gt=0)] = Field(default=1e-8, description="AdamW kinds only (Lion has none; CAME keeps its own pair).")


class LrSchedulerSpec(Strict):
    name: Literal["constant", "cosine", "linear"] = Field(
        default="constant",
        description="After the linear warm-up: constant; cosine (half a cosine from lr down to min_lr_ratio*lr at the "
        "last step); linear (straight down to min_lr_ratio*lr at the last step).",
    )
    warmup_steps: Annotated[int, Field(ge=0)] = Field(default=0, description="Steps of linear warm-up from lr/warmup_steps to lr.")
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(default=0.0, description="cosine / linear: the final lr as a fraction of lr.")


class TimestepSamplingSpec(Strict):
    """How u in [0, 1] is drawn before the flow shift (SD3 / Sana use logit-normal)."""

    scheme: Literal["uniform", "logit_normal", "mode"] = Field(
        default="logit_normal",
        description="uniform; logit_normal: sigmoid(N(logit_mean, logit_std)) (SD3, Sana); mode: SD3's mode sampling "
        "u = 1 - r - mode_scale (cos^2(pi r / 2) - 1 + r), r uniform (diffusers' compute_density_for_timestep_sampling).",
    )
    logit_mean: float = 0.0
    logit_std: Annotated[float, Field(gt=0)] = 1.0
    mode_scale: float = Field(default=1.29, description="scheme mode only: its scale (diffusers' scripts default to 1.29).")


class ScheduledSamplingSpec(Strict):
    """Scheduled sampling ("rollout", SimpleTuner's scheduled_sampling_*): some samples are trained from a point
    the model reached itself, a few Euler steps down from a noisier sigma, instead of the exact noisy latent.

    Off unless both max_step_offset and probability are above 0. Semantics, defaults and the differences from
    SimpleTuner: docs/training.md.
    """

    max_step_offset: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=0,
        description="Most rollout steps per sample, in training timesteps (1/1000 of sigma each): a rolled-out sample "
        "starts at sigma + k/1000 (at most 1) and takes k Euler steps of the current model down to its sigma. "
        "0: off (SimpleTuner's default). 5-10 is SimpleTuner's suggestion.",
    )
    probability: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="Chance that a sample is rolled out (after any ramp). 0: off (SimpleTuner's default)."
    )
    strategy: Literal["uniform", "biased_early", "biased_late"] = Field(
        default="uniform",
        description="How k is drawn in 0..max_step_offset: uniform; biased_early: round(r^2 max) (shorter rollouts); "
        "biased_late: round((1 - r^2) max) (longer), r uniform in [0, 1).",
    )
    ramp_steps: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Optimizer steps over which the probability rises from prob_start to probability (after "
        "start_step). 0: no ramp.",
    )
    start_step: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Before this optimizer step the probability is prob_start; the ramp starts here."
    )
    prob_start: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="Probability before start_step and at the start of the ramp (used only with ramp_steps > 0 or start_step > 0)."
    )
    ramp_shape: Literal["linear", "cosine"] = Field(default="linear", description="Shape of the ramp.")

    @property
    def enabled(self) -> bool:
        return self.max_step_offset > 0 and (self.probability > 0 or self.prob_start > 0)


class EmaSpec(Strict):
    """Exponential moving average of the transformer's weights (saved in checkpoints)."""

    enabled: bool = False
    decay: Annotated[float, Field(gt=0, lt=1)] = Field(default=0.9999, description="ema = decay*ema + (1-decay)*weights at every update.")
    update_every: Annotated[int, Field(ge=1)] = Field(default=1, description="Update the EMA every N optimizer steps.")
    start_step: Annotated[int, Field(ge=0)] = Field(default=0, description="Before this step the EMA just copies the weights.")
    on_cpu: bool = Field(default=False, description="Keep the EMA in CPU memory (saves GPU memory; costs a copy per update).")
    use_for_export: bool = Field(default=False, description="Export (and render the final validation images from) the EMA weights instead of the trained ones.")


class TrainingSpec(Strict):
    steps: Annotated[int, Field(ge=1)] = Field(description="Optimizer steps to train.")
    batch_size: Annotated[int, Field(ge=1)] = Field(default=1, description="Samples per worker per micro-batch.")
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    seed: int = 42
    mixed_precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="auto: bf16 on a GPU that supports it, fp32 otherwise (and always on CPU). bf16 / fp16: DDP "
        "autocasts (fp32 weights; fp16 adds torch.amp.GradScaler loss scaling); DeepSpeed keeps 16-bit weights with "
        "fp32 master copies (fp16 with DeepSpeed's dynamic loss scaling; needs a GPU). fp32: no autocast.",
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute transformer blocks in the backward pass to save activation memory.")
    gradient_checkpointing_interval: Annotated[int, Field(ge=1)] = Field(
        default=1,
        description="With gradient_checkpointing: checkpoint every n-th transformer block (blocks 0, n, 2n, ...); "
        "1 = every block. Larger n trades memory for speed (SimpleTuner's gradient_checkpointing_interval).",
    )
    ema: EmaSpec = Field(default_factory=EmaSpec, description="Exponential moving average of the weights (off unless enabled).")
    max_nonfinite_steps: Annotated[int, Field(ge=1)] = Field(
        default=5,
        description="A step whose loss or gradient is NaN/inf is skipped (weights untouched) and counted "
        "(metric nonfinite_steps); this many in a row stop the run, naming the batch's image files.",
    )
    max_grad_norm: Annotated[float, Field(gt=0)] | None = Field(default=1.0, description="Clip the gradient norm (null: no clipping).")
    flow_shift: Annotated[float, Field(gt=0)] = Field(
        default=3.0, description="sigma = shift*u / (1 + (shift-1)*u). Sana 1.6B-1024 was released with 3.0."
    )
    timestep_sampling: TimestepSamplingSpec = Field(default_factory=TimestepSamplingSpec)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        default="none",
        description="Per-sample loss weight as a function of sigma, diffusers' compute_loss_weighting_for_sd3: none "
        "(NVlabs trains Sana unweighted); sigma_sqrt: 1/sigma^2; cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2)). "
        "The eval loss stays unweighted. Formulas: docs/training.md.",
    )
    scheduled_sampling: ScheduledSamplingSpec = Field(
        default_factory=ScheduledSamplingSpec, description="Scheduled sampling (rollout); off by default."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lr_scheduler: LrSchedulerSpec = Field(default_factory=LrSchedulerSpec)
    checkpoint_every: Annotated[int, Field(ge=1)] = Field(default=100, description="Checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: Annotated[int, Field(ge=1)] = Field(default=2, description="How many recent checkpoints Ray keeps.")
    log_every: Annotated[int, Field(ge=1)] = Field(default=1, description="Log metrics to MLflow every N steps.")


class ValidationSpec(Strict):
    prompts: list[str] = Field(default_factory=list, description="Images are generated for these after training (and every `every_steps`).")
    every_steps: Annotated[int, Field(ge=0)] = Field(default=0, description="0: only at the end.")
    resolution: Annotated[int, Field(ge=RESOLUTION_MULTIPLE)] | None = Field(
        default=None, description="Default: the first dataset's resolution."
    )
    num_inference_steps: Annotated[int, Field(ge=1)] = 20
    guidance_scale: Annotated[float, Field(ge=0)] = 4.5
    negative_prompt: str = ""
    seed: int = 0

    @field_validator("resolution")
    @classmethod
    def _multiple_of_32(cls, value: int | None) -> int | None:
        return None if value is None else _check_multiple_of_32(value)


class EvaluationSpec(Strict):
    """Stable evaluation loss on the dataset_type eval datasets (SimpleTuner's "stable eval loss").

    Every eval image is scored with the training objective at the same num_timesteps sigmas (evenly
    spaced in (0, 1), NOT moved by training.flow_shift) with noise fixed by seed, so the numbers are
    comparable between checkpoints and between the trials of a sweep (metric eval_loss).
    """

    enabled: bool | None = Field(
        default=None,
        description="null: evaluate when spec.datasets has a dataset_type eval entry; true: require one (an error "
        "without; so is changing another evaluation setting without one); false: never evaluate.",
    )
    every_steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Evaluate every N optimizer steps (and always at the last step). null: at every checkpoint "
        "(training.checkpoint_every). The checkpoint report (what a sweep's scheduler compares) carries eval_loss "
        "only from an evaluation at that step, so keep N a divisor of checkpoint_every (a sweep compared on eval_loss "
        "refuses any other N).",
    )
    num_timesteps: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=28,
        description="Sigmas each eval image is scored at: (j + 0.5) / num_timesteps for j = 0..num_timesteps-1, "
        "the same for every flow_shift so that runs with different shifts compare. Cost per evaluation: "
        "num_timesteps forward passes per eval image (no backward), split over the workers.",
    )
    seed: int = Field(
        default=0,
        description="Seeds the noise of each (image, sigma); independent of training.seed, rank and worker count, "
        "so trials that differ in training.seed still see the same eval noise.",
    )
    batch_size: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Eval images per forward pass (per worker). null: training.batch_size."
    )


# Hardware profiles and inter-node links live in sana_ray.hardware (pure data, no torch/Ray).
from sana_ray.hardware import INTERCONNECTS as _INTERCONNECTS  # noqa: E402
from sana_ray.hardware import PROFILES as _PROFILES  # noqa: E402

ProfileName = Literal[tuple(_PROFILES)]  # type: ignore[valid-type]
InterconnectName = Literal[tuple(_INTERCONNECTS)]  # type: ignore[valid-type]


class NodePool(Strict):
    """A group of identical nodes (e.g. two 4x RTX 4090 boxes). Workers are placed pool by pool."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")] = Field(description="Names the pool in `sana-ray plan`.")
    count: Annotated[int, Field(ge=1)] = Field(default=1, description="Nodes in the pool.")
    gpus_per_node: Annotated[int, Field(ge=1)] = Field(default=1, description="Training workers per node (one per GPU).")
    profile: ProfileName | None = Field(default=None, description="GPU of these nodes. null: hardware.profile.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels a worker of this pool must run on (Ray label_selector), e.g. "
        "{sana-ray/gpu: rtx4090}; set them with `ray start --labels` or in the KubeRay group (see clusters/).",
    )

    @field_validator("labels")
    @classmethod
    def _ray_label_syntax(cls, value: dict[str, str]) -> dict[str, str]:
        # Ray's (and Kubernetes') label rules: [prefix/]name, each part alphanumeric with - _ . inside.
        part = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
        for key, val in value.items():
            prefix, _, name = key.rpartition("/")
            if not re.fullmatch(part, name) or (prefix and not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", prefix)):
                raise ValueError(f"label key '{key}' is not a valid Ray/Kubernetes label key (e.g. sana-ray/gpu)")
            if key.startswith("ray.io/"):
                raise ValueError(f"label key '{key}': the ray.io/ prefix is reserved for Ray's own labels")
            if val and not re.fullmatch(part, val):
                raise ValueError(f"label '{key}': value '{val}' must be alphanumeric with - _ . inside, at most 63 characters")
        return value

    @property
    def workers(self) -> int:
        return self.count * self.gpus_per_node


def _hardware_defaults(data):
    """Fill num_workers from the pools and use_gpu from the profiles when the manifest leaves them out."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    nodes = data.get("nodes")
    if "num_workers" not in data and isinstance(nodes, list) and nodes:
        try:
            data["num_workers"] = sum(int(n.get("count", 1)) * int(n.get("gpus_per_node", 1)) for n in nodes)
        except (AttributeError, TypeError, ValueError, OverflowError):
            pass  # a malformed pool: its own validation error says what is wrong
    if "use_gpu" not in data:
        names = [data.get("profile")] + [n.get("profile") for n in nodes or [] if isinstance(n, dict)]
        profiles = [_PROFILES[n] for n in names if isinstance(n, str) and n in _PROFILES]
        if profiles:
            data["use_gpu"] = any(p.gpu for p in profiles)
    return data


class DeepSpeedSpec(Strict):
    """DeepSpeed ZeRO settings; sana-ray builds the DeepSpeed config from the manifest, then merges `overrides`."""

    stage: Literal[1, 2, 3] = Field(
        default=2,
        description="ZeRO stage: 1 partitions optimizer states, 2 also gradients, 3 also the weights (each worker "
        "holds 1/N of everything; the full weights are gathered for export).",
    )
    offload_optimizer: bool = Field(default=False, description="Keep optimizer states (and their step) in CPU memory.")
    offload_params: bool = Field(default=False, description="Keep the partitioned weights in CPU memory (stage 3 only).")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="For experts: raw DeepSpeed config keys deep-merged over the generated config (e.g. "
        "{zero_optimization: {reduce_bucket_size: 50000000}}). Batch sizes, precision and clipping come from "
        "`training` and cannot be overridden here.",
    )

    @field_validator("overrides")
    @classmethod
    def _plain_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        """DeepSpeed reads a JSON config: string keys, finite numbers (the YAML loader has already
        refused recursive aliases, so this walk ends)."""
        def visit(node: Any, where: str) -> None:
            if isinstance(node, dict):
                for key, child in node.items():
                    if not isinstance(key, str):
                        raise ValueError(f"overrides{where}: the key {key!r} must be a string; put quotes around it")
                    visit(child, f"{where}.{key}")
            elif isinstance(node, list):
                for i, child in enumerate(node):
                    visit(child, f"{where}[{i}]")
            elif isinstance(node, float) and not math.isfinite(node):
                raise ValueError(f"overrides{where} is {node}; DeepSpeed's config takes finite numbers only")
            elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > INT_MAX:
                raise ValueError(f"overrides{where} is too large; integers here are at most {INT_MAX}")
            elif node is not None and not isinstance(node, (str, int, float, bool)):
                raise ValueError(f"overrides{where}: {type(node).__name__} is not a JSON value; use strings, numbers, "
                                 "true/false, lists and mappings")

        visit(value, "")
        return value

    @model_validator(mode="after")
    def _offload_params_needs_stage_3(self) -> "DeepSpeedSpec":
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params needs stage 3 (the weights are only partitioned there), not stage {self.stage}")
        reserved = sorted(set(self.overrides) & _DEEPSPEED_RESERVED)
        if reserved:
            raise ValueError(f"overrides must not set {', '.join(reserved)}: they come from the training section")
        return self


_DEEPSPEED_RESERVED = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "fp16", "optimizer", "scheduler",
}


class HardwareSpec(Strict):
    num_workers: Annotated[int, Field(ge=1)] = Field(default=1, description="Ray Train workers (one per GPU).")
    use_gpu: bool = Field(default=False, description="Give each worker a GPU.")
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    strategy: Literal["ddp", "deepspeed", "auto"] = Field(
        default="ddp",
        description="ddp: torch DistributedDataParallel (every worker holds the whole model, optimizer and "
        "gradients); deepspeed: DeepSpeed ZeRO, configured by `deepspeed` below; auto: what `sana-ray plan` "
        "finds fastest among those that fit the hardware profile (ddp or a ZeRO stage, with offload if needed), "
        "decided when the run starts and recorded in the run's manifest.yaml (needs hardware.profile or the "
        "pools' profiles on GPUs).",
    )
    deepspeed: DeepSpeedSpec = Field(
        default_factory=DeepSpeedSpec, description="Used when strategy is deepspeed (auto sets stage and offload; overrides are kept)."
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join (e.g. 'auto' or ray://host:10001). null: start a local Ray on 127.0.0.1.",
    )
    cache_workers: Annotated[int, Field(ge=1)] = Field(default=1, description="Encoder actors that build the caches.")
    prefetch_batches: Annotated[int, Field(ge=0, le=64)] = Field(
        default=2,
        description="Micro-batches each training worker reads ahead from the cache (and VAE-encodes ahead, for "
        "cache_latents: false datasets) in a background thread while the current step runs. 0: read in the loop.",
    )
    max_failures: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Restart the workers from the latest checkpoint this many times when one dies "
        "(preempted node, out of memory) before giving up.",
    )
    profile: ProfileName | None = Field(
        default=None,
        description="GPU every worker runs on (rtx4090, a6000, l40s, a100-40g, a100-80g, h100, h200, cpu; see "
        "docs/hardware.md). Sets NCCL variables, implies use_gpu, and is what `sana-ray plan` sizes against. "
        "null: no profile (NCCL defaults; `sana-ray plan` then needs --profile unless use_gpu is false).",
    )
    nodes: list[NodePool] = Field(
        default_factory=list,
        description="Node pools (count, gpus_per_node, profile, labels). When given, num_workers is their total "
        "GPUs and each worker is placed on its pool's labelled nodes. Empty: num_workers workers anywhere.",
    )
    interconnect: InterconnectName | None = Field(
        default=None,
        description="Link between nodes (ethernet-10g/25g/40g/100g/200g/400g, infiniband-edr/hdr/ndr, roce-100g/"
        "200g/400g). Without InfiniBand/RoCE, NCCL_IB_DISABLE=1 is set. null: the profile's typical link (plan says so).",
    )
    interconnect_gbps: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Line rate per node in Gbit/s when it differs from the named link's (e.g. 8 NICs: 1600)."
    )
    nccl_socket_ifname: str | None = Field(
        default=None,
        description="Network interface(s) NCCL and gloo use between nodes (NCCL_SOCKET_IFNAME, e.g. 'eth0' or '^lo,docker').",
    )
    nccl_env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra NCCL_* variables for every training worker; they override the profile's (e.g. {NCCL_DEBUG: INFO}).",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each training worker requests, e.g. {rtx4090: 1} for nodes started with "
        "`ray start --resources '{\"rtx4090\": 4}'` (another way to pin workers to a node type).",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data):
        return _hardware_defaults(data)

    @field_validator("ray_address")
    @classmethod
    def _no_credentials_in_address(cls, value: str | None) -> str | None:
        found = uri_credentials(value) if value else None
        if found:
            raise ValueError(f"must not contain {found}; Ray authenticates with RAY_AUTH_TOKEN from the environment")
        return value

    @field_validator("nccl_env")
    @classmethod
    def _nccl_keys(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in value if not k.startswith("NCCL_"))
        if bad:
            raise ValueError(f"keys must be NCCL_* variables; not: {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _consistent_hardware(self) -> "HardwareSpec":
        names = [p.name for p in self.nodes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"nodes: pool names must be unique; repeated: {', '.join(repeated)}")
        for i, pool in enumerate(self.nodes):
            if pool.profile is None and self.profile is None:
                raise ValueError(f"nodes.{i}.profile is not set and neither is hardware.profile; set one (e.g. rtx4090)")
        if self.nodes:
            total = sum(p.workers for p in self.nodes)
            if self.num_workers != total:
                shape = " + ".join(f"{p.count}x{p.gpus_per_node}" for p in self.nodes)
                raise ValueError(
                    f"num_workers is {self.num_workers} but the node pools hold {shape} = {total} GPUs; "
                    f"set num_workers: {total} or leave it out to derive it from nodes"
                )
        for name in self.profile_names():
            gpu = _PROFILES[name].gpu
            if gpu and not self.use_gpu:
                raise ValueError(f"use_gpu is false but profile '{name}' is a GPU; set use_gpu: true (or leave it out)")
            if not gpu and self.use_gpu:
                raise ValueError("use_gpu is true but profile 'cpu' has no GPU; set use_gpu: false or a GPU profile")
        return self

    def profile_names(self) -> list[str]:
        """The profiles this run uses (pools first, else hardware.profile), without repeats."""
        names = [p.profile or self.profile for p in self.nodes] or ([self.profile] if self.profile else [])
        return list(dict.fromkeys(n for n in names if n))


class TrackingSpec(Strict):
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow store. null: sqlite:///<output.dir>/mlflow.db (a local file next to your runs). "
        "Credentials come from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD), never from here.",
    )
    experiment: str = "sana-ray"

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        found = uri_credentials(value) if value else None
        if found:
            raise ValueError(
                f"must not contain {found}; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN) in the environment instead (a database store: the driver's own, e.g. "
                "PGPASSWORD or ~/.pgpass)"
            )
        return value


class OutputSpec(Strict):
    dir: Path = Field(default=Path("runs"), description="Parent folder; the run writes to <dir>/<metadata.name>. Relative to the manifest.")
    cache_dir: Path | None = Field(
        default=None, description="Latent and text-embedding caches. null: <dir>/cache (shared by runs under dir)."
    )
    allow_system_dirs: bool = Field(
        default=False,
        description="Allow output.dir and the cache folders to be the filesystem root or inside a system folder "
        "(/etc, /usr, /var, /bin, /boot, /dev, /proc, /sys, /run, /lib, /sbin; /var/tmp and your home folder are "
        "fine). false: such a folder (often a ../../.. too many) is refused.",
    )


class Spec(Strict):
    model: ModelSpec
    datasets: Annotated[list[DatasetSpec], Field(min_length=1)]
    training: TrainingSpec
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec,
        description="Stable evaluation loss on the dataset_type eval datasets (metric eval_loss); on by default when there are any.",
    )
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="after")
    def _unique_dataset_names(self) -> "Spec":
        names = [d.name for d in self.datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _evaluation_needs_eval_datasets(self) -> "Spec":
        if self._eval_dataset_names() or self.evaluation.enabled is False:
            return self
        if self.evaluation.enabled:
            raise ValueError(
                "evaluation.enabled is true but no enabled dataset has dataset_type: eval; add a held-out dataset "
                "with dataset_type: eval to spec.datasets, or remove evaluation.enabled"
            )
        # Settings that differ from the defaults ask for an evaluation too (compared with the defaults,
        # not "was it written": a resolved manifest spells out every default).
        fields = EvaluationSpec.model_fields
        asked = [k for k in fields if k != "enabled" and getattr(self.evaluation, k) != fields[k].get_default(call_default_factory=True)]
        if asked:
            raise ValueError(
                f"evaluation.{asked[0]} is set but no enabled dataset has dataset_type: eval, so nothing is evaluated; "
                f"add a held-out dataset with dataset_type: eval to spec.datasets, or set evaluation.enabled: false"
            )
        return self

    @model_validator(mode="after")
    def _text_dtype_fits_training(self) -> "Spec":
        if self.model.text_embeds_dtype == "bfloat16" and not self.bf16_training():
            raise ValueError(
                "model.text_embeds_dtype is bfloat16 but training does not compute in bf16 (training.mixed_precision "
                f"{self.training.mixed_precision}{', no GPU' if not self.hardware.use_gpu else ''}): the embeddings would lose "
                "precision the model can use. Set model.text_embeds_dtype: auto (or float32), or training.mixed_precision: bf16"
            )
        return self

    def bf16_training(self) -> bool:
        """Whether the transformer computes in bf16: mixed_precision bf16, or auto on GPUs (every GPU profile
        here supports bf16; train.strategy.compute_dtype decides on the device itself)."""
        precision = self.training.mixed_precision
        return precision == "bf16" or (precision == "auto" and self.hardware.use_gpu)

    def _eval_dataset_names(self) -> list[str]:
        return [d.name for d in self.datasets if d.dataset_type == "eval" and not d.disabled]

    def evaluation_datasets(self) -> list[str]:
        """Names of the datasets the stable eval loss is computed on (empty: the run does not evaluate)."""
        return [] if self.evaluation.enabled is False else self._eval_dataset_names()


class Manifest(Strict):
    apiVersion: Literal["sana-ray/v1"]
    kind: Literal["TrainingRun"]
    metadata: Metadata
    spec: Spec
