"""Full-size Sana on one GPU: step time, peak memory and MFU, sana-ray's step vs a bare loop, plan vs measured.

    python3 benchmarks/gpu_step.py [--out results.json]              # the GPU run (about 2-4 minutes)
    .venv/bin/python benchmarks/gpu_step.py --device cpu --layers 1 --resolution 128 --batches 1 --steps 2 --warmup 1
                                                                      # a smoke test of the script on a CPU

What it measures, for a RANDOM-weight ``SanaTransformer2DModel`` with the released Sana 1.6B config
(20 blocks, 70 x 32 heads, 2240 wide) at 1024 px (32 x 32 latent tokens, DC-AE f32c32) with 300 text
tokens (Gemma2 width 2304), bf16 autocast over fp32 weights, AdamW:

* ``sana-ray``: one optimizer step exactly as ``train.loop`` takes it, but without Ray: the project's
  ``build_strategy`` (DDP strategy, world size 1: autocast, clipping, non-finite check, lr schedule),
  ``build_optimizer``, ``sample_u``/``shift_sigmas`` (noise and timesteps drawn on the CPU from a
  per-micro-batch generator, as the loop does), ``flow_matching_loss`` and, when on, the project's
  ``enable_gradient_checkpointing`` (every block);
* ``bare``: the same model in the plainest PyTorch loop (inputs made on the GPU, autocast, MSE,
  backward, clip, ``torch.optim.AdamW``; diffusers' own gradient checkpointing);

at batch 1, 4 and 8, with and without gradient checkpointing. Per configuration: the median step
time over ``--steps`` timed steps after ``--warmup`` steps, the peak allocated GPU memory (from a
fresh optimizer, so weights + gradients + AdamW states + activations), MFU (model FLOPs = 3 x the
forward FLOPs of ``plan.SanaShape``, recomputation not counted, over the datasheet dense bf16 rate and
over the bf16 matmul rate measured in the same run), and what ``sana-ray plan`` predicts for it
(``plan.make_plan`` on an equivalent manifest, ``h200`` profile, DDP): peak memory and step time,
with the error of each.

Runs where the issue says it must: torch (and transformers) on the machine, but no Ray, DeepSpeed,
MLflow or network. diffusers (and pydantic, for the manifest schema the strategy reads) come from
local wheels put on PYTHONPATH; see docs/benchmarks.md for the command. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, not an installed sana_ray

import torch  # noqa: E402

from sana_ray.hardware import PROFILES  # noqa: E402
from sana_ray.manifest.schema import HardwareSpec, Manifest, TrainingSpec  # noqa: E402
from sana_ray.model.flow import flow_matching_loss, sample_u, shift_sigmas  # noqa: E402
from sana_ray.plan import ASSUMED_MFU, KNOWN_MODELS, SanaShape, make_plan  # noqa: E402
from sana_ray.train.activations import enable_gradient_checkpointing  # noqa: E402
from sana_ray.train.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from sana_ray.train.strategy import build_strategy  # noqa: E402

TEXT_TOKENS = 300  # SanaPipeline's max_sequence_length
LR = 1e-5
GIB = 2**30


def build_model(config: dict, device: torch.device):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    with device:  # parameters are created (and initialised) on the GPU: seconds, not a minute on the CPU
        model = SanaTransformer2DModel(**config)
    return model.to(device).train()


def make_inputs(shape: SanaShape, batch: int, resolution: int, device: torch.device, caption_channels: int) -> dict:
    side = resolution // shape.downsample
    generator = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(batch, shape.in_channels, side, side, generator=generator)  # never zeros (see METHOD.md)
    prompt_embeds = torch.randn(batch, TEXT_TOKENS, caption_channels, generator=generator)
    mask = torch.zeros(batch, TEXT_TOKENS, dtype=torch.long)
    mask[:, :120] = 1  # a typical caption fills part of the 300 tokens; padding is masked, as in the cache
    # The cache holds these on the CPU; the loop moves them per micro-batch, so the sana-ray path does too.
    return {"latents": latents, "prompt_embeds": prompt_embeds, "prompt_attention_mask": mask}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")


def time_steps(step, *, warmup: int, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(per-step seconds, losses); each step ends with a device sync so wall time is device time."""
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        started = time.perf_counter()
        loss = step(i)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
            losses.append(loss)
    return times, losses


def sana_ray_step_fn(model, inputs: dict, batch: int, checkpointing: bool, device: torch.device, flow_shift: float):
    """One optimizer step as train.loop takes it (accumulation 1, world size 1, no Ray)."""
    training = TrainingSpec(
        steps=1000, batch_size=batch, mixed_precision="bf16" if device.type == "cuda" else "fp32",
        gradient_checkpointing=checkpointing, flow_shift=flow_shift, optimizer={"name": "adamw", "lr": LR},
    )
    if checkpointing:
        enable_gradient_checkpointing(model, training.gradient_checkpointing_interval)
    else:
        model.disable_gradient_checkpointing()
    optimizer = build_optimizer(model.parameters(), training)
    lr_scheduler = build_lr_scheduler(optimizer, training)
    strategy = build_strategy(training, HardwareSpec(), device, world_size=1)
    strategy.prepare(model, optimizer, lr_scheduler)

    def step(i: int) -> float:
        latents = inputs["latents"].to(device)
        prompt_embeds = inputs["prompt_embeds"].to(device)
        prompt_mask = inputs["prompt_attention_mask"].to(device)
        generator = torch.Generator(device="cpu").manual_seed(i)
        u = sample_u(batch, scheme=training.timestep_sampling.scheme, generator=generator, device="cpu")
        sigmas = shift_sigmas(u, training.flow_shift).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        with strategy.micro_batch(last=True):
            loss = flow_matching_loss(strategy.model, latents, prompt_embeds, prompt_mask, sigmas=sigmas, noise=noise)
            strategy.backward(loss)
        strategy.step()
        return float(loss.detach())

    return step, optimizer


def bare_step_fn(model, inputs: dict, batch: int, checkpointing: bool, device: torch.device, flow_shift: float):
    """The same model in the plainest loop a user would write by hand."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    latents = inputs["latents"].to(device)
    prompt_embeds = inputs["prompt_embeds"].to(device)
    prompt_mask = inputs["prompt_attention_mask"].to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)

    def step(i: int) -> float:
        sigmas = torch.sigmoid(torch.randn(batch, device=device, generator=generator))
        sigmas = flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        s = sigmas.view(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            prediction = model(
                hidden_states=(1 - s) * latents + s * noise, encoder_hidden_states=prompt_embeds,
                encoder_attention_mask=prompt_mask, timestep=sigmas * 1000, return_dict=False,
            )[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, optimizer


def planned(model_name: str, resolution: int, batch: int, checkpointing: bool) -> dict:
    """What `sana-ray plan` says for this configuration on one H200 with DDP."""
    manifest = Manifest.model_validate({
        "apiVersion": "sana-ray/v1", "kind": "TrainingRun", "metadata": {"name": "bench"},
        "spec": {
            "model": {"pretrained": model_name},
            "datasets": [{"name": "d", "path": "/nonexistent", "resolution": resolution}],
            "training": {"steps": 1, "batch_size": batch, "gradient_checkpointing": checkpointing, "mixed_precision": "bf16"},
            "hardware": {"profile": "h200", "num_workers": 1, "strategy": "ddp"},
        },
    })
    plan = make_plan(manifest, model=model_name)
    ddp = plan.strategies["ddp"]
    return {"memory_gib": ddp.memory["all"].peak / GIB, "step_s": ddp.step_s, "assumed_mfu": ASSUMED_MFU}


def matmul_tflops(device: torch.device) -> float:
    """The bf16 matrix rate this GPU reaches here (8192^3, random data, median of 10 after 3 warm-ups)."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sana-1600m", choices=sorted(KNOWN_MODELS))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks (a smoke test on a small machine)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--flow-shift", type=float, default=3.0)
    parser.add_argument("--extra", action="store_true",
                        help="also sana-ray's step at 512 px and for Sana 600M (for the plan's error), batch 4")
    parser.add_argument("--runs", nargs="+", default=None, metavar="MODEL:PX:BATCH",
                        help="instead of --model/--resolution/--batches: these configurations (each with and "
                        "without checkpointing), e.g. sana-600m:512:16")
    parser.add_argument("--paths", nargs="+", default=["sana-ray", "bare"], choices=["sana-ray", "bare"])
    parser.add_argument("--budget-s", type=float, default=420, help="skip configurations that would start after this")
    parser.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    args = parser.parse_args()

    began = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (the optimizer is elementwise)
    rate = matmul_tflops(device)
    profile = PROFILES["h200"]
    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "matmul_bf16_tflops_measured": rate, "datasheet_bf16_tflops": profile.bf16_tflops,
    }
    import diffusers

    env["diffusers"] = diffusers.__version__
    print(json.dumps(env), flush=True)

    configs = [(args.model, args.resolution, b) for b in args.batches]
    if args.runs:
        configs = [(m, int(px), int(b)) for m, px, b in (run.split(":") for run in args.runs)]
    runs = [(m, px, b, ckpt, path) for m, px, b in configs for ckpt in (False, True) for path in args.paths]
    if args.extra:
        others = [m for m in ("sana-600m", "sana-1600m") if m in KNOWN_MODELS]
        runs += [(m, r, 4, ckpt, "sana-ray") for m in others for r in (512, 1024) for ckpt in (False, True)
                 if (m, r) != (args.model, args.resolution)]

    results, models = [], {}
    for model_name, resolution, batch, ckpt, path in runs:
        if time.perf_counter() - began > args.budget_s:
            print(f"skipped (budget): {model_name} {resolution}px b{batch} ckpt={ckpt} {path}", flush=True)
            continue
        config = dict(KNOWN_MODELS[model_name], sample_size=resolution // 32)
        if args.layers is not None:
            config["num_layers"] = args.layers
        if model_name not in models:
            models.clear()
            reset_memory(device)
            models[model_name] = build_model(config, device)
        model = models[model_name]  # sample_size is unused by the forward (no positional embedding in Sana)
        shape = SanaShape.from_config(model_name, config)
        inputs = make_inputs(shape, batch, resolution, device, config["caption_channels"])

        model.zero_grad(set_to_none=True)
        reset_memory(device)
        make = sana_ray_step_fn if path == "sana-ray" else bare_step_fn
        try:
            step, optimizer = make(model, inputs, batch, ckpt, device, args.flow_shift)
            times, losses = time_steps(step, warmup=args.warmup, steps=args.steps, device=device)
            error = None
        except torch.OutOfMemoryError as oom:
            times, losses, error = [], [], f"out of memory: {str(oom)[:200]}"
        peak = peak_memory(device)
        optimizer = step = None  # noqa: F841  (free the AdamW states before the next configuration)
        model.zero_grad(set_to_none=True)

        tokens = shape.tokens(resolution)
        model_flops = 3 * batch * shape.forward_flops(tokens, TEXT_TOKENS)
        step_s = statistics.median(times) if times else float("nan")
        plan = planned(model_name, resolution, batch, ckpt) if args.layers is None else {}
        row = {
            "model": model_name, "resolution": resolution, "batch": batch, "checkpointing": ckpt, "path": path,
            "params": sum(p.numel() for p in model.parameters()), "plan_params": shape.params,
            "step_s": step_s, "step_s_min": min(times) if times else None, "samples_per_s": batch / step_s,
            "peak_gib": peak / GIB, "model_tflop_per_step": model_flops / 1e12,
            "mfu_datasheet": model_flops / step_s / (profile.bf16_tflops * 1e12),
            "mfu_measured_peak": model_flops / step_s / (rate * 1e12),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None, "error": error,
        }
        if plan:
            row |= {"plan_step_s": plan["step_s"], "plan_peak_gib": plan["memory_gib"],
                    "plan_step_error": plan["step_s"] / step_s - 1, "plan_memory_error": plan["memory_gib"] / (peak / GIB) - 1}
        results.append(row)
        print(json.dumps(row), flush=True)

    if args.out:
        args.out.write_text(json.dumps({"env": env, "results": results}, indent=1))

    print(f"\n{env['device']}  torch {env['torch']}  bf16 matmul {rate:.0f} TFLOP/s measured "
          f"({profile.bf16_tflops:.0f} datasheet)  total {time.perf_counter() - began:.0f} s")
    header = f"{'model':10} {'px':>5} {'b':>2} {'ckpt':>4} {'path':8} {'step ms':>8} {'img/s':>6} {'peak GiB':>8} " \
             f"{'MFU':>5} {'MFU*':>5} {'plan ms':>8} {'err':>6} {'plan GiB':>8} {'err':>6}"
    print(header)
    for r in results:
        plan_cols = (f"{r['plan_step_s'] * 1e3:8.0f} {r['plan_step_error']:+6.0%} {r['plan_peak_gib']:8.1f} "
                     f"{r['plan_memory_error']:+6.0%}") if "plan_step_s" in r else ""
        print(f"{r['model']:10} {r['resolution']:5} {r['batch']:2} {'on' if r['checkpointing'] else 'off':>4} {r['path']:8} "
              f"{r['step_s'] * 1e3:8.1f} {r['samples_per_s']:6.2f} {r['peak_gib']:8.2f} {r['mfu_datasheet']:5.0%} "
              f"{r['mfu_measured_peak']:5.0%} {plan_cols}" + (f"  {r['error']}" if r["error"] else ""))
    pairs = {(r["model"], r["resolution"], r["batch"], r["checkpointing"]): r for r in results if r["path"] == "bare"}
    for r in results:
        bare = pairs.get((r["model"], r["resolution"], r["batch"], r["checkpointing"]))
        if r["path"] == "sana-ray" and bare and bare["step_s"] == bare["step_s"]:
            print(f"sana-ray / bare step time, b{r['batch']} ckpt {'on' if r['checkpointing'] else 'off'}: "
                  f"{r['step_s'] / bare['step_s']:.3f}")
    print("MFU: model FLOPs (3 x forward, recomputation not counted) over the datasheet dense bf16 rate; "
          "MFU*: over the matmul rate measured above.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
