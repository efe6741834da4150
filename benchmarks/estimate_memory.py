#!/usr/bin/env python
"""Peak GPU memory of one full-size training step, estimated without a GPU: the step runs on the
meta device (shapes, no storage, as the FLOP count of benchmark_trainers.py --device meta) under a
dispatch mode that adds up the bytes of every storage alive at each op. The number to compare is
torch.cuda.max_memory_allocated of the same step on a GPU (what benchmark_trainers.py reports):
allocated bytes, not what the caching allocator reserves, and not the CUDA context.

    # the recorded H200 configurations first (benchmarks/RESULTS.md), then the ones no GPU has run yet
    python benchmarks/estimate_memory.py --variant="--lora_layers attention" --variant="" \\
        --variant="--quantize_base nf4 --use_8bit_adam --no_batch_branches"
    python benchmarks/estimate_memory.py --mode full_bf16 --variant="" --variant="--use_8bit_adam"
    # FLUX.2 [klein] base 4B and Qwen-Image as README's commands run them (CFG 4 in the rollout, one pass in the branches)
    python benchmarks/estimate_memory.py --family flux2_klein --variant="--rollout_guidance 4 --train_guidance 1"
    python benchmarks/estimate_memory.py --family qwen_image --resolution 928,1664 \
        --variant="--rollout_guidance 4 --train_guidance 1"

What differs from the GPU: attention runs as flash attention's own aten op (its meta kernel: the
output and log-sum-exp saved, as on the GPU; the math kernel would hold every N x N score matrix);
the step runs eager (the recorded numbers are of compiled blocks, whose fused kernels hold fewer
intermediates); cuBLAS and cuDNN workspaces are not counted. Two things have no meta kernels and
are stood in for, by objects of the same storage: bitsandbytes' AdamW8bit (two uint8 moments and
one fp32 scale per 256 values: 2.03 bytes per parameter), and bitsandbytes' NF4 layers
(--quantize_base nf4: uint8 codes and scales as stored, and in each forward and backward the
weight dequantized to bf16 for the matmul, freed after it, as bitsandbytes' matmul_4bit does).
Each configuration takes one to three minutes on a 2-core CPU at 720 px.
"""

import argparse
import contextlib
import gc
import os
import shlex
import sys
import time
import warnings

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import benchmark_trainers  # noqa: E402

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive, counted at every op's outputs; `peak` is the most at any op.
    Storages alive when it starts (weights, optimizer state) are counted from the start: everything
    reachable on `device`. A view shares its base's storage and counts once."""

    def __init__(self, device="meta"):
        super().__init__()
        self.device = torch.device(device)
        self.live = {}  # storage key -> (weak reference, bytes)
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated module proxies warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                try:
                    if isinstance(obj, torch.Tensor) and obj.device == self.device:
                        self._add(obj)
                except Exception:  # an object that only looks like a tensor to isinstance (lazy proxies)
                    continue
        self.start = self.current = self.peak = sum(size for _, size in self.live.values())

    def _add(self, tensor) -> int:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live and not self.live[key][0].expired():
            return 0
        self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        return storage.nbytes()

    def _sweep(self):
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        added = sum(self._add(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device == self.device)
        if added:
            self.current += added
            if self.current > self.peak:  # freed storages are subtracted lazily: only a new peak needs the exact sum
                self._sweep()
                self.peak = max(self.peak, self.current)
        return out


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as the GPU runs it for FLUX (flash attention: no mask, head dim 128), through the
    aten op whose meta kernel allocates what flash allocates; with a mask, the math path as before."""
    if attn_mask is not None or enable_gqa:
        return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]


_sdpa = torch.nn.functional.scaled_dot_product_attention


class EightBitAdamStandIn(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit's memory on the meta device: per parameter two uint8 moments and an fp32 scale per 256
    values, made at the first step as bitsandbytes makes them. It computes nothing (meta tensors hold no values)."""

    def __init__(self, params, lr=1e-4, **_):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    blocks = (p.numel() + 255) // 256
                    state["state1"] = torch.empty_like(p, dtype=torch.uint8)
                    state["state2"] = torch.empty_like(p, dtype=torch.uint8)
                    state["absmax1"] = torch.empty(blocks, device=p.device)
                    state["absmax2"] = torch.empty(blocks, device=p.device)
                p.add_(p.grad, alpha=-group["lr"])  # the write of the update (no values on meta)


class _DequantizedMatmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized from its 4-bit codes for the product and dropped after it, in the forward and
    again in the backward (bitsandbytes' MatMul4Bit saves the codes, not the weight)."""

    @staticmethod
    def forward(ctx, x, codes, scales, bias, shape, dtype):
        ctx.save_for_backward(codes, scales)
        ctx.shape, ctx.dtype = shape, dtype
        weight = torch.empty(shape, dtype=dtype, device=x.device)  # the dequantized copy
        out = torch.nn.functional.linear(x, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad.device)
        return grad @ weight, None, None, None, None, None


class NF4StandIn(torch.nn.Linear):
    """A Linear4bit's memory: 0.5 byte per weight, one uint8 scale per 64 and an fp32 one per 256 scales; an nn.Linear
    subclass, as Linear4bit is, so that peft wraps it the same way."""

    def __init__(self, linear, dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        numel, device = linear.weight.numel(), linear.weight.device
        self.weight = torch.nn.Parameter(torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("scales", torch.empty(numel // 64 + (numel // 64 + 255) // 256 * 4, dtype=torch.uint8, device=device))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.compute_dtype = dtype

    def forward(self, x):
        return _DequantizedMatmul.apply(x, self.weight, self.scales, self.bias, (self.out_features, self.in_features),
                                        self.compute_dtype)


@contextlib.contextmanager
def meta_stand_ins():
    """Inside: flash attention's op for scaled_dot_product_attention, and the NF4 layers and 8-bit Adam as stand-ins."""
    from flux_rl import quantization, training

    def nf4_stand_in(linear, device, compute_dtype):  # quantization.quantize_blocks_nf4 picks the layers, as for real
        return NF4StandIn(linear, compute_dtype)

    make_optimizer = training.make_optimizer

    def optimizer(args, params, lr):
        if args.use_8bit_adam and not args.bf16_weights:
            return EightBitAdamStandIn(params, lr)
        return make_optimizer(args, params, lr)

    saved = (torch.nn.functional.scaled_dot_product_attention, quantization.nf4_linear, training.make_optimizer)
    torch.nn.functional.scaled_dot_product_attention = flash_attention
    quantization.nf4_linear, training.make_optimizer = nf4_stand_in, optimizer
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention, quantization.nf4_linear, training.make_optimizer = saved


def estimate(trainer, mode, resolution, rollout_steps, variant, size="full", family="flux1"):
    """(peak GiB, GiB alive before the step) of the second step of one configuration (the first makes the optimizer
    state, as on the GPU, whose peak benchmark_trainers.py takes over later steps)."""
    from accelerate import Accelerator

    module, flags = benchmark_trainers.TRAINERS[trainer]
    device = torch.device("meta")
    with meta_stand_ins():
        run = benchmark_trainers.build_run(module, flags + shlex.split(variant), size, mode, resolution, rollout_steps, False,
                                           device, Accelerator(mixed_precision="bf16", cpu=True), family=family)
        benchmark_trainers.one_step(module, run, 0)
        with LiveBytes(device) as live:
            benchmark_trainers.one_step(module, run, 1)
    del run
    gc.collect()
    return live.peak / GIB, live.start / GIB


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="srpo", choices=list(benchmark_trainers.TRAINERS))
    parser.add_argument("--mode", default="lora", choices=["lora", "full", "full_bf16"])
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--family", default="flux1", choices=benchmark_trainers.FAMILIES,
                        help="flux1: FLUX.1-dev; flux2_klein: FLUX.2 [klein] base 4B; qwen_image: Qwen-Image (guidance in --variant).")
    parser.add_argument("--resolution", default="720", help="One side (720) or HEIGHT,WIDTH (928,1664), as the trainers take it.")
    parser.add_argument("--rollout_steps", type=int, default=25)
    parser.add_argument("--variant", action="append", default=None, help="Repeatable: more trainer flags ('' for none).")
    args = parser.parse_args(input_args)
    lines = [f"Estimated on the meta device: {args.family} {args.trainer} {args.mode} at {args.resolution} px, size {args.size}, "
             "gradient checkpointing (transformer and VAE), bf16", "",
             "| variant | peak GiB | alive before the step GiB | seconds to estimate |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for variant in args.variant or [""]:
        started = time.perf_counter()
        peak, start = estimate(args.trainer, args.mode, args.resolution, args.rollout_steps, variant, args.size, args.family)
        lines.append(f"| {variant or '-'} | {peak:.1f} | {start:.1f} | {time.perf_counter() - started:.0f} |")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
