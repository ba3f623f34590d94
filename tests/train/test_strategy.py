"""The strategies the train loop is written against: DDP and DeepSpeed ZeRO 1/2/3, in one process.

Multi-worker behaviour (real all-reduce / partitioning over 2 Ray workers) is covered by
tests/launch/test_strategies_e2e.py; here each piece is checked on a small model where the
expected numbers can be computed directly.
"""

from __future__ import annotations

import math
import os
import shutil
import socket

import pytest
import torch

from sana_ray.manifest.schema import DeepSpeedSpec, HardwareSpec, TrainingSpec
from sana_ray.train import checkpoint as ckpt
from sana_ray.train.ema import EMA
from sana_ray.train.optim import build_lr_scheduler, build_optimizer
from sana_ray.train.strategy import DDPStrategy, DeepSpeedStrategy, build_strategy, compute_dtype, deepspeed_config

CPU = torch.device("cpu")
X = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(1))  # [micro-batch, batch, features]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _strategy(training: TrainingSpec, hardware: HardwareSpec | None = None, seed: int = 0):
    model = _model(seed)
    optimizer = build_optimizer(model.parameters(), training)
    scheduler = build_lr_scheduler(optimizer, training)
    strategy = build_strategy(training, hardware or HardwareSpec(), CPU, world_size=1)
    strategy.prepare(model, optimizer, scheduler)
    return strategy


def _train(strategy, steps: int, *, nan_steps=(), first: int = 0) -> list[float]:
    """``steps`` optimizer steps; returns the losses. Step s uses micro-batches X[(s*acc + k) % 4]."""
    accumulation = strategy.accumulation
    losses = []
    for s in range(first, first + steps):
        total = 0.0
        for k in range(accumulation):
            with strategy.micro_batch(last=k == accumulation - 1):
                loss = strategy.model(X[(s * accumulation + k) % len(X)]).float().pow(2).mean()
                if s in nan_steps:
                    loss = loss * float("nan")
                strategy.backward(loss)
            total += loss.item()
        strategy.last_result = strategy.step()
        losses.append(total / accumulation)
    return losses


def _weights(strategy) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in strategy.module.state_dict().items()}


def test_compute_dtype():
    assert compute_dtype("auto", CPU) is None  # fp32 on CPU
    assert compute_dtype("fp32", CPU) is None
    assert compute_dtype("bf16", CPU) is torch.bfloat16
    assert compute_dtype("fp16", CPU) is torch.float16


def test_ddp_accumulation_equals_one_big_batch():
    """Two micro-batches of 2 with accumulation == one batch of 4 (the mean of the means)."""
    accumulated = _strategy(TrainingSpec(steps=3, gradient_accumulation_steps=2, max_grad_norm=None, optimizer={"lr": 1e-2}))
    _train(accumulated, 3)

    model = _model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for s in range(3):
        batch = torch.cat([X[(2 * s) % 4], X[(2 * s + 1) % 4]])
        model(batch).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(accumulated.module.state_dict()[name], value)


def test_ddp_skips_a_non_finite_step_and_still_advances_the_schedule():
    strategy = _strategy(TrainingSpec(steps=4, optimizer={"lr": 1e-2}, lr_scheduler={"warmup_steps": 4}))
    _train(strategy, 1)
    before = _weights(strategy)
    _train(strategy, 1, nan_steps={1}, first=1)
    assert not strategy.last_result.applied and math.isnan(strategy.last_result.grad_norm)
    for name, value in _weights(strategy).items():
        assert torch.equal(value, before[name]), name
    assert strategy.lr() == pytest.approx(1e-2 * 3 / 4)  # the schedule moved on to step 2
    _train(strategy, 1, first=2)
    assert strategy.last_result.applied and all(torch.isfinite(v).all() for v in _weights(strategy).values())
    assert strategy.weights_finite()


def test_ddp_fp16_uses_a_loss_scaler_that_survives_checkpoints(tmp_path):
    training = TrainingSpec(steps=6, mixed_precision="fp16", optimizer={"lr": 1e-2})
    strategy = _strategy(training)
    assert strategy.loss_scaling and strategy.scaler is not None
    losses = _train(strategy, 3)
    assert all(math.isfinite(x) for x in losses)
    strategy.save(tmp_path, rank=0)
    scale = strategy.scaler.get_scale()
    fresh = _strategy(training, seed=5)
    fresh.load(tmp_path)
    assert fresh.scaler.get_scale() == scale


def _round_trip(training, hardware, tmp_path, ema_spec=None) -> None:
    """Train 3 steps, checkpoint, 3 more; a fresh strategy restored from the checkpoint repeats the
    last 3 losses (and EMA) exactly."""
    strategy = _strategy(training, hardware)
    ema = EMA(strategy.local_weights(), ema_spec, sharded=strategy.shards_weights) if ema_spec else None
    for step in range(3):
        _train(strategy, 1, first=step)
        if ema:
            ema.update(strategy.local_weights(), step + 1)
    state = ckpt.TrainState(step=3, micro_batches=3 * strategy.accumulation, fingerprint="f", loss=0.5)
    ckpt.save(tmp_path / "c", strategy=strategy, ema=ema, state=state, rank=0)
    uninterrupted = []
    for step in range(3, 6):
        uninterrupted += _train(strategy, 1, first=step)
        if ema:
            ema.update(strategy.local_weights(), step + 1)

    fresh = _strategy(training, hardware, seed=123)  # different initial weights
    fresh_ema = EMA(fresh.local_weights(), ema_spec, sharded=fresh.shards_weights) if ema_spec else None
    assert ckpt.load(tmp_path / "c", strategy=fresh, ema=fresh_ema, rank=0) == state
    resumed = []
    for step in range(3, 6):
        resumed += _train(fresh, 1, first=step)
        if fresh_ema:
            fresh_ema.update(fresh.local_weights(), step + 1)
    assert resumed == uninterrupted
    if ema:
        for name, value in ema.shadow.items():
            assert torch.equal(fresh_ema.shadow[name], value), name


def test_ddp_checkpoint_round_trip_resumes_exactly(tmp_path):
    training = TrainingSpec(steps=6, gradient_accumulation_steps=2, optimizer={"lr": 1e-2},
                            lr_scheduler={"name": "cosine", "warmup_steps": 2})
    _round_trip(training, HardwareSpec(), tmp_path, ema_spec=training.ema.model_copy(update={"enabled": True, "decay": 0.9}))


def test_checkpoint_without_state_file_is_refused(tmp_path):
    strategy = _strategy(TrainingSpec(steps=2))
    folder = tmp_path / "c"
    ckpt.save(folder, strategy=strategy, ema=None, state=ckpt.TrainState(1, 1, "abc", 1.0), rank=0)
    (folder / ckpt.STATE).unlink()  # as if the writer died before its last file
    with pytest.raises(ckpt.IncompleteCheckpoint, match="not completely written"):
        ckpt.load(folder, strategy=strategy, ema=None, rank=0)


def test_deepspeed_config_from_the_manifest():
    training = TrainingSpec(steps=1, batch_size=2, gradient_accumulation_steps=3, max_grad_norm=None, mixed_precision="bf16")
    spec = DeepSpeedSpec(stage=3, offload_optimizer=True, offload_params=True,
                         overrides={"zero_optimization": {"reduce_bucket_size": 1000}, "prescale_gradients": True})
    config = deepspeed_config(training, spec, world_size=4, dtype=torch.bfloat16)
    assert config["train_batch_size"] == 2 * 3 * 4 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] >= 1e30  # "no clipping", but DeepSpeed still checks the norm
    assert config["bf16"]["enabled"] and "fp16" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 1000  # merged, not replaced
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    assert config["prescale_gradients"] is True


def test_deepspeed_spec_rejects_bad_combinations():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="offload_params needs stage 3"):
        DeepSpeedSpec(stage=2, offload_params=True)
    with pytest.raises(ValidationError, match="must not set gradient_accumulation_steps"):
        DeepSpeedSpec(overrides={"gradient_accumulation_steps": 4})
    with pytest.raises(RuntimeError, match="fp16 with strategy: deepspeed needs a GPU"):
        DeepSpeedStrategy(TrainingSpec(steps=1, mixed_precision="fp16"), DeepSpeedSpec(), CPU, 1)


# --- DeepSpeed in this process: a one-rank gloo group (what Ray Train makes, with one worker).


@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _ds(stage: int, **spec) -> HardwareSpec:
    return HardwareSpec(strategy="deepspeed", deepspeed={"stage": stage, **spec})


def test_zero2_resumes_exactly_and_skips_non_finite_steps(process_group, tmp_path):
    training = TrainingSpec(steps=6, gradient_accumulation_steps=2, optimizer={"lr": 1e-2},
                            lr_scheduler={"name": "linear", "warmup_steps": 1})
    _round_trip(training, _ds(2), tmp_path, ema_spec=training.ema.model_copy(update={"enabled": True, "decay": 0.5}))

    strategy = _strategy(training, _ds(2))
    assert isinstance(strategy, DeepSpeedStrategy) and not strategy.shards_weights
    _train(strategy, 1)
    before = _weights(strategy)
    _train(strategy, 1, nan_steps={1}, first=1)
    assert not strategy.last_result.applied and not math.isfinite(strategy.last_result.grad_norm)
    assert all(torch.equal(v, before[k]) for k, v in _weights(strategy).items())
    _train(strategy, 1, first=2)
    assert strategy.last_result.applied and strategy.weights_finite()


def test_zero3_with_offload_gathers_full_weights_and_sharded_ema(process_group, tmp_path):
    training = TrainingSpec(steps=4, optimizer={"lr": 1e-2})
    strategy = _strategy(training, _ds(3, offload_optimizer=True, offload_params=True))
    assert strategy.shards_weights
    ema = EMA(strategy.local_weights(), training.ema.model_copy(update={"decay": 0.5}), sharded=True)
    losses = _train(strategy, 4)
    ema.update(strategy.local_weights(), 4)
    assert losses[-1] < losses[0]
    full = strategy.full_state_dict()
    reference = _model(0).state_dict()
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.dtype == torch.float32 for v in full.values())
    assert any(not torch.equal(full[k], reference[k]) for k in full)  # trained
    gathered = strategy.gather_weights(ema.shadow)
    assert {k: v.shape for k, v in gathered.items()} == {k: v.shape for k, v in reference.items()}
    ema.save(tmp_path, rank=0)
    assert (tmp_path / "ema-rank-00000.safetensors").exists()
    state = ckpt.TrainState(step=4, micro_batches=4, fingerprint="f", loss=losses[-1])
    ckpt.save(tmp_path / "c", strategy=strategy, ema=ema, state=state, rank=0)
    fresh = _strategy(training, _ds(3, offload_optimizer=True, offload_params=True), seed=9)
    ckpt.load(tmp_path / "c", strategy=fresh, ema=None, rank=0)
    for name, value in fresh.full_state_dict().items():
        torch.testing.assert_close(value, full[name])


class _RunsCodeWhenUnpickled:
    """What an attacker would plant in a checkpoint: unpickling it creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_deepspeed_resume_reads_no_pickles(process_group, tmp_path):
    """DeepSpeed's own loader unpickles every checkpoint file; ours loads them with weights_only=True.
    A real ZeRO-1 bf16 checkpoint (another optimizer wrapper than the ZeRO-2/3 tests') resumes the
    exact weights; the same checkpoint with a code-running object planted in either of its files
    is refused with a clear error and the object's code never runs."""
    from sana_ray.train.strategy import UnsafeCheckpoint, deepspeed_safe_globals

    training = TrainingSpec(steps=2, optimizer={"lr": 1e-2}, mixed_precision="bf16")
    strategy = _strategy(training, _ds(1))
    _train(strategy, 1)
    strategy.save(tmp_path / "c", rank=0)
    fresh = _strategy(training, _ds(1), seed=5)
    fresh.load(tmp_path / "c")
    assert all(torch.equal(v, _weights(strategy)[k]) for k, v in _weights(fresh).items())

    files = sorted((tmp_path / "c").rglob("*.pt"))
    assert {f.name.split("_")[-1] for f in files} == {"states.pt"} and len(files) == 2  # model + ZeRO optimizer
    for planted in files:
        marker = tmp_path / f"ran-{planted.name}"
        folder = tmp_path / f"evil-{planted.name}"
        shutil.copytree(tmp_path / "c", folder)
        target = folder / planted.relative_to(tmp_path / "c")
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            state = torch.load(target, weights_only=True)
        state["planted"] = _RunsCodeWhenUnpickled(str(marker))
        torch.save(state, target)
        with pytest.raises(UnsafeCheckpoint, match="refusing to resume from .*would run code"):
            _strategy(training, _ds(1), seed=6).load(folder)
        assert not marker.exists()
