"""`sana-ray plan`: will a manifest fit, how fast will it run, and what will communication cost?

Pure arithmetic from the manifest and the hardware profiles (standard library only: no torch,
no Ray), so it answers in well under a second on a laptop, before anything is rented.

Notation: P = trainable parameters of the Sana transformer, n = training workers (GPUs),
B = batch_size per worker, a = gradient_accumulation_steps, T = image tokens per sample,
L = text tokens per sample (model.max_sequence_length), D = hidden size, layers = blocks.

Memory per GPU (bytes)
    ddp (what the trainer does today: fp32 weights, bf16 autocast, torch AdamW):
        weights 4P, gradients 4P (+4P for DDP's fp32 buckets when n > 1), AdamW moments 8P;
        on a CPU worker plus a transient 4P while torch's foreach AdamW steps (its sqrt(v)
        temporary); on a GPU the trainer uses the fused AdamW kernel, which has none (measured).
    DeepSpeed ZeRO with bf16 (ZeRO paper's accounting, K = 12: fp32 master + two moments):
        stage 1: 2P + 2P + 12P/n;  stage 2: 2P + 2P/n + 12P/n;  stage 3: (2P + 2P + 12P)/n
        plus two gathered blocks (2 x 2 x block params) of working set;
        offload_optimizer moves the 12P/n to host RAM, offload_param (stage 3) the 2P/n.
    activations (bf16 autocast; fp32 doubles them):
        per block and sample: 87 bytes x T x D (ACT_BYTES_PER_TOKEN_DIM: measured 86-89 on an
        H200 for Sana 600M and 1.6B at 512 and 1024 px) + 4 bytes x L x cross dim (text K, V);
        gradient checkpointing keeps each block's input (2 x T x D: bf16 under autocast) and
        recomputes one block at a time.
    peak = weights + gradients + optimizer + max(activations, optimizer transient), compared
    with USABLE_MEMORY_FRACTION (92%) of the profile's memory.

Compute per sample (forward, FLOPs; the 6·N·tokens rule written out for Sana's blocks)
    per block: 2T (4D^2 self-attn q,k,v,out + 2 D Dc cross q,out + 3 D H feed-forward 1x1 convs
               + 18 H depthwise 3x3)            [H = mlp_ratio x D, Dc = cross heads x head dim]
             + 4 T D d   linear self-attention (K^T V, then Q (K^T V)), d = head dim
             + 4 T L Dc  cross-attention scores and values
             + 4 L Cx Dc text K, V projections  [Cx = cross_attention_dim]
    outside blocks: 2T (in p^2 D + D p^2 out) + 2L (C D + D^2) caption projection
                    + 2 (256 D + 7 D^2) timestep embedding
    training = forward x (3 + 1 with gradient checkpointing: the recomputed forward)
    time per micro-batch = max(B x training FLOPs / (profile TFLOPS x MFU),
                               layers x LAUNCH_S_PER_BLOCK (x 1.5 with checkpointing))
        MFU 0.25 and the launch floor (7.6 ms per block for forward + backward) are calibrated on
        an H200 in eager PyTorch bf16 (benchmarks/gpu_step.py; docs/benchmarks.md): at small
        batches the GPU waits for the CPU to launch kernels (30% busy at batch 1), at large
        ones it is busy and the FLOPs rate sets the pace.
    optimizer step = local parameters x 64 bytes / the profile's memory bandwidth (clip + fused
        AdamW read and write weights, gradients and both moments; 21 ms for 1.6B on an H200).
    scheduled sampling (training.scheduled_sampling, model.rollout) adds forward-only passes:
        r = probability x E[k] sample-forwards per sample and c = E[max_b k_b] forward calls per
        micro-batch (exact expectations of its offset distribution, model.rollout.expected_rollout);
        time per micro-batch += max(B x r x forward FLOPs / (TFLOPS x MFU),
                                    c x layers x LAUNCH_S_PER_BLOCK x ROLLOUT_LAUNCH_FRACTION)
        (a forward launches about a third of a training step's kernels: assumed, not measured).

Communication per optimizer step (ring collectives, bytes each GPU sends)
    ddp:    2(n-1)/n x 4P once per step (fp32 gradients; accumulation runs under no_sync)
    zero-1: 2(n-1)/n x 2P once per step (reduce-scatter bf16 grads, all-gather bf16 params)
    zero-2:  (n-1)/n x 2P per micro-batch (reduce-scatter) + (n-1)/n x 2P per step
    zero-3: 3(n-1)/n x 2P per micro-batch (two all-gathers and a reduce-scatter)
    time = bytes / the slowest link in the ring: the inter-node link when there are several
    nodes, else the GPUs' own (NVLink, PCIe, or PCIe through host memory without P2P).
    Offload adds the CPU AdamW (CPU_ADAM_PARAMS_PER_S per worker, assumed) and PCIe copies.
    step time = a x micro-batch time + optimizer step + communication + offload (no overlap).

Accumulation to keep communication under a fraction f of the step: with per-step cost p,
per-micro-batch cost q and other per-step time o (offload),
(p + q a)(1 - f) <= f (a t + o)  =>  a >= (p(1 - f) - f o) / (f t - q(1 - f)).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sana_ray.hardware import GIB, INTERCONNECTS, PROFILES, Interconnect, Profile, interconnect, nccl_env

# Calibrated on an H200 (benchmarks/gpu_step.py, eager PyTorch, bf16 autocast; docs/benchmarks.md).
ASSUMED_MFU = 0.25
ACT_BYTES_PER_TOKEN_DIM = 87  # activations kept per block, per image token, per unit of hidden size
CHECKPOINT_BYTES_PER_TOKEN_DIM = 2  # with gradient checkpointing: each block's (bf16) input
LAUNCH_S_PER_BLOCK = 7.6e-3  # forward + backward of one block when kernel launches, not the GPU, set the pace
CHECKPOINT_LAUNCH_FACTOR = 1.5  # the recomputed forward launches its kernels again
ROLLOUT_LAUNCH_FRACTION = 1 / 3  # a rollout forward (no backward) vs a block's forward + backward (assumed)
OPTIMIZER_BYTES_PER_PARAM = 64  # clip + fused AdamW: device memory traffic per parameter per step
CPU_ADAM_PARAMS_PER_S = 0.5e9  # DeepSpeed's CPU Adam, per worker (assumed)
DEFAULT_MAX_COMM_FRACTION = 0.2
DC_AE_DOWNSAMPLE = 32  # Sana's DC-AE (f32c32)

# SanaTransformer2DModel configs (diffusers). 1.6B = diffusers' defaults (= the released
# Sana_1600M_* transformer/config.json); 600M = the released Sana_600M_* config.
SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, patch_size=1)
SANA_600M = dict(in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
                 num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
                 caption_channels=2304, mlp_ratio=2.5, patch_size=1)
# Sana 1.5 (diffusers' SANA1.5_1.6B_1024px_diffusers / SANA1.5_4.8B_1024px_diffusers, converted from NVlabs'
# SanaMS1.5_1600M_P1_D20 / SanaMS_4800M_P1_D60): Sana 1.6B's blocks with qk norm; the 4.8B has 60 of them.
SANA15_1600M = SANA_1600M | dict(qk_norm="rms_norm_across_heads")
SANA15_4800M = SANA15_1600M | dict(num_layers=60)
KNOWN_MODELS = {"sana-600m": SANA_600M, "sana-1600m": SANA_1600M, "sana15-1600m": SANA15_1600M,
                "sana15-4800m": SANA15_4800M}


class PlanError(Exception):
    """A manifest that cannot be planned; the message names the field and the fix."""


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SanaShape:
    name: str
    layers: int
    dim: int  # D = heads x head dim
    head_dim: int
    cross_dim: int  # Dc = cross heads x cross head dim
    cross_in: int  # cross_attention_dim (width of the projected text)
    caption_channels: int
    mlp_hidden: int  # H
    in_channels: int
    out_channels: int
    patch: int
    downsample: int  # VAE spatial factor
    qk_norm: bool = False  # Sana 1.5: RMSNorm over all heads of q and k, in both attentions

    @classmethod
    def from_config(cls, name: str, config: dict, downsample: int = DC_AE_DOWNSAMPLE) -> "SanaShape":
        heads, head_dim = config.get("num_attention_heads", 70), config.get("attention_head_dim", 32)
        dim = heads * head_dim
        cross_heads = config.get("num_cross_attention_heads", 20)
        cross_head_dim = config.get("cross_attention_head_dim", 112)
        return cls(
            name=name,
            layers=config.get("num_layers", 20),
            dim=dim,
            head_dim=head_dim,
            cross_dim=cross_heads * cross_head_dim,
            cross_in=config.get("cross_attention_dim", 2240),
            caption_channels=config.get("caption_channels", 2304),
            mlp_hidden=int(config.get("mlp_ratio", 2.5) * dim),
            in_channels=config.get("in_channels", 32),
            out_channels=config.get("out_channels") or config.get("in_channels", 32),
            patch=config.get("patch_size", 1),
            downsample=downsample,
            qk_norm=bool(config.get("qk_norm")),
        )

    @property
    def block_params(self) -> int:
        D, Dc, H = self.dim, self.cross_dim, self.mlp_hidden
        self_attn = 4 * D * D + D  # q, k, v without bias; out with bias
        cross_attn = D * Dc + Dc + 2 * (self.cross_in * Dc + Dc) + Dc * D + D
        feed_forward = (D * 2 * H + 2 * H) + (2 * H * 9 + 2 * H) + H * D  # GLUMBConv
        qk_norm = 2 * D + 2 * Dc if self.qk_norm else 0  # norm_q, norm_k weights of attn1 (D) and attn2 (Dc)
        return self_attn + cross_attn + feed_forward + qk_norm + 6 * D  # + scale_shift_table

    @property
    def params(self) -> int:
        D, p2 = self.dim, self.patch**2
        patch_embed = self.in_channels * p2 * D + D
        time_embed = 256 * D + D + D * D + D + D * 6 * D + 6 * D
        caption = self.caption_channels * D + D + D * D + D + D  # two linears + RMSNorm
        out = 2 * D + D * p2 * self.out_channels + p2 * self.out_channels
        return patch_embed + time_embed + caption + self.layers * self.block_params + out

    def tokens(self, resolution: int) -> int:
        side = resolution // self.downsample // self.patch
        return side * side

    def forward_flops(self, tokens: int, text_tokens: int) -> float:
        """Forward FLOPs for one sample (see the module docstring)."""
        T, L, D, Dc, H = tokens, text_tokens, self.dim, self.cross_dim, self.mlp_hidden
        per_block = (
            2 * T * (4 * D * D + 2 * D * Dc + 3 * D * H + 18 * H)
            + 4 * T * D * self.head_dim
            + 4 * T * L * Dc
            + 4 * L * self.cross_in * Dc
        )
        p2 = self.patch**2
        outside = (2 * T * (self.in_channels * p2 * D + D * p2 * self.out_channels)
                   + 2 * L * (self.caption_channels * D + D * D) + 2 * (256 * D + 7 * D * D))
        return self.layers * per_block + outside


def _read_config(path: Path) -> dict | None:
    """A transformer config.json, or None when there is none; PlanError when it cannot be used.

    ``model.pretrained`` is any string a user wrote: a name too long for the filesystem or a
    folder we may not read is "no config here", not a traceback."""
    try:
        if not path.is_file():
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ENAMETOOLONG, EACCES, ...; ValueError: bad JSON or UTF-8
        return None
    if not isinstance(config, dict):
        raise PlanError(f"model.pretrained: {path} is not a transformer config (a JSON object)")
    return config


def _hub_cache_config(repo_id: str) -> dict | None:
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    folder = root / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    try:
        configs = sorted(folder.glob("*/transformer/config.json")) if folder.is_dir() else []
    except (OSError, ValueError):
        return None
    for config in configs:
        return _read_config(config)
    return None


def model_shape(pretrained: str, model: str | None = None) -> SanaShape:
    """The transformer's shape for ``model.pretrained`` (or ``model``: sana-600m, sana-1600m,
    sana15-1600m, sana15-4800m, tiny, tiny-sana15)."""
    key = (model or pretrained).strip()
    from sana_ray.model.tiny import PRESETS, VAE_CONFIG  # plain dicts; the module imports no torch

    if key in PRESETS:
        return SanaShape.from_config(f"{key} (random)", PRESETS[key][1], 2 ** (len(VAE_CONFIG["encoder_block_out_channels"]) - 1))
    if key.lower() in KNOWN_MODELS:
        return SanaShape.from_config(key.lower(), KNOWN_MODELS[key.lower()])
    config = _read_config(Path(key) / "transformer" / "config.json")
    if config is None and "/" in key:
        config = _hub_cache_config(key)
    if config is not None:
        try:
            return SanaShape.from_config(key, config)
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"model.pretrained: the transformer config of '{key[:100]}' is not a Sana one ({error!r}); "
                            f"pass --model sana-600m, sana-1600m, sana15-1600m or sana15-4800m") from None
    if re.search(r"sana[\s_-]*1[._-]5", key, re.IGNORECASE):  # SANA1.5_4.8B_..., Sana1-5_1600M_...
        if re.search(r"4800M|4\.8B", key, re.IGNORECASE):
            return SanaShape.from_config(f"{key} (Sana 1.5 4.8B config)", SANA15_4800M)
        if re.search(r"1600M|1\.6B", key, re.IGNORECASE):
            return SanaShape.from_config(f"{key} (Sana 1.5 1.6B config)", SANA15_1600M)
    if re.search(r"1600M|1\.6B", key, re.IGNORECASE):
        return SanaShape.from_config(f"{key} (Sana 1.6B config)", SANA_1600M)
    if re.search(r"600M|0\.6B", key, re.IGNORECASE):
        return SanaShape.from_config(f"{key} (Sana 600M config)", SANA_600M)
    shown = key if len(key) <= 100 else f"{key[:60]}...{key[-20:]}"
    raise PlanError(
        f"model.pretrained: cannot tell the transformer's size of '{shown}' (no transformer/config.json there or in "
        f"the Hugging Face cache); pass --model sana-600m, sana-1600m, sana15-1600m or sana15-4800m"
    )


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    name: str
    stage: int  # 0 = DDP
    offload_optimizer: bool = False
    offload_param: bool = False


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("ddp", 0),
        Strategy("zero1", 1),
        Strategy("zero2", 2),
        Strategy("zero2-offload", 2, offload_optimizer=True),
        Strategy("zero3", 3),
        Strategy("zero3-offload", 3, offload_optimizer=True),
        Strategy("zero3-offload-all", 3, offload_optimizer=True, offload_param=True),
    )
}


def _truthy_offload(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return value.lower() not in ("", "none", "false", "off", "no")
    device = getattr(value, "device", None)
    if device is not None:
        return _truthy_offload(device)
    if isinstance(value, dict):
        return _truthy_offload(value.get("device", "cpu"))
    return bool(value)


def declared_strategy(hardware) -> str:
    """'auto' or a key of STRATEGIES, from hardware.strategy (and a deepspeed block, however it is spelled)."""
    strategy = str(getattr(hardware, "strategy", "ddp") or "ddp").lower()
    if strategy in ("ddp", "auto") or strategy in STRATEGIES:
        return strategy
    if strategy in ("deepspeed", "zero"):
        ds = getattr(hardware, "deepspeed", None)
        if isinstance(ds, dict):
            get = ds.get
        else:
            def get(key, default=None):
                return getattr(ds, key, default)
        zero = get("zero_optimization") or {}
        stage = get("stage") or get("zero_stage") or (zero.get("stage") if isinstance(zero, dict) else None) or 2
        opt = get("offload_optimizer") or (zero.get("offload_optimizer") if isinstance(zero, dict) else None)
        par = (get("offload_params") or get("offload_param")
               or (zero.get("offload_param") if isinstance(zero, dict) else None))
        name = f"zero{int(stage)}"
        if _truthy_offload(par) and int(stage) == 3:
            return "zero3-offload-all"
        if _truthy_offload(opt):
            return "zero3-offload" if int(stage) == 3 else "zero2-offload"
        return name
    raise PlanError(f"hardware.strategy: '{strategy}' is not one sana-ray plan knows (ddp, deepspeed, auto)")


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


@dataclass
class Pool:
    name: str
    profile: Profile
    nodes: int
    gpus_per_node: int

    @property
    def workers(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    transient: float  # optimizer-step temporaries (not held during backward)
    host: float  # offloaded to CPU RAM, per worker
    usable: float

    @property
    def peak(self) -> float:
        return self.weights + self.gradients + self.optimizer + max(self.activations, self.transient)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable


@dataclass
class StrategyPlan:
    strategy: Strategy
    memory: dict[str, Memory]  # per pool
    micro_s: float  # slowest pool's compute time per micro-batch
    comm_bytes: float  # sent per GPU per optimizer step
    comm_s: float
    offload_s: float
    optimizer_s: float  # the optimizer step on the GPU (0 when offloaded: offload_s has the CPU's)
    step_s: float
    samples_per_s: float
    comm_fraction: float
    accumulation_for_target: int | None  # None: no accumulation brings comm under the target

    @property
    def fits(self) -> bool:
        return all(m.fits for m in self.memory.values())


@dataclass
class Plan:
    model: SanaShape
    params: int
    resolution: int
    tokens: int
    text_tokens: int
    batch_size: int
    accumulation: int
    checkpointing: bool
    precision: str
    world: int
    pools: list[Pool]
    link: Interconnect | None  # None: one node
    link_assumed: bool
    bandwidth: float  # bytes/s of the ring's slowest link
    mfu: float
    max_comm_fraction: float
    declared: str
    strategies: dict[str, StrategyPlan]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rollout_forwards: float = 0.0  # scheduled sampling: expected forward passes per sample (forward only)
    rollout_calls: float = 0.0  # ... and forward calls per micro-batch
    rollout_s: float = 0.0  # ... and their time per micro-batch (included in micro_s)

    @property
    def flops_per_sample(self) -> float:
        factor = 4 if self.checkpointing else 3
        return factor * self.model.forward_flops(self.tokens, self.text_tokens)

    def best(self) -> StrategyPlan | None:
        """The fastest strategy that fits (what `strategy: auto` picks); ties go to the simpler one."""
        fitting = [p for p in self.strategies.values() if p.fits]
        return min(fitting, key=lambda p: p.step_s) if fitting else None

    @property
    def chosen(self) -> StrategyPlan | None:
        return self.best() if self.declared == "auto" else self.strategies[self.declared]


def memory_per_gpu(shape: SanaShape, strategy: Strategy, *, world: int, batch: int, tokens: int, text_tokens: int,
                   checkpointing: bool, precision: str, profile: Profile) -> Memory:
    P, n = shape.params, world
    if strategy.stage == 0:
        weights, grads, optimizer = 4.0 * P, 4.0 * P * (2 if n > 1 else 1), 8.0 * P
        transient, host = (0.0 if profile.gpu else 4.0 * P), 0.0  # fused AdamW on GPUs, foreach on CPUs
    else:
        s = strategy.stage
        weights = 2.0 * P / (n if s == 3 else 1)
        grads = 2.0 * P / (n if s >= 2 else 1)
        optimizer = 12.0 * P / n
        transient, host = 0.0, 0.0
        if s == 3:
            weights += 2 * 2.0 * shape.block_params  # two gathered blocks (current + prefetch)
        if strategy.offload_optimizer:
            host += optimizer
            optimizer = 0.0
        if strategy.offload_param:
            host += 2.0 * P / n
            weights = 2 * 2.0 * shape.block_params
    scale = 2.0 if precision == "fp32" else 1.0
    per_block_sample = scale * ACT_BYTES_PER_TOKEN_DIM * tokens * shape.dim + 4.0 * text_tokens * shape.cross_dim
    if checkpointing:
        activations = batch * (shape.layers * CHECKPOINT_BYTES_PER_TOKEN_DIM * tokens * shape.dim + per_block_sample)
    else:
        activations = batch * shape.layers * per_block_sample
    return Memory(weights, grads, optimizer, activations, transient, host, profile.usable_memory_bytes)


def comm_costs(strategy: Strategy, params: int, world: int) -> tuple[float, float]:
    """(bytes per optimizer step, bytes per micro-batch) each GPU sends in ring collectives."""
    if world == 1:
        return 0.0, 0.0
    ring = (world - 1) / world
    if strategy.stage == 0:
        return 2 * ring * 4.0 * params, 0.0
    if strategy.stage == 1:
        return 2 * ring * 2.0 * params, 0.0
    if strategy.stage == 2:
        return ring * 2.0 * params, ring * 2.0 * params
    return 0.0, 3 * ring * 2.0 * params


def accumulation_for(per_step_s: float, per_micro_s: float, micro_s: float, fraction: float,
                     other_s: float = 0.0) -> int | None:
    """Smallest a with (p + q a) <= f (a t + o + p + q a); None when no a gets there.

    p, q: communication per step and per micro-batch; t: compute per micro-batch; o: other per-step time (offload).
    """
    def ok(a: int) -> bool:
        return (per_step_s + per_micro_s * a) * (1 - fraction) <= fraction * (a * micro_s + other_s) * (1 + 1e-12)

    denominator = fraction * micro_s - per_micro_s * (1 - fraction)
    if denominator <= 0:  # more accumulation cannot lower the share
        return 1 if ok(1) else None
    return max(1, math.ceil((per_step_s * (1 - fraction) - fraction * other_s) / denominator - 1e-9))


def _pools(hardware, profile_override: str | None) -> list[Pool]:
    def resolve(name: str | None, where: str) -> Profile:
        name = profile_override or name
        if name is None:
            if not hardware.use_gpu:
                return PROFILES["cpu"]
            raise PlanError(f"{where}: no hardware profile; set hardware.profile (e.g. rtx4090, l40s) or pass --profile")
        if name not in PROFILES:
            raise PlanError(f"--profile: unknown profile '{name}'; choose one of {', '.join(PROFILES)}")
        return PROFILES[name]

    if hardware.nodes:
        return [Pool(p.name, resolve(p.profile or hardware.profile, f"hardware.nodes.{i}.profile"), p.count, p.gpus_per_node)
                for i, p in enumerate(hardware.nodes)]
    profile = resolve(hardware.profile, "hardware.profile")
    return [Pool("all", profile, 1, hardware.num_workers)]


def make_plan(manifest, *, profile: str | None = None, model: str | None = None, strategy: str | None = None,
              mfu: float = ASSUMED_MFU, max_comm_fraction: float = DEFAULT_MAX_COMM_FRACTION) -> Plan:
    """Plan a validated Manifest. ``profile``/``model``/``strategy`` override what the manifest says."""
    spec = manifest.spec
    hardware, training = spec.hardware, spec.training
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1]; got {mfu}")
    if not 0 < max_comm_fraction < 1:
        raise PlanError(f"--max-comm must be in (0, 1); got {max_comm_fraction}")
    shape = model_shape(spec.model.pretrained, model)
    pools = _pools(hardware, profile)
    world = sum(p.workers for p in pools)
    resolution = max(d.resolution for d in spec.datasets)
    tokens, text_tokens = shape.tokens(resolution), spec.model.max_sequence_length
    gpu = all(p.profile.gpu for p in pools)
    # 16-bit autocast on GPUs (bf16; fp16 costs the same); fp32 when asked and always on CPU.
    precision = ("fp16" if training.mixed_precision == "fp16" else "bf16") if gpu and training.mixed_precision != "fp32" else "fp32"
    declared = (strategy or declared_strategy(hardware)).lower()
    if declared != "auto" and declared not in STRATEGIES:
        raise PlanError(f"--strategy: unknown '{declared}'; choose auto or one of {', '.join(STRATEGIES)}")

    nodes = sum(p.nodes for p in pools)
    notes: list[str] = []
    link, assumed = None, False
    if nodes > 1:
        if hardware.interconnect:
            link = interconnect(hardware.interconnect, hardware.interconnect_gbps)
        else:
            slowest = min((INTERCONNECTS[p.profile.typical_interconnect] for p in pools), key=lambda i: i.gbit_s)
            link, assumed = interconnect(slowest.name, hardware.interconnect_gbps), True
            notes.append(f"hardware.interconnect not set: assumed {link.name} (typical for {pools[0].profile.name} nodes)")
    bandwidth = min([p.profile.intra_node_bandwidth() for p in pools if p.gpus_per_node > 1 or nodes == 1]
                    + ([link.bandwidth] if link else []))

    flops = (4 if training.gradient_checkpointing else 3) * shape.forward_flops(tokens, text_tokens)
    batch, accumulation = training.batch_size, training.gradient_accumulation_steps
    launch_s = shape.layers * LAUNCH_S_PER_BLOCK * (CHECKPOINT_LAUNCH_FACTOR if training.gradient_checkpointing else 1)
    micro_s = max(max(batch * flops / (p.profile.tflops(precision) * 1e12 * mfu), launch_s if p.profile.gpu else 0.0)
                  for p in pools)
    rollout_forwards, rollout_calls, rollout_s = _rollout_cost(training, shape, tokens, text_tokens, pools, precision, mfu)
    micro_s += rollout_s

    plans: dict[str, StrategyPlan] = {}
    for s in STRATEGIES.values():
        if s.stage and not gpu:
            continue  # DeepSpeed on CPU works for tests, but is not something to plan a run with
        memory = {p.name: memory_per_gpu(shape, s, world=world, batch=batch, tokens=tokens, text_tokens=text_tokens,
                                         checkpointing=training.gradient_checkpointing, precision=precision,
                                         profile=p.profile) for p in pools}
        per_step, per_micro = comm_costs(s, shape.params, world)
        per_step_s, per_micro_s = per_step / bandwidth, per_micro / bandwidth
        comm_bytes = per_step + per_micro * accumulation
        comm_s = per_step_s + per_micro_s * accumulation
        offload_s = 0.0
        if s.offload_optimizer:
            pcie = min(p.profile.pcie_gbs for p in pools) * 1e9 * 0.8
            offload_s += shape.params / world / CPU_ADAM_PARAMS_PER_S + 4.0 * shape.params / world / pcie
            if s.offload_param:
                offload_s += accumulation * 2 * 2.0 * shape.params / world / pcie
        # The GPU optimizer step runs over this worker's partition (ZeRO) unless it is offloaded.
        optimizer_s = 0.0 if s.offload_optimizer else max(
            shape.params / (world if s.stage else 1) * OPTIMIZER_BYTES_PER_PARAM / (p.profile.memory_gbs * 1e9)
            for p in pools)
        step_s = accumulation * micro_s + optimizer_s + comm_s + offload_s
        plans[s.name] = StrategyPlan(
            strategy=s, memory=memory, micro_s=micro_s, comm_bytes=comm_bytes, comm_s=comm_s, offload_s=offload_s,
            optimizer_s=optimizer_s, step_s=step_s, samples_per_s=world * batch * accumulation / step_s,
            comm_fraction=comm_s / step_s,
            accumulation_for_target=accumulation_for(per_step_s, per_micro_s, micro_s, max_comm_fraction,
                                                     offload_s + optimizer_s),
        )
    if declared != "auto" and declared not in plans:
        raise PlanError(f"hardware.strategy: {declared} needs GPUs; this manifest has none (use_gpu: false)")
    env = nccl_env([p.profile.name for p in pools], link.name if link else hardware.interconnect,
                   hardware.nccl_socket_ifname, hardware.nccl_env) if gpu else {}
    return Plan(model=shape, params=shape.params, resolution=resolution, tokens=tokens, text_tokens=text_tokens,
                batch_size=batch, accumulation=accumulation, checkpointing=training.gradient_checkpointing,
                precision=precision, world=world, pools=pools, link=link, link_assumed=assumed, bandwidth=bandwidth,
                mfu=mfu, max_comm_fraction=max_comm_fraction, declared=declared, strategies=plans, env=env, notes=notes,
                rollout_forwards=rollout_forwards, rollout_calls=rollout_calls, rollout_s=rollout_s)


def _rollout_cost(training, shape: SanaShape, tokens: int, text_tokens: int, pools: list[Pool], precision: str,
                  mfu: float) -> tuple[float, float, float]:
    """Scheduled sampling's ``(forwards per sample, forward calls per micro-batch, seconds per
    micro-batch)`` at its final probability (after any ramp); zeros when it is off."""
    from sana_ray.model.rollout import expected_rollout  # pure Python at import

    spec = getattr(training, "scheduled_sampling", None)
    if spec is None or spec.max_step_offset <= 0 or spec.probability <= 0:
        return 0.0, 0.0, 0.0
    per_sample, calls = expected_rollout(spec.max_step_offset, spec.strategy, spec.probability, training.batch_size)
    forward = shape.forward_flops(tokens, text_tokens)
    launch = calls * shape.layers * LAUNCH_S_PER_BLOCK * ROLLOUT_LAUNCH_FRACTION
    seconds = max(max(training.batch_size * per_sample * forward / (p.profile.tflops(precision) * 1e12 * mfu),
                      launch if p.profile.gpu else 0.0) for p in pools)
    return per_sample, calls, seconds


# --------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def verdict(plan: Plan) -> str:
    best = plan.best()
    chosen = plan.chosen
    lines = []
    if plan.declared == "auto":
        if best is None:
            lines.append("strategy auto: NOTHING FITS; lower training.batch_size, turn on training.gradient_checkpointing, "
                         "or use GPUs with more memory")
        else:
            lines.append(f"strategy auto picks {best.strategy.name}: {_seconds(best.step_s)} per step, "
                         f"{best.samples_per_s:.2f} samples/s")
    elif chosen.fits:
        lines.append(f"OK: {plan.declared} fits ({', '.join(f'{k} {_gib(m.peak)}/{_gib(m.usable)} GiB' for k, m in chosen.memory.items())}), "
                     f"{_seconds(chosen.step_s)} per step, {chosen.samples_per_s:.2f} samples/s")
        if best is not None and best is not chosen and best.step_s < 0.95 * chosen.step_s:
            lines.append(f"faster: {best.strategy.name} ({_seconds(best.step_s)} per step)")
    else:
        over = [f"{k} needs {_gib(m.peak)} GiB of {_gib(m.usable)}" for k, m in chosen.memory.items() if not m.fits]
        lines.append(f"DOES NOT FIT: {plan.declared} ({'; '.join(over)})")
        if best is not None:
            lines.append(f"fastest that fits: {best.strategy.name} ({_seconds(best.step_s)} per step); strategy auto would pick it")
        else:
            lines.append("nothing fits: lower training.batch_size or turn on training.gradient_checkpointing")
    target = chosen or best
    if target is not None and target.comm_fraction > plan.max_comm_fraction:
        need = target.accumulation_for_target
        lines.append(
            f"communication is {target.comm_fraction:.0%} of the step (target {plan.max_comm_fraction:.0%}): "
            + (f"set training.gradient_accumulation_steps: {need}" if need else
               f"{target.strategy.name} communicates every micro-batch, so accumulation cannot get it there")
        )
    return "\n".join(lines)


def render(plan: Plan, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:  # piped or in CI: wide enough that the tables do not wrap
        console = Console() if sys.stdout.isatty() else Console(width=150)
    pools = ", ".join(f"{p.name}: {p.nodes} x {p.gpus_per_node} {p.profile.name}" for p in plan.pools)
    link = (f"{plan.link.name} ({plan.link.gbit_s:g} Gbit/s{', assumed' if plan.link_assumed else ''})"
            if plan.link else "single node")
    console.print(f"[bold]{plan.model.name}[/]: {plan.params / 1e6:,.0f}M parameters, {plan.model.layers} blocks, hidden {plan.model.dim}")
    console.print(f"{plan.resolution} px -> {plan.tokens} latent tokens (/{plan.model.downsample} VAE, patch {plan.model.patch}) "
                  f"+ {plan.text_tokens} text tokens; batch {plan.batch_size} x accumulation {plan.accumulation} x {plan.world} GPUs; "
                  f"{plan.precision}; gradient checkpointing {'on' if plan.checkpointing else 'off'}")
    console.print(f"pools: {pools}; between nodes: {link}; ring bandwidth {plan.bandwidth / 1e9:.1f} GB/s")
    console.print(f"compute: {plan.flops_per_sample / 1e12:.2f} TFLOP per sample (training), MFU assumed {plan.mfu:.0%}")
    if plan.rollout_calls:
        forward = plan.model.forward_flops(plan.tokens, plan.text_tokens)
        console.print(f"scheduled sampling: {plan.rollout_calls:.1f} rollout forward calls per micro-batch "
                      f"({plan.rollout_forwards:.2f} per sample, +{plan.rollout_forwards * forward / 1e12:.2f} TFLOP), "
                      f"+{_seconds(plan.rollout_s)} per micro-batch (in the times below)")
    for note in plan.notes:
        console.print(f"[yellow]note[/]: {note}")

    for pool in plan.pools:
        table = Table(title=f"memory per GPU in GiB, pool {pool.name} ({pool.profile.name}, {pool.profile.memory_gib:.1f} GiB; "
                      f"usable {_gib(pool.profile.usable_memory_bytes)})", box=box.SIMPLE_HEAVY, title_justify="left")
        for column in ("strategy", "weights", "grads", "optimizer", "activations", "opt. temp", "peak", "host RAM", "fits"):
            table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
        for name, sp in plan.strategies.items():
            m = sp.memory[pool.name]
            marks = (" *" if name == plan.declared else "")
            table.add_row(name + marks, _gib(m.weights), _gib(m.gradients), _gib(m.optimizer), _gib(m.activations),
                          _gib(m.transient), _gib(m.peak), _gib(m.host) if m.host else "-",
                          "[green]yes[/]" if m.fits else "[red]NO[/]")
        console.print(table)

    best = plan.best()
    table = Table(title="time per optimizer step (slowest pool; communication not overlapped)",
                  box=box.SIMPLE_HEAVY, title_justify="left")
    for column in ("strategy", "compute s", "optim s", "comm GB/GPU", "comm s", "offload s", "step s", "samples/s", "comm %",
                   f"accum for comm <= {plan.max_comm_fraction:.0%}", "fits"):
        table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    for name, sp in plan.strategies.items():
        marks = (" *" if name == plan.declared else "") + (" <- auto" if sp is best else "")
        table.add_row(name + marks, f"{plan.accumulation * sp.micro_s:.2f}", f"{sp.optimizer_s:.3f}" if sp.optimizer_s else "-",
                      f"{sp.comm_bytes / 1e9:.2f}",
                      f"{sp.comm_s:.2f}", f"{sp.offload_s:.2f}" if sp.offload_s else "-", f"{sp.step_s:.2f}",
                      f"{sp.samples_per_s:.2f}", f"{sp.comm_fraction:.0%}",
                      str(sp.accumulation_for_target) if sp.accumulation_for_target else "never",
                      "[green]yes[/]" if sp.fits else "[red]NO[/]")
    console.print(table)
    if plan.env:
        console.print("NCCL env for the workers: " + " ".join(f"{k}={v}" for k, v in plan.env.items()))
    console.print("* declared strategy. Figures are estimates (docs/hardware.md says how they are made).")
    console.print(f"[bold]{verdict(plan)}[/]")


# --------------------------------------------------------------------------------------
# strategy: auto
# --------------------------------------------------------------------------------------


def resolve_auto_strategy(manifest):
    """``(manifest, note)``: with ``hardware.strategy: auto``, the manifest with the fastest strategy
    that fits (the plan's ``best()``) written into ``hardware`` (ddp, or deepspeed with its stage and
    offload flags), and a line saying what was picked and why; otherwise ``(manifest, None)``.

    Raises PlanError when nothing fits or the hardware has no profile to plan with. The training run
    then records the resolved manifest, so its fingerprint and MLflow params say what really ran.
    """
    hardware = manifest.spec.hardware
    if hardware.strategy != "auto":
        return manifest, None
    plan = make_plan(manifest, strategy="auto")
    best = plan.best()
    if best is None:
        raise PlanError("hardware.strategy: auto found nothing that fits: " + verdict(plan).splitlines()[0].split(": ", 1)[-1]
                        + f" (see `sana-ray plan`)")
    chosen = best.strategy
    data = manifest.model_dump(mode="json")
    hw = data["spec"]["hardware"]
    if chosen.stage == 0:
        hw["strategy"] = "ddp"
    else:
        hw["strategy"] = "deepspeed"
        hw["deepspeed"] = {**(hw.get("deepspeed") or {}), "stage": chosen.stage,
                           "offload_optimizer": chosen.offload_optimizer, "offload_params": chosen.offload_param}
    resolved = type(manifest).model_validate(data)
    peak = max(m.peak for m in best.memory.values())
    usable = min(m.usable for m in best.memory.values())
    note = (f"strategy auto -> {chosen.name}: the fastest that fits ({_gib(peak)} of {_gib(usable)} GiB per GPU, "
            f"{_seconds(best.step_s)} per step planned; `sana-ray plan` shows the alternatives)")
    return resolved, note
