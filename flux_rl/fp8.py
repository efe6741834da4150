"""--rollout_dtype fp8: the no-grad rollout's linear layers as FP8 matmuls (issue #24, item 2).

For the rollout only, each linear layer's current weight (with its LoRA adapters' W + scale B A
added in float32 on the way, the bf16 weight itself untouched) is quantised to float8 e4m3 with one
scale per output row, and its input to e4m3 with
one scale per token; `torch._scaled_mm` multiplies them and applies both scales. The copy is made at
every rollout, so it follows the training, and freed after it (12B parameters: 12 GB while the
rollout runs, below the training branches' peak). The training branches run on the bf16 weights as
before. Hopper runs FP8 matmuls at about twice bf16's rate; the rollout is about 75% of an SRPO step.

Not measured on a GPU yet: its speed and its effect at full size. With per-block compilation dynamo keeps
one graph per block kind for each of the two paths and compiles nothing more as they alternate
(tests/test_fp8_rollout.py, on the CPU with the eager backend); inductor's lowering of _scaled_mm on
the GPU is untested. `benchmarks/fp8_rollout_fidelity.py` measures the effect (the rollout image's
PSNR and the gradient's cosine against a bf16 rollout on the same noise) at either size. Layers whose
sizes are not multiples of 16 (what the FP8 kernels take) stay as they are.
"""

import contextlib
import functools

import torch
from torch import nn

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row) with values * scale ~ tensor: each row's largest magnitude maps to 448."""
    scale = tensor.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (tensor.float() / scale).to(torch.float8_e4m3fn), scale


def _fp8_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, weight_scale = module._fp8_weight
    rows = x.reshape(-1, x.shape[-1])
    values, scale = quantize_rows(rows)
    autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)  # (the meta device has none)
    out_dtype = torch.bfloat16 if autocast or x.dtype == torch.bfloat16 else torch.float32
    out = torch._scaled_mm(values, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, -1), out_dtype=out_dtype)
    if module.bias is not None:
        out = out + module.bias.to(out_dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fp8_ready(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0


def _adapted_weights(model: nn.Module) -> dict:
    """{base layer: (its peft LoRA layer, the names of its active adapters)} for every unmerged LoRA layer of `model`
    whose base layer takes FP8: whose deltas fp8_linears adds into that base layer's copy."""
    from peft.tuners.lora import LoraLayer

    adapted = {}
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and not layer.merged:
            base = layer.get_base_layer()
            if fp8_ready(base):
                adapted[base] = (layer, [name for name in layer.active_adapters if name in layer.lora_A])
    return adapted


@contextlib.contextmanager
def fp8_linears(model: nn.Module):
    """Within: every plain linear layer of `model` (a peft LoRA layer's base layer included, its A and B
    not) runs as an FP8 matmul on an e4m3 copy of its weight made on entry; for an adapted layer the copy is of
    W + its adapters' deltas (added in float32, one layer at a time), and the LoRA layer skips its adapters, as when
    merged, without its bf16 weight being written (a merge would need a restoring copy of every adapted weight: 2
    bytes each, 16 GiB for FLUX's default layers). On exit the copies are dropped and the layers run as before.
    Yields the number of layers converted."""
    patched, skipping = [], []
    try:
        with torch.no_grad():
            adapted = _adapted_weights(model)
            for name, module in model.named_modules():
                if fp8_ready(module) and ".lora_" not in name:  # a LoRA's own A and B: in the base layer's copy
                    weight = module.weight
                    if module in adapted:
                        layer, adapters = adapted[module]
                        weight = weight.float()
                        for adapter in adapters:
                            weight = weight + layer.get_delta_weight(adapter).float()
                        layer.merged_adapters = adapters  # peft's forward then calls the base layer alone
                        skipping.append(layer)
                    module._fp8_weight = quantize_rows(weight)
                    del weight
                    module.forward = functools.partial(_fp8_forward, module)  # shadows nn.Linear.forward for this instance
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward, module._fp8_weight
        for layer in skipping:
            layer.merged_adapters = []
