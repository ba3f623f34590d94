"""Where a full-size Sana 1.6B step's time goes on one GPU (companion to gpu_step.py).

    python3 benchmarks/gpu_breakdown.py [--out breakdown.json]

gpu_step.py found steps far slower than FLOPs predict at small batches (1.6B at 1024 px, bf16:
152 ms at batch 1, where 9 TFLOP at the matmul rate is ~12 ms). This splits one bare step into
forward+backward and the optimizer (AdamW foreach, as sana-ray builds it today, vs fused), reads the
GPU's busy time from the PyTorch profiler (kernel time over wall time: a low fraction means the
CPU cannot launch kernels fast enough), and tries ``torch.compile`` on the transformer blocks (one
compiled block shape serves all 20). Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sana_ray.plan import KNOWN_MODELS  # noqa: E402

TEXT_TOKENS = 300


def timed(fn, *, warmup: int = 2, steps: int = 6) -> float:
    """Median wall seconds of fn() with a device sync after each call."""
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def gpu_busy_fraction(fn) -> tuple[float, float]:
    """(kernel seconds, wall seconds) of one call of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return kernel_us / 1e6, wall


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compile-budget-s", type=float, default=150)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from diffusers import SanaTransformer2DModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        model = SanaTransformer2DModel(**KNOWN_MODELS["sana-1600m"]).train()
    results: dict = {"torch": torch.__version__}

    def inputs(batch: int):
        latents = torch.randn(batch, 32, 32, 32, device=device)
        text = torch.randn(batch, TEXT_TOKENS, 2304, device=device)
        mask = torch.zeros(batch, TEXT_TOKENS, dtype=torch.long, device=device)
        mask[:, :120] = 1
        sigmas = torch.rand(batch, device=device)
        return latents, text, mask, sigmas

    def forward_backward(m, batch_inputs):
        latents, text, mask, sigmas = batch_inputs
        noise = torch.randn_like(latents)
        s = sigmas.view(-1, 1, 1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(hidden_states=(1 - s) * latents + s * noise, encoder_hidden_states=text,
                    encoder_attention_mask=mask, timestep=sigmas * 1000, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), (noise - latents).float())
        loss.backward()

    for fused in (False, True):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused, foreach=None if fused else True)
        x = inputs(1)
        forward_backward(model, x)

        def opt_step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        results[f"optimizer_step_ms_{'fused' if fused else 'foreach'}"] = timed(opt_step) * 1e3
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        torch.cuda.empty_cache()
    print(json.dumps(results), flush=True)

    for batch in args.batches:
        x = inputs(batch)
        model.zero_grad(set_to_none=True)
        fb = timed(lambda: forward_backward(model, x))
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            fwd = timed(lambda: model(hidden_states=x[0], encoder_hidden_states=x[1], encoder_attention_mask=x[2],
                                      timestep=x[3] * 1000, return_dict=False))
        row = {"batch": batch, "forward_ms": fwd * 1e3, "forward_backward_ms": fb * 1e3}
        try:
            kernel_s, wall_s = gpu_busy_fraction(lambda: forward_backward(model, x))
            row |= {"profiled_kernel_ms": kernel_s * 1e3, "profiled_wall_ms": wall_s * 1e3, "gpu_busy": kernel_s / wall_s}
        except Exception as error:  # noqa: BLE001 - a report, not a product path
            row["profiler_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        model.zero_grad(set_to_none=True)
        results[f"eager_b{batch}"] = row
        print(json.dumps(row), flush=True)

    # torch.compile of each block (the same code and shapes: compiled once, reused by all 20).
    started = time.perf_counter()
    try:
        for block in model.transformer_blocks:
            block.compile()
        x = inputs(args.batches[0])
        forward_backward(model, x)  # compiles
        torch.cuda.synchronize()
        results["compile_s"] = time.perf_counter() - started
        print(json.dumps({"compile_s": results["compile_s"]}), flush=True)
        for batch in args.batches:
            if time.perf_counter() - started > args.compile_budget_s:
                break
            x = inputs(batch)
            model.zero_grad(set_to_none=True)
            fb = timed(lambda: forward_backward(model, x))
            results[f"compiled_b{batch}"] = {"forward_backward_ms": fb * 1e3}
            print(json.dumps({"batch": batch, "compiled_forward_backward_ms": fb * 1e3}), flush=True)
    except Exception as error:  # noqa: BLE001 - a report, not a product path
        results["compile_error"] = f"{type(error).__name__}: {str(error)[:500]}"
        print(results["compile_error"], flush=True)

    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
