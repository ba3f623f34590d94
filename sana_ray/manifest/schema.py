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

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

API_VERSION = "sana-ray/v1"

# Sana's DC-AE downsamples images 32x; the tiny preset's VAE downsamples 4x. Resolutions are
# multiples of 32 so that one rule holds for both.
RESOLUTION_MULTIPLE = 32


class Strict(BaseModel):
    """Base for every manifest section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Metadata(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")] = Field(
        description="Run name: lower-case letters, digits, '.', '_' and '-' (like a Kubernetes name). "
        "Names the MLflow run and the output folder.",
    )
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form tags, copied to MLflow.")


class ModelSpec(Strict):
    pretrained: str = Field(
        description="A Hugging Face hub id (e.g. Efficient-Large-Model/Sana_1600M_1024px_diffusers), a "
        "local diffusers folder, or 'tiny' for small RANDOM Sana components built from configs "
        "(for the quickstart and tests; it learns nothing useful).",
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


CaptionStrategy = Literal["textfile", "filename", "instanceprompt"]


def _check_multiple_of_32(value: int) -> int:
    if value % RESOLUTION_MULTIPLE:
        lower = value // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE
        raise ValueError(
            f"must be a multiple of {RESOLUTION_MULTIPLE} (the DC-AE downsamples 32x); "
            f"try {lower or RESOLUTION_MULTIPLE} or {lower + RESOLUTION_MULTIPLE}"
        )
    return value


class DatasetSpec(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")]
    path: Path = Field(description="Folder of images (searched recursively). Relative paths are relative to the manifest.")
    caption_strategy: CaptionStrategy = Field(
        default="textfile",
        description="textfile: a sibling .txt per image; filename: the cleaned file name; "
        "instanceprompt: instance_prompt for every image.",
    )
    instance_prompt: str | None = None
    resolution: Annotated[int, Field(ge=RESOLUTION_MULTIPLE)] = Field(
        default=1024, description="Training size in pixels (a multiple of 32): images are resized so the short edge matches."
    )
    crop: bool = Field(default=True, description="Centre-crop to a square resolution x resolution.")
    repeats: Annotated[int, Field(ge=0)] = Field(default=0, description="Extra passes over this dataset per epoch (0 = seen once).")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        return _check_multiple_of_32(value)

    @model_validator(mode="after")
    def _instance_prompt_needed(self) -> "DatasetSpec":
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError("caption_strategy 'instanceprompt' needs instance_prompt to be set")
        return self


class OptimizerSpec(Strict):
    name: Literal["adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    eps: Annotated[float, Field(gt=0)] = 1e-8


class LrSchedulerSpec(Strict):
    name: Literal["constant"] = Field(default="constant", description="Linear warm-up, then constant.")
    warmup_steps: Annotated[int, Field(ge=0)] = 0


class TimestepSamplingSpec(Strict):
    """How u in [0, 1] is drawn before the flow shift (SD3 / Sana use logit-normal)."""

    scheme: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: Annotated[float, Field(gt=0)] = 1.0


class TrainingSpec(Strict):
    steps: Annotated[int, Field(ge=1)] = Field(description="Optimizer steps to train.")
    batch_size: Annotated[int, Field(ge=1)] = Field(default=1, description="Samples per worker per micro-batch.")
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    seed: int = 42
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 autocast on a GPU that supports it, fp32 otherwise (and always on CPU)."
    )
    gradient_checkpointing: bool = False
    max_grad_norm: Annotated[float, Field(gt=0)] | None = Field(default=1.0, description="Clip the gradient norm (null: no clipping).")
    flow_shift: Annotated[float, Field(gt=0)] = Field(
        default=3.0, description="sigma = shift*u / (1 + (shift-1)*u). Sana 1.6B-1024 was released with 3.0."
    )
    timestep_sampling: TimestepSamplingSpec = Field(default_factory=TimestepSamplingSpec)
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


class HardwareSpec(Strict):
    num_workers: Annotated[int, Field(ge=1)] = Field(default=1, description="Ray Train workers (one per GPU).")
    use_gpu: bool = Field(default=False, description="Give each worker a GPU.")
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    strategy: Literal["ddp"] = "ddp"
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join (e.g. 'auto' or ray://host:10001). null: start a local Ray on 127.0.0.1.",
    )
    cache_workers: Annotated[int, Field(ge=1)] = Field(default=1, description="Encoder actors that build the caches.")
    max_failures: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Restart the workers from the latest checkpoint this many times when one dies "
        "(preempted node, out of memory) before giving up.",
    )


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
        if value and re.match(r"^[a-z+]+://[^/@]+:[^/@]+@", value):
            raise ValueError(
                "must not contain a password; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment instead"
            )
        return value


class OutputSpec(Strict):
    dir: Path = Field(default=Path("runs"), description="Parent folder; the run writes to <dir>/<metadata.name>. Relative to the manifest.")
    cache_dir: Path | None = Field(
        default=None, description="Latent and text-embedding caches. null: <dir>/cache (shared by runs under dir)."
    )


class Spec(Strict):
    model: ModelSpec
    datasets: Annotated[list[DatasetSpec], Field(min_length=1)]
    training: TrainingSpec
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
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


class Manifest(Strict):
    apiVersion: Literal["sana-ray/v1"]
    kind: Literal["TrainingRun"]
    metadata: Metadata
    spec: Spec
