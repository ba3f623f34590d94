"""Distribution strategies: how the train loop's forward, backward, step and checkpoints are done.

The loop (``train.loop``) is written once against this small interface and never asks which
strategy runs::

    strategy.prepare(transformer, optimizer, lr_scheduler)
    for each optimizer step:
        for each micro-batch k:
            with strategy.micro_batch(last=k == accumulation - 1):
                loss = loss_fn(strategy.model, ...)       # autocast inside the context
                strategy.backward(loss)                   # scaled by 1/accumulation (and the loss scale)
        result = strategy.step()                          # clip, step unless non-finite, schedule, zero grads
    strategy.save(folder, rank) / strategy.load(folder)   # inside a Ray Train checkpoint
    strategy.full_state_dict()                            # every rank calls; rank 0 gets fp32 weights

Two implementations:

* ``DDPStrategy``: torch DistributedDataParallel (via ``ray.train.torch.prepare_model``); fp32
  weights, bf16/fp16 autocast, ``torch.amp.GradScaler`` for fp16. Rank 0 writes the whole
  checkpoint (``transformer.safetensors`` + ``optimizer.pt``).
* ``DeepSpeedStrategy``: ZeRO stage 1/2/3 with optional CPU offload of optimizer states /
  parameters. The client torch optimizer is handed to ``deepspeed.initialize`` (no compiled
  optimizer op needed); on CPU the process group Ray Train made (gloo) is reused. Every rank
  ``save_checkpoint``s its shards under ``deepspeed/`` in its own folder; Ray Train merges the
  ranks' folders into one checkpoint.

Non-finite gradients: ``step()`` never applies a step whose global gradient norm is NaN/inf
(DDP checks the norm itself; DeepSpeed's ZeRO optimizers skip such steps and report it through
``was_step_applied()``). The lr schedule advances either way, so step ``n`` always has lr(n).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sana_ray.manifest.schema import DeepSpeedSpec, TrainingSpec

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "zero"
OPTIMIZER = "optimizer.pt"
WEIGHTS = "transformer.safetensors"


@dataclass
class StepResult:
    applied: bool  # the optimizer changed the weights
    grad_norm: float  # global norm before clipping (nan/inf when the step was skipped for it)


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast / 16-bit dtype for ``training.mixed_precision`` on ``device``; None for fp32.

    ``auto`` is bf16 on a GPU that supports it and fp32 otherwise (always fp32 on CPU).
    """
    if mixed_precision == "fp32":
        return None
    if mixed_precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if mixed_precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("mixed_precision: bf16 was requested but this GPU does not support bf16; use fp16 or fp32")
        return torch.bfloat16
    if mixed_precision == "fp16":
        return torch.float16
    raise ValueError(f"unknown mixed_precision {mixed_precision!r}")


def _all_reduce_min_flag(flag: bool, device: torch.device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item() > 0)


class Strategy:
    """What the loop relies on; see the module docstring."""

    loss_scaling = False  # fp16: overflowing steps are expected and skipped by the scaler
    shards_weights = False  # local_weights() are per-rank partitions (ZeRO-3), not the whole model
    model: torch.nn.Module  # what the loss calls (DDP / DeepSpeed wrapper)
    module: torch.nn.Module  # the unwrapped transformer

    def __init__(self, training: TrainingSpec, device: torch.device, world_size: int) -> None:
        self.training = training
        self.device = device
        self.world_size = world_size
        self.accumulation = training.gradient_accumulation_steps
        self.dtype = compute_dtype(training.mixed_precision, device)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def local_weights(self) -> dict[str, torch.Tensor]:
        """This rank's view of the trainable weights (EMA keeps a shadow of exactly these)."""
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    def gather_weights(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Full fp32 CPU tensors on rank 0 from tensors shaped like ``local_weights()`` (collective)."""
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return None
        return {name: t.detach().float().cpu() for name, t in local.items()}

    def weights_finite(self) -> bool:
        """True when every weight on every rank is finite (collective)."""
        finite = all(bool(torch.isfinite(t).all()) for t in self.local_weights().values())
        return _all_reduce_min_flag(finite, self.device)


class DDPStrategy(Strategy):
    def prepare(self, transformer: torch.nn.Module, optimizer, lr_scheduler) -> None:
        self.module, self.optimizer, self.lr_scheduler = transformer, optimizer, lr_scheduler
        self.model = transformer
        if self.world_size > 1:
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(transformer, move_to_device=False)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.loss_scaling = self.scaler is not None
        self._last = True

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        # DDP all-reduces on every backward unless told not to; only the last micro-batch of an
        # accumulation window needs it.
        with contextlib.ExitStack() as stack:
            if not last and self.model is not self.module:
                stack.enter_context(self.model.no_sync())
            stack.enter_context(self.autocast())
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accumulation
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> StepResult:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.training.max_grad_norm if self.training.max_grad_norm is not None else math.inf
        # Gradients are identical on every rank after DDP's all-reduce, so is this decision.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        applied = math.isfinite(grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself when unscale_ found inf/nan
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(applied=applied, grad_norm=grad_norm)

    def save(self, folder: Path, rank: int) -> None:
        """Rank 0 writes the whole state (DDP keeps every rank's weights identical)."""
        from safetensors.torch import save_file

        if rank != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}, str(folder / WEIGHTS))
        extra = {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()} | extra,
                   folder / OPTIMIZER)

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(str(folder / WEIGHTS), device=str(self.device)))
        saved = torch.load(folder / OPTIMIZER, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return None
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(training: TrainingSpec, spec: DeepSpeedSpec, world_size: int, dtype: torch.dtype | None) -> dict:
    """The DeepSpeed config for this manifest (``spec.overrides`` deep-merged last).

    ``gradient_clipping`` is always set: with fp32 weights DeepSpeed only detects a non-finite
    gradient norm (and skips the step) when it computes the norm for clipping, so "no clipping"
    is a threshold no norm reaches.
    """
    zero: dict = {"stage": spec.stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if spec.stage == 3:
        # Export gathers the full 16-bit weights on rank 0 (engine._zero3_consolidated_16bit_state_dict).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.batch_size * training.gradient_accumulation_steps * world_size,
        "gradient_clipping": training.max_grad_norm if training.max_grad_norm is not None else 1e30,
        "zero_optimization": zero,
        # The client optimizer (any of optim.build_optimizer's) is used as is, also when offloaded.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return deep_merge(config, spec.overrides)


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holds objects that only unpickling (running arbitrary code) could rebuild."""


def deepspeed_safe_globals() -> list:
    """The classes (besides tensors and plain data) that DeepSpeed 0.19 ZeRO checkpoints hold.

    Listed with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints of ZeRO
    stages 1, 2 and 3, fp32 and bf16, with and without CPU offload: the ZeRO stage enum, the loss
    scaler (static; the dynamic one of fp16 on GPUs), and the fragment addresses of stage 1/2's
    parameter slice map. Each is rebuilt from its attributes; none runs code when loaded.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class _WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose ``load`` never unpickles; the rest is the wrapped engine's."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        import pickle

        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as error:
                reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                raise UnsafeCheckpoint(
                    f"refusing to resume from {path}: it holds Python objects other than tensors and DeepSpeed's "
                    f"own state ({reason[:300]}), and loading them would run code. sana-ray did not write this; "
                    f"if you did not either, someone could write into the run folder. Delete that checkpoint "
                    f"folder (or apply with --restart) and check who can write there."
                ) from None


class DeepSpeedStrategy(Strategy):
    def __init__(self, training: TrainingSpec, spec: DeepSpeedSpec, device: torch.device, world_size: int) -> None:
        super().__init__(training, device, world_size)
        self.spec = spec
        self.shards_weights = spec.stage == 3
        self.loss_scaling = self.dtype == torch.float16
        if self.dtype == torch.float16 and device.type != "cuda":
            raise RuntimeError(
                "mixed_precision: fp16 with strategy: deepspeed needs a GPU (DeepSpeed's CPU accelerator has no fp16 "
                "here); use bf16 or fp32, or strategy: ddp"
            )

    def prepare(self, transformer: torch.nn.Module, optimizer, lr_scheduler) -> None:
        import deepspeed

        # Reuses the process group Ray Train created (gloo on CPU, nccl on GPUs).
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        config = deepspeed_config(self.training, self.spec, self.world_size, self.dtype)
        # The lr scheduler stays ours (stepped every step, applied or not, like DDP's).
        self.engine, _, _, _ = deepspeed.initialize(model=transformer, optimizer=optimizer, config=config)
        self.model = self.engine
        self.module = self.engine.module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._last = True

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        # Only the last micro-batch of a window is a boundary: ZeRO reduces / steps there.
        self._last = last
        self.engine.set_gradient_accumulation_boundary(last)
        with self.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps (and the fp16 loss scale)
        if not self._last:
            self.engine.step()  # advances DeepSpeed's micro-step count; no optimizer step off a boundary

    def step(self) -> StepResult:
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        if not applied and math.isfinite(grad_norm):
            grad_norm = math.inf  # DeepSpeed skipped it for an overflow it did not report as a norm
        self.lr_scheduler.step()
        return StepResult(applied=applied, grad_norm=grad_norm)

    def save(self, folder: Path, rank: int) -> None:
        """Every rank writes its shards (collective); Ray Train merges the ranks' folders."""
        folder.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(
            str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state={"sana_ray_lr_scheduler": self.lr_scheduler.state_dict()}
        )

    def load(self, folder: Path) -> None:
        """Resume from ``folder``, reading every file with ``torch.load(weights_only=True)``.

        DeepSpeed's own loader unpickles (``weights_only=False``): anyone able to write into the run
        folder would get code run at the next ``apply``. Every file DeepSpeed 0.19 reads while
        resuming goes through the engine's ``checkpoint_engine.load`` (the model states through
        its SDLoader, the ZeRO shards directly), so for this call that engine is wrapped to load
        tensors, plain data and the few DeepSpeed classes its checkpoints hold; anything else is
        refused with :class:`UnsafeCheckpoint`.
        """
        inner = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = _WeightsOnlyLoads(inner)
        try:
            path, client_state = self.engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        finally:
            self.engine.checkpoint_engine = inner
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder / DEEPSPEED_DIR}")
        self.lr_scheduler.load_state_dict(client_state["sana_ray_lr_scheduler"])

    def local_weights(self) -> dict[str, torch.Tensor]:
        if not self.shards_weights:
            return super().local_weights()
        # ZeRO-3: this rank's flat partition of each parameter (padded to equal size on every rank).
        return {name: p.ds_tensor for name, p in self.module.named_parameters() if p.requires_grad}

    def gather_weights(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if not self.shards_weights:
            return super().gather_weights(local)
        rank = torch.distributed.get_rank()
        params = dict(self.module.named_parameters())
        full: dict[str, torch.Tensor] = {}
        for name, shard in local.items():
            # NCCL gathers GPU tensors only; gloo takes them where they are.
            piece = shard.detach().to(self.device)
            pieces = [torch.empty_like(piece) for _ in range(self.world_size)]
            torch.distributed.all_gather(pieces, piece)
            if rank == 0:
                param = params[name]
                full[name] = torch.cat(pieces)[: param.ds_numel].view(param.ds_shape).float().cpu()
        return full if rank == 0 else None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        rank = torch.distributed.get_rank()
        if self.shards_weights:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective; the dict on rank 0 only
        else:
            state = self.module.state_dict() if rank == 0 else None
        if rank != 0:
            return None
        return {k: v.detach().float().cpu() for k, v in state.items()}


def build_strategy(training: TrainingSpec, hardware, device: torch.device, world_size: int) -> Strategy:
    if hardware.strategy == "ddp":
        return DDPStrategy(training, device, world_size)
    if hardware.strategy == "deepspeed":
        return DeepSpeedStrategy(training, hardware.deepspeed, device, world_size)
    raise ValueError(f"unknown strategy {hardware.strategy!r}")
