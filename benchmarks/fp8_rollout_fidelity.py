#!/usr/bin/env python
"""What --rollout_dtype fp8 changes: the rollout image and the training gradient, against a bf16
rollout from the same noise and prompts, on models with random weights (issue #24, item 2).

    # full size on one GPU (FLUX.1-dev-size transformer and VAE, bf16, LoRA r=64 as the trainers)
    python benchmarks/fp8_rollout_fidelity.py --size full --resolution 720 --rollout_steps 25

    # the tiny models on the CPU (what tests/test_fp8_rollout.py runs)
    python benchmarks/fp8_rollout_fidelity.py --size tiny --resolution 64 --rollout_steps 3

Prints one line: the decoded rollout images' PSNR (dB, images in [0, 1]) and largest pixel
difference, and the cosine between the LoRA gradients of one Direct-Align step (same start point,
same injected noise) taken from each rollout. The rollout's time is timed too, both ways, on a GPU.
"""

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import benchmark_trainers  # noqa: E402
from flux_rl import models  # noqa: E402
from flux_rl.direct_align import direct_align_recover  # noqa: E402


def gradient_from(run, x0, noise, cond, sigma_high=0.6, sigma_low=0.5):
    """The LoRA gradient of one Direct-Align step (Eq. 5) from rollout image x0, as a flat vector."""
    run.optimizer.zero_grad(set_to_none=True)
    x0_hat = direct_align_recover(x0, noise, sigma_high, sigma_low, run.velocity_fn(cond), "denoise")
    reward, _ = run.reward(run.decode(x0_hat), ["prompt 0"] * x0.shape[0])
    (-reward.mean()).backward()
    return torch.cat([p.grad.flatten().float() for p in models.trainable_parameters(run.transformer)])


def measure(size="tiny", resolution=64, rollout_steps=3, device=None):
    from accelerate import Accelerator

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 autocast on the CPU too, as on the GPU (and as every other Accelerator of the test suite's processes: accelerate
    # keeps one state per process and refuses a second precision)
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    module, flags = benchmark_trainers.TRAINERS["direct_align"]
    run = benchmark_trainers.build_run(module, flags, size, "lora", resolution, rollout_steps, False, device, accelerator,
                                       checkpointing=size == "full")
    run.transformer.to(device)
    run.vae.to(device)
    # LoRA weights away from their zero start, so that the merged-in adapters matter as after some training.
    with torch.no_grad():
        for name, parameter in run.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01, generator=torch.Generator(parameter.device).manual_seed(0))
    results, images, times = {}, {}, {}
    for dtype in ("bf16", "fp8"):
        run.args.rollout_dtype = dtype
        benchmark_trainers.synchronize(device)
        started = time.perf_counter()
        x0, noise, cond = run.rollout(["prompt 0"], torch.Generator().manual_seed(0))
        benchmark_trainers.synchronize(device)
        times[dtype] = time.perf_counter() - started
        with torch.no_grad():
            images[dtype] = run.decode(x0).float()
        results[dtype] = gradient_from(run, x0, noise, cond)
    mse = float(((images["fp8"] - images["bf16"]) ** 2).mean())
    return {
        "psnr_db": 10 * math.log10(1 / max(mse, 1e-20)),
        "max_pixel_difference": float((images["fp8"] - images["bf16"]).abs().max()),
        "gradient_cosine": float(torch.nn.functional.cosine_similarity(results["fp8"], results["bf16"], dim=0)),
        "rollout_s_bf16": times["bf16"], "rollout_s_fp8": times["fp8"], "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rollout_steps", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.size, args.resolution, args.rollout_steps)
    print(", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
