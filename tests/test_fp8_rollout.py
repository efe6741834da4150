"""--rollout_dtype fp8 (flux_rl/fp8.py): e4m3 quantisation within its rounding, the rollout's linear
layers patched only inside the context and restored after it, and what it changes on the tiny FLUX:
the rollout image (PSNR, largest pixel difference) and the LoRA gradient (cosine) against a bf16
rollout from the same noise (benchmarks/fp8_rollout_fidelity.py, which runs at full size on a GPU)."""

import torch
from torch import nn

from flux_rl import flux, fp8, latents, models
from flux_rl.fp8 import E4M3_MAX, fp8_linears, quantize_rows


def test_quantize_rows_is_within_e4m3_rounding():
    tensor = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64).view(-1, 1)
    values, scale = quantize_rows(tensor)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.allclose(values.float().abs().amax(dim=1), torch.full((64,), E4M3_MAX))  # each row's largest maps to 448
    error = (values.float() * scale - tensor).abs()
    # 3 mantissa bits: half a step is 2^-4 of the value for normal numbers; below 2^-6 (subnormal) the step is fixed.
    assert (error <= torch.maximum(tensor.abs() / 16, scale * 2.0 ** -9) * 1.0001).all()


def test_the_linear_layers_run_fp8_inside_and_as_before_after(tiny_flux):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(f"{tiny_flux}/transformer")
    models.add_lora(transformer, rank=4, alpha=4, target_modules=models.DEFAULT_LORA_TARGETS)
    pipe_cond = flux.Conditioning(torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1)),
                                  torch.randn(1, 32, generator=torch.Generator().manual_seed(2)), torch.zeros(32, 3))
    x = latents.pack(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)))
    ids = latents.image_ids(64, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        reference = flux.velocity(transformer, x, 0.5, 3.5, pipe_cond, ids)
        with fp8_linears(transformer) as count:
            quantized = flux.velocity(transformer, x, 0.5, 3.5, pipe_cond, ids)
        after = flux.velocity(transformer, x, 0.5, 3.5, pipe_cond, ids)
    linear = [m for name, m in transformer.named_modules() if type(m) is nn.Linear and ".lora_" not in name]
    assert count == sum(fp8.fp8_ready(m) for m in linear) == len(linear)  # every base layer (the tiny widths are 16's multiples)

    assert torch.equal(after, reference)  # restored
    assert not any(hasattr(m, "_fp8_weight") or "forward" in vars(m) for m in linear)
    relative = (quantized - reference).norm() / reference.norm()
    assert 0 < relative < 0.1, relative


def test_the_adapters_go_into_the_fp8_copies_without_touching_the_bf16_weights(tiny_flux):
    """With trained (non-zero) adapters: inside, the FP8 output follows W + scale B A (the merged model's output,
    within e4m3's rounding), while every base weight stays bit for bit as it was, so nothing has to be copied and
    restored; after, the adapters run again."""
    from diffusers import FluxTransformer2DModel
    from peft.tuners.lora import LoraLayer

    transformer = FluxTransformer2DModel.from_pretrained(f"{tiny_flux}/transformer")
    models.add_lora(transformer, rank=4, alpha=4, target_modules=models.DEFAULT_LORA_TARGETS)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    cond = flux.Conditioning(torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1)),
                             torch.randn(1, 32, generator=torch.Generator().manual_seed(2)), torch.zeros(32, 3))
    x, ids = latents.pack(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))), latents.image_ids(64, 64, 8, "cpu", torch.float32)
    weights = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    with torch.no_grad():
        adapted = flux.velocity(transformer, x, 0.5, 3.5, cond, ids)
        with models.lora_merged(transformer):
            merged = flux.velocity(transformer, x, 0.5, 3.5, cond, ids)
        with fp8_linears(transformer):
            quantized = flux.velocity(transformer, x, 0.5, 3.5, cond, ids)
            assert all(torch.equal(p, weights[name]) for name, p in transformer.named_parameters())
        after = flux.velocity(transformer, x, 0.5, 3.5, cond, ids)
    transformer.disable_adapters()
    with torch.no_grad():
        base_only = flux.velocity(transformer, x, 0.5, 3.5, cond, ids)
    transformer.enable_adapters()
    assert torch.allclose(merged, adapted, atol=1e-4)  # what the adapters give, as one matmul per layer
    relative = (quantized - merged).norm() / merged.norm()
    assert 0 < relative < 0.1, relative
    assert (quantized - merged).norm() < 0.5 * (base_only - merged).norm()  # the adapters are in the FP8 copies
    assert torch.equal(after, adapted)
    assert not any(layer.merged for layer in transformer.modules() if isinstance(layer, LoraLayer))


def test_fp8_rollout_changes_the_image_and_gradient_little():
    from benchmarks.fp8_rollout_fidelity import measure

    result = measure("tiny", 64, 3, "cpu")
    # measured under bf16 autocast on the CPU: 43.9 dB, 0.049 largest pixel difference, gradient cosine 0.9956
    # (42.9 dB, 0.08, 0.992 against an fp32 rollout, before 2026-12-06)
    assert result["psnr_db"] > 35 and result["max_pixel_difference"] > 0
    assert result["gradient_cosine"] > 0.97


def test_compiled_blocks_do_not_recompile_each_rollout(tiny_flux):
    """Blocks compiled per block (--compile): the FP8 rollout and the bf16 branches alternate every step; dynamo keeps
    one graph of each per block kind (double, single) and compiles nothing more after the first alternation."""
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.testing import CompileCounterWithBackend

    transformer = FluxTransformer2DModel.from_pretrained(f"{tiny_flux}/transformer")
    models.add_lora(transformer, rank=4, alpha=4, target_modules=models.DEFAULT_LORA_TARGETS)
    counter = CompileCounterWithBackend("eager")
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.compile(backend=counter, dynamic=False)
    cond = flux.Conditioning(torch.randn(1, 32, 32), torch.randn(1, 32), torch.zeros(32, 3))
    x, ids = latents.pack(torch.randn(1, 16, 8, 8)), latents.image_ids(64, 64, 8, "cpu", torch.float32)
    frames = []
    with torch.no_grad():
        for _ in range(3):
            plain = flux.velocity(transformer, x, 0.5, 3.5, cond, ids)
            with fp8_linears(transformer):
                quantized = flux.velocity(transformer, x, 0.5, 3.5, cond, ids)
            frames.append(counter.frame_count)
    assert frames == [4, 4, 4]
    assert 0 < (quantized - plain).norm() / plain.norm() < 0.1  # the compiled graphs do run the FP8 path
