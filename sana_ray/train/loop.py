"""The training loop each Ray Train worker runs.

One readable loop, top to bottom: load the cached data and the transformer, restore the latest
checkpoint if Ray hands us one, then per optimizer step draw ``gradient_accumulation_steps``
micro-batches, compute the rectified-flow loss, clip, step, log, and checkpoint every
``checkpoint_every`` steps. At the end rank 0 exports the diffusers pipeline and renders the
validation prompts.

Determinism: the data order is a function of (seed, micro-batch index) (``data.sampler``) and
the noise / timesteps of micro-batch ``i`` on rank ``r`` come from a generator seeded by
(seed, r, i). A resumed run therefore sees exactly the batches and noise the uninterrupted run
would have seen, with no RNG state to save.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sana_ray.manifest.schema import Manifest
from sana_ray.train import checkpoint as ckpt
from sana_ray.train.optim import build_lr_scheduler, build_optimizer


@dataclass
class WorkerConfig:
    """Everything a worker needs, passed through Ray as a plain dict."""

    manifest: dict  # the resolved manifest, JSON mode
    model_source: str  # local diffusers folder or hub id (``tiny`` already resolved)
    cache: object  # data.cache.CacheSet
    run_dir: str
    fingerprint: str
    mlflow_tracking_uri: str
    mlflow_run_id: str

    def to_dict(self) -> dict:
        return asdict(self) | {"cache": self.cache}


def micro_batch_seed(seed: int, rank: int, micro_batch: int) -> int:
    """A 63-bit seed for the noise and timesteps of one micro-batch on one rank."""
    digest = hashlib.sha256(f"sana-ray-noise:{seed}:{rank}:{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU that supports it; fp32 (no autocast) otherwise and always on CPU."""
    if device.type != "cuda" or mixed_precision == "fp32":
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if mixed_precision == "bf16":
        raise RuntimeError("mixed_precision: bf16 was requested but this GPU does not support bf16; use fp32")
    return None


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from sana_ray.data.cache import load_cache
    from sana_ray.launch.tracking import RunLogger
    from sana_ray.model.flow import flow_matching_loss, sample_u, shift_sigmas
    from sana_ray.model.loading import load_transformer

    cfg = WorkerConfig(**config)
    spec = Manifest.model_validate(cfg.manifest).spec
    training = spec.training
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.hardware.cpus_per_worker)))
    amp_dtype = autocast_dtype(training.mixed_precision, device)
    accumulation = training.gradient_accumulation_steps

    # --- data: every worker holds the (small) cached latents and embeddings; the plan decides
    # which samples each rank trains on at each micro-batch.
    data = load_cache(cfg.cache)
    plan = cfg.cache.batch_plan(training.batch_size, world_size, training.seed)

    # --- model, optimizer, schedule; restore before wrapping in DDP.
    transformer = load_transformer(cfg.model_source, revision=spec.model.revision, variant=spec.model.variant)
    transformer.to(device)
    if training.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = build_optimizer(transformer.parameters(), training)
    lr_scheduler = build_lr_scheduler(optimizer, training)
    state = ckpt.TrainState(step=0, micro_batches=0, fingerprint=cfg.fingerprint, loss=math.nan)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            state = ckpt.load(Path(folder), model=transformer, optimizer=optimizer, lr_scheduler=lr_scheduler, device=device)
        if rank == 0:
            print(f"[sana-ray] resuming from step {state.step} (checkpoint {restored.path})", flush=True)
    model = ray.train.torch.prepare_model(transformer, move_to_device=False)

    logger = RunLogger(cfg.mlflow_tracking_uri, cfg.mlflow_run_id) if rank == 0 else None
    run_dir = Path(cfg.run_dir)
    samples_per_step = training.batch_size * world_size * accumulation

    while state.step < training.steps:
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for k in range(accumulation):
            micro_batch = state.micro_batches + k
            batch = data.batch(plan.batch(micro_batch, rank))
            latents = batch["latents"].to(device)  # [B, C, h, w], already scaled by the VAE's scaling_factor
            prompt_embeds = batch["prompt_embeds"].to(device)  # [B, L, C_text]
            prompt_mask = batch["prompt_attention_mask"].to(device)  # [B, L]
            generator = torch.Generator(device="cpu").manual_seed(micro_batch_seed(training.seed, rank, micro_batch))
            sampling = training.timestep_sampling
            u = sample_u(
                latents.shape[0],
                scheme=sampling.scheme,
                logit_mean=sampling.logit_mean,
                logit_std=sampling.logit_std,
                generator=generator,
                device="cpu",
            )
            sigmas = shift_sigmas(u, training.flow_shift).to(device)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            # DDP all-reduces on every backward unless told not to; only the last micro-batch
            # of an accumulation window needs it.
            sync = k == accumulation - 1 or world_size == 1
            with contextlib.ExitStack() as stack:
                if not sync:
                    stack.enter_context(model.no_sync())
                if amp_dtype is not None:
                    stack.enter_context(torch.autocast(device.type, dtype=amp_dtype))
                loss = flow_matching_loss(model, latents, prompt_embeds, prompt_mask, sigmas=sigmas, noise=noise)
                (loss / accumulation).backward()
            loss_sum += loss.detach()

        max_norm = training.max_grad_norm if training.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        lr = lr_scheduler.get_last_lr()[0]
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.micro_batches += accumulation

        mean_loss = loss_sum / accumulation
        if world_size > 1:
            torch.distributed.all_reduce(mean_loss, op=torch.distributed.ReduceOp.AVG)
        state.loss = float(mean_loss)
        step_time = time.perf_counter() - started

        if logger is not None and (state.step % training.log_every == 0 or state.step == training.steps):
            metrics = {
                "loss": state.loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "step_time_s": step_time,
                "samples_per_s": samples_per_step / step_time,
            }
            logger.log_metrics(metrics, step=state.step)
            print(
                f"[sana-ray] step {state.step}/{training.steps}  loss {state.loss:.4f}  lr {lr:.2e}  "
                f"grad_norm {float(grad_norm):.3f}  {samples_per_step / step_time:.1f} samples/s",
                flush=True,
            )

        if state.step % training.checkpoint_every == 0 or state.step == training.steps:
            _report_checkpoint(rank, transformer, optimizer, lr_scheduler, state)

        if (
            rank == 0
            and spec.validation.prompts
            and spec.validation.every_steps
            and state.step % spec.validation.every_steps == 0
            and state.step < training.steps
        ):
            _validate(transformer, spec, cfg, device, run_dir / "validation" / f"step-{state.step:06d}", logger, state.step)

    if rank == 0:
        _finish(transformer, spec, cfg, device, run_dir, logger, state.step)


def _report_checkpoint(rank: int, transformer, optimizer, lr_scheduler, state: ckpt.TrainState) -> None:
    """Every rank reports (Ray's report is a barrier); rank 0 attaches the checkpoint.

    DDP keeps the weights identical on every rank, so one copy is the whole model.
    """
    import ray.train

    metrics = {"step": state.step, "loss": state.loss}
    name = f"checkpoint-{state.step:06d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    if not math.isfinite(state.loss):
        raise FloatingPointError(f"loss is {state.loss} at step {state.step}: refusing to checkpoint non-finite weights")
    with tempfile.TemporaryDirectory(prefix="sana-ray-ckpt-") as folder:
        ckpt.save(Path(folder), model=transformer, optimizer=optimizer, lr_scheduler=lr_scheduler, state=state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def _validation_resolution(spec) -> int:
    return spec.validation.resolution or spec.datasets[0].resolution


def _validate(transformer, spec, cfg: WorkerConfig, device, out_dir: Path, logger, step: int) -> None:
    from sana_ray.model.loading import load_pipeline
    from sana_ray.train.validation import render

    was_training = transformer.training
    transformer.eval()
    pipeline = load_pipeline(cfg.model_source, transformer=transformer, revision=spec.model.revision, variant=spec.model.variant)
    pipeline.to(device)
    render(pipeline, spec.validation, resolution=_validation_resolution(spec), out_dir=out_dir, device=device)
    if logger is not None:
        logger.log_artifacts(out_dir, f"validation/step-{step:06d}")
    transformer.train(was_training)


def _finish(transformer, spec, cfg: WorkerConfig, device, run_dir: Path, logger, step: int) -> None:
    """Rank 0: export the pipeline, then validate *from the export*, proving it loads and generates."""
    from sana_ray.model.loading import load_pipeline
    from sana_ray.train.export import export_pipeline
    from sana_ray.train.validation import render

    export_dir = run_dir / "model"
    print(f"[sana-ray] exporting diffusers pipeline to {export_dir}", flush=True)
    export_pipeline(transformer.cpu(), base_source=cfg.model_source, out_dir=export_dir,
                    revision=spec.model.revision, variant=spec.model.variant)
    if not spec.validation.prompts:
        return
    print(f"[sana-ray] rendering {len(spec.validation.prompts)} validation prompt(s)", flush=True)
    pipeline = load_pipeline(str(export_dir)).to(device)
    out_dir = run_dir / "validation" / f"step-{step:06d}"
    render(pipeline, spec.validation, resolution=_validation_resolution(spec), out_dir=out_dir, device=device)
    if logger is not None:
        logger.log_artifacts(out_dir, f"validation/step-{step:06d}")
