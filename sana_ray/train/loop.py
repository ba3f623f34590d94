"""The training loop each Ray Train worker runs.

One readable loop, top to bottom: load the cached data and the transformer, hand it to the
strategy (DDP or DeepSpeed ZeRO, ``train.strategy``; the loop does not know which), restore the
latest checkpoint if Ray hands us one, then per optimizer step draw ``gradient_accumulation_steps``
micro-batches, compute the rectified-flow loss, step (clipping; a non-finite step is skipped and
counted), update the EMA, log, compute the stable eval loss on the held-out eval datasets
(``train.evaluation``; by default at every checkpoint, and reported with it), and checkpoint every
``checkpoint_every`` steps. At the end every rank helps gather the weights (the EMA's with
``ema.use_for_export``), rank 0 exports the diffusers pipeline and renders the validation prompts
from the export.

Determinism: the data order is a function of (seed, micro-batch index) (``data.sampler``) and
the noise / timesteps of micro-batch ``i`` on rank ``r`` come from a generator seeded by
(seed, r, i). A resumed run therefore sees exactly the batches and noise the uninterrupted run
would have seen, with no RNG state to save.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sana_ray.manifest.schema import Manifest
from sana_ray.train import checkpoint as ckpt
from sana_ray.train.activations import enable_gradient_checkpointing
from sana_ray.train.ema import EMA
from sana_ray.train.evaluation import build_evaluator, eval_due
from sana_ray.train.nonfinite import NonFiniteGuard
from sana_ray.train.optim import build_lr_scheduler, build_optimizer
from sana_ray.train.strategy import build_strategy


@dataclass
class WorkerConfig:
    """Everything a worker needs, passed through Ray as a plain dict."""

    manifest: dict  # the resolved manifest, JSON mode
    model_source: str  # local diffusers folder or hub id (``tiny`` already resolved)
    cache: object  # data.cache.CacheSet (its eval_sets: the dataset_type eval datasets, never trained on)
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


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from sana_ray.data.cache import Prefetcher, open_reader
    from sana_ray.launch.tracking import RunLogger
    from sana_ray.model.flow import flow_matching_loss, sample_u, shift_sigmas
    from sana_ray.model.loading import load_transformer
    from sana_ray.model.rollout import plan_rollout

    cfg = WorkerConfig(**config)
    spec = Manifest.model_validate(cfg.manifest).spec
    training = spec.training
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.hardware.cpus_per_worker)))
    accumulation = training.gradient_accumulation_steps

    # --- data: the worker holds only the sample index; each micro-batch's rows are read from the
    # cache's shard files on demand (data.cache.reader), which checks here, before anything else
    # loads, that this node sees every shard. Samples of cache_latents: false datasets are loaded
    # and VAE-encoded per batch, with the run's VAE, loaded once (on first use) and only when the
    # run has such samples. The plan decides which samples each rank trains on at each micro-batch.
    data = open_reader(cfg.cache, encoder=lambda: _online_encoder(cfg.model_source, spec, device))
    plan = cfg.cache.batch_plan(training.batch_size, world_size, training.seed)

    # --- model, optimizer, schedule, strategy (DDP or DeepSpeed ZeRO), EMA; then restore.
    transformer = load_transformer(cfg.model_source, revision=spec.model.revision, variant=spec.model.variant)
    transformer.to(device)
    if training.gradient_checkpointing:
        enable_gradient_checkpointing(transformer, training.gradient_checkpointing_interval)
    transformer.train()
    optimizer = build_optimizer(transformer.parameters(), training)
    lr_scheduler = build_lr_scheduler(optimizer, training)
    strategy = build_strategy(training, spec.hardware, device, world_size)
    strategy.prepare(transformer, optimizer, lr_scheduler)
    ema = EMA(strategy.local_weights(), training.ema, sharded=strategy.shards_weights) if training.ema.enabled else None
    state = ckpt.TrainState(step=0, micro_batches=0, fingerprint=cfg.fingerprint, loss=math.nan)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            state = ckpt.load(Path(folder), strategy=strategy, ema=ema, rank=rank)
        if rank == 0:
            print(f"[sana-ray] resuming from step {state.step} (checkpoint {restored.path})", flush=True)
    guard = NonFiniteGuard(training.max_nonfinite_steps, total=state.nonfinite_steps, in_a_row=state.nonfinite_in_a_row)
    # Stable eval loss on the held-out sets (None when the run has none or evaluation.enabled is false).
    evaluator = build_evaluator(spec, getattr(cfg.cache, "eval_sets", {}), rank=rank, world_size=world_size, device=device)

    logger = RunLogger(cfg.mlflow_tracking_uri, cfg.mlflow_run_id) if rank == 0 else None
    run_dir = Path(cfg.run_dir)
    samples_per_step = training.batch_size * world_size * accumulation
    # Reads the micro-batches from here to the end in a background thread, in the loop's order.
    # Its key per batch, (seed, rank, micro-batch), decides which caption line and whether caption dropout fires.
    batches = Prefetcher(data, plan, rank=rank, seed=training.seed, start=state.micro_batches,
                         stop=training.steps * accumulation, depth=spec.hardware.prefetch_batches,
                         pin_memory=device.type == "cuda")
    unreadable = 0

    while state.step < training.steps:
        started = time.perf_counter()
        waited = batches.wait_s
        first_micro_batch = state.micro_batches
        loss_sum = torch.zeros((), device=device)
        rollout_forwards = 0
        for k in range(accumulation):
            micro_batch = first_micro_batch + k
            batch = batches.get(micro_batch)
            copy = {"device": device, "non_blocking": device.type == "cuda"}
            latents = batch["latents"].to(**copy)  # [B, C, h, w] float32, already times the VAE's scaling_factor
            # [B, L, C_text] in the cache's dtype (bf16 for bf16 training): float32 here, which the
            # bf16 autocast's caption_projection casts back exactly (model.text_embeds_dtype).
            prompt_embeds = batch["prompt_embeds"].to(**copy).float()
            prompt_mask = batch["prompt_attention_mask"].to(**copy)  # [B, L] int64
            generator = torch.Generator(device="cpu").manual_seed(micro_batch_seed(training.seed, rank, micro_batch))
            sampling = training.timestep_sampling
            u = sample_u(
                latents.shape[0],
                scheme=sampling.scheme,
                logit_mean=sampling.logit_mean,
                logit_std=sampling.logit_std,
                mode_scale=sampling.mode_scale,
                generator=generator,
                device="cpu",
            )
            sigmas = shift_sigmas(u, training.flow_shift).to(device)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            # Objective extras (model.flow): present in the batch only when they change the loss; a
            # rollout plan only when a sample rolls out. Without them the loss is the plain MSE, exactly.
            loss_mask = batch["loss_mask"].to(**copy) if "loss_mask" in batch else None  # [B, 1, h, w]
            sample_weights = batch["loss_weight"].to(**copy) if "loss_weight" in batch else None  # [B]
            rollout = plan_rollout(training.scheduled_sampling, seed=training.seed, micro_batch=micro_batch,
                                   step=state.step, batch_size=latents.shape[0])
            rollout_forwards += rollout.forward_calls if rollout is not None else 0
            # The strategy handles gradient sync (DDP no_sync / ZeRO boundaries) and autocast.
            with strategy.micro_batch(last=k == accumulation - 1):
                loss = flow_matching_loss(strategy.model, latents, prompt_embeds, prompt_mask, sigmas=sigmas, noise=noise,
                                          loss_mask=loss_mask, sample_weights=sample_weights,
                                          weighting=training.loss_weighting,
                                          rollout_steps=rollout.steps if rollout is not None else None)
                strategy.backward(loss)
            loss_sum += loss.detach().float()

        lr = strategy.lr()
        result = strategy.step()  # clip; skip a non-finite gradient; advance the lr schedule
        state.step += 1
        state.micro_batches += accumulation

        mean_loss = loss_sum / accumulation
        if world_size > 1:
            torch.distributed.all_reduce(mean_loss, op=torch.distributed.ReduceOp.AVG)
        state.loss = float(mean_loss)
        skipped = guard.observe(
            state.step, state.loss, result.applied, strategy.loss_scaling,
            batch_files=lambda: _batch_files(cfg.cache, plan, first_micro_batch, accumulation, world_size),
        )
        state.nonfinite_steps, state.nonfinite_in_a_row = guard.total, guard.in_a_row
        if ema is not None:
            ema.update(strategy.local_weights(), state.step)
        step_time = time.perf_counter() - started

        if logger is not None and (state.step % training.log_every == 0 or state.step == training.steps or skipped):
            metrics = {
                "loss": state.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "step_time_s": step_time,
                "samples_per_s": samples_per_step / step_time,
                "data_wait_s": batches.wait_s - waited,  # this step's wait for the prefetcher (rank 0)
                "nonfinite_steps": guard.total,
            }
            if training.scheduled_sampling.enabled:  # this step's extra forward passes (the same on every rank)
                metrics["rollout_forwards"] = rollout_forwards
            if len(data.unreadable) != unreadable:  # online images that could not be loaded (skipped)
                unreadable = len(data.unreadable)
                metrics["unreadable_images"] = unreadable
            logger.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=state.step)
            print(
                f"[sana-ray] step {state.step}/{training.steps}  loss {state.loss:.4f}  lr {lr:.2e}  "
                f"grad_norm {result.grad_norm:.3f}  {samples_per_step / step_time:.1f} samples/s"
                + ("  (non-finite: skipped)" if skipped else ""),
                flush=True,
            )

        # Before the checkpoint, so that its report (what a sweep's scheduler compares) carries it.
        eval_metrics: dict[str, float] = {}
        if evaluator is not None and eval_due(state.step, spec):
            evaluated = evaluator.evaluate(strategy.model, strategy.module, strategy.autocast)  # every rank
            eval_metrics = evaluated.report_metrics()
            if logger is not None:
                items = list(evaluated.mlflow_metrics().items())
                for start in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
                    logger.log_metrics(dict(items[start : start + 1000]), step=state.step)
                print(f"[sana-ray] step {state.step}/{training.steps}  eval_loss {evaluated.loss:.4f}  "
                      f"({len(evaluated.sigmas)} sigmas, {sum(d.samples for d in evaluated.datasets)} images, "
                      f"{evaluated.seconds:.1f} s)", flush=True)

        if state.step % training.checkpoint_every == 0 or state.step == training.steps:
            _report_checkpoint(rank, strategy, ema, state, eval_metrics)
        _injected_fault(state.step, run_dir)
        _injected_hold(state.step)

        if (
            spec.validation.prompts
            and spec.validation.every_steps
            and state.step % spec.validation.every_steps == 0
            and state.step < training.steps
        ):
            weights = _export_weights(strategy, ema, use_ema=False)  # every rank: ZeRO-3 gathers
            if rank == 0:
                _validate(_plain_transformer(strategy, weights), spec, cfg, device,
                          run_dir / "validation" / f"step-{state.step:06d}", logger, state.step)

    batches.close()
    data.close()
    weights = _export_weights(strategy, ema, use_ema=ema is not None and training.ema.use_for_export)
    if rank == 0:
        _finish(_plain_transformer(strategy, weights), spec, cfg, device, run_dir, logger, state.step)


def _online_encoder(model_source: str, spec, device: torch.device):
    """The VAE for online latents (cache_latents: false), as the cache's encoder actors load it:
    float32, eval mode, no grad, latents times the VAE's scaling_factor (model.latents.LatentEncoder)."""
    from sana_ray.data.cache.build import ENCODE_DTYPE
    from sana_ray.model.latents import LatentEncoder

    return LatentEncoder.from_pretrained(model_source, device=device, dtype=getattr(torch, ENCODE_DTYPE),
                                         revision=spec.model.revision, variant=spec.model.variant)


FAULT_ENV = "SANA_RAY_FAULT_AT_STEP"


def _injected_fault(step: int, run_dir: Path) -> None:
    """Testing aid: with SANA_RAY_FAULT_AT_STEP=N in the driver's environment, rank 0 fails once
    after step N (a marker in the run folder remembers it), so Ray Train restarts the workers from
    the latest checkpoint: the tests' way of interrupting a run at a known point."""
    at = os.environ.get(FAULT_ENV)
    if not at or step != int(at):
        return
    import ray.train

    marker = run_dir / f".fault-injected-at-{step}"
    if ray.train.get_context().get_world_rank() == 0 and not marker.exists():
        marker.touch()
        raise RuntimeError(f"{FAULT_ENV}={at}: injected failure after step {step}")


HOLD_ENV = "SANA_RAY_HOLD_AT_STEP"


def _injected_hold(step: int) -> None:
    """Testing aid: with SANA_RAY_HOLD_AT_STEP=N in the driver's environment, every rank stops after
    step N (after its checkpoint, when N is a checkpoint step) and waits, so a test can kill the
    driver at a known step however fast the machine trains."""
    at = os.environ.get(HOLD_ENV)
    if at and step == int(at):
        print(f"[sana-ray] {HOLD_ENV}={at}: holding after step {step}", flush=True)
        time.sleep(3600)


def _batch_files(cache, plan, first_micro_batch: int, accumulation: int, world_size: int) -> list[str]:
    """The image files of one optimizer step: every micro-batch of the window, every rank."""
    indices = [
        i
        for micro_batch in range(first_micro_batch, first_micro_batch + accumulation)
        for rank in range(world_size)
        for i in plan.batch(micro_batch, rank)
    ]
    return sorted({cache.image_paths[i] for i in indices})


def _report_checkpoint(rank: int, strategy, ema, state: ckpt.TrainState, eval_metrics: dict[str, float]) -> None:
    """Every rank writes its part (DeepSpeed: its ZeRO shards) and reports it; Ray Train merges the
    ranks' folders into one checkpoint. ``report`` is a barrier, so every rank calls it.
    ``eval_metrics``: the eval losses of an evaluation at this very step (empty if none ran)."""
    import ray.train

    if not strategy.weights_finite():  # collective; the guard makes this unreachable, but never save NaNs
        raise FloatingPointError(f"non-finite weights at step {state.step}: refusing to checkpoint them")
    metrics = {"step": state.step, "loss": state.loss} | eval_metrics
    name = f"checkpoint-{state.step:06d}"
    with tempfile.TemporaryDirectory(prefix="sana-ray-ckpt-") as folder:
        ckpt.save(Path(folder), strategy=strategy, ema=ema, state=state, rank=rank)
        checkpoint = ray.train.Checkpoint.from_directory(folder) if any(Path(folder).iterdir()) else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _export_weights(strategy, ema, *, use_ema: bool) -> dict | None:
    """Full fp32 weights on rank 0 (None elsewhere); every rank must call (ZeRO-3 gathers)."""
    weights = strategy.full_state_dict()
    if use_ema:
        averaged = strategy.gather_weights(ema.shadow)
        if weights is not None:
            weights.update(averaged)
    return weights


def _plain_transformer(strategy, weights: dict):
    """A plain fp32 transformer (no DDP / DeepSpeed) on the CPU holding ``weights``."""
    module = strategy.module
    transformer = type(module).from_config(module.config)
    transformer.load_state_dict(weights)
    return transformer.eval()


def _validation_resolution(spec) -> int:
    """validation.resolution, else the first training image dataset's size in pixels (a multiple of 32)."""
    if spec.validation.resolution:
        return spec.validation.resolution
    dataset = next(d for d in spec.datasets if d.dataset_type == "image" and not d.disabled)
    if dataset.resolution_type == "area":  # megapixels -> side of the equivalent square
        side = (dataset.resolution * 1e6) ** 0.5
        return max(32, int(round(side / 32)) * 32)
    return int(dataset.resolution)


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
