"""A frozen base in 4 bits under LoRA (QLoRA, --quantize_base nf4): every linear layer of the
transformer's blocks becomes a bitsandbytes Linear4bit holding NF4 codes (one 4-bit code per
weight, an absmax scale per 64 weights (see blocksize), the scales themselves 8-bit: 0.52 bytes
per weight instead of 2). The blocks' linear layers hold 11.83B of FLUX.1's 11.90B parameters, so
the transformer's weights go from 22.2 to 5.8 GiB; the embedders and the output layer stay in
bf16. Each forward dequantizes a layer's weight to the compute dtype and runs a bf16 matmul; the
LoRA adapters (fp32) sit beside it and the gradient reaches the input through the dequantized
weight, as in QLoRA.

Why the layers are replaced here and not by diffusers' BitsAndBytesConfig at from_pretrained:
diffusers' quantizer refuses to run without a GPU, so a test could not load through it; replacing
after the bf16 load is one code path on every machine and for every family. The price is the
bf16 copy in host memory while it loads (the pipeline is loaded on the CPU anyway). Each layer is
moved to the device and quantized there one at a time, so the GPU never holds the bf16 model."""

import torch
from torch import nn

from .models import block_lists

QUANT_TYPE = "nf4"


def blocksize(row_length: int) -> int | None:
    """Weights per absmax scale: 64 (bitsandbytes' default), or 32 for rows that are not a multiple of 64 (the tiny test
    models' 32-, 96- and 160-wide layers); None for rows of neither, which stay unquantized (the tiny Z-Image's 85-wide
    feed-forward). bitsandbytes quantizes the flattened weight in blocks, but its CPU dequantization kernel (0.50.2)
    finds each block's scale row by row: with rows that are not a whole number of blocks it multiplies by a neighbour's
    scale (errors up to the block's largest weight, where 0.15 of it is NF4's own). A block size that divides the row
    makes both agree. The real models' rows are all multiples of 64 (FLUX.1 and FLUX.2 [klein] 3072 / 9216 / 12288 /
    15360, Qwen-Image 3072 / 12288, SD3.5 Large 2432 / 9728, Z-Image 3840 / 10240; FLUX.1's checked in the tests)."""
    return 64 if row_length % 64 == 0 else 32 if row_length % 32 == 0 else None


def nf4_linear(linear: nn.Linear, device, compute_dtype: torch.dtype) -> nn.Module:
    """`linear`'s weights as a bitsandbytes Linear4bit on `device`, quantized there (Params4bit
    quantizes when it moves to a device), frozen."""
    import bitsandbytes as bnb

    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type=QUANT_TYPE, device="meta")
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=blocksize(linear.in_features),
                                         compress_statistics=True, quant_type=QUANT_TYPE)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    # On a CPU with AVX512-BF16, bitsandbytes repacks the weight for its inference kernel at the first forward in eval
    # mode without gradient (the rollout), and from then on runs every forward, with gradient too, through that kernel,
    # which autograd does not see: the training branches would lose the gradient through the base weights.
    quantized.support_avx512bf16_for_cpu = False
    return quantized.train(linear.training).to(device)


def quantize_blocks_nf4(transformer, device, compute_dtype: torch.dtype) -> int:
    """Replaces every nn.Linear inside the transformer's blocks (models.block_lists) with its NF4
    copy on `device` (but those whose rows no block size divides: see blocksize); returns how many.
    Run before LoRA is added: peft then wraps the 4-bit layers."""
    count = 0
    for blocks in block_lists(transformer):
        for block in blocks:
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    # not a subclass: a Linear4bit is an nn.Linear too
                    if type(child) is nn.Linear and blocksize(child.in_features):
                        setattr(parent, name, nf4_linear(child, device, compute_dtype))
                        count += 1
    return count


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` holds a 4-bit layer: its weights cannot be merged into, cast or copied as floats."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())


def weight_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers as stored (4-bit codes as their uint8 storage), plus
    the 4-bit layers' scales (bitsandbytes keeps them in a quant_state beside the parameter)."""
    total = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    for parameter in module.parameters():
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:  # the scales' own scales (compress_statistics)
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.state2.code.numel() * 4
    return total
