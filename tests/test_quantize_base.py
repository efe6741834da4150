"""--quantize_base nf4 (flux_rl/quantization.py): the blocks' linear layers become bitsandbytes NF4
layers (on the CPU here: bitsandbytes' CPU backend quantizes and dequantizes), LoRA sits on top and
trains alone, the flags that cannot work with 4-bit weights are refused in one line, and what it
saves is the same LoRA file a bf16 base gives. That it learns: the `srpo-lora-nf4` run of
tests/test_learning.py (adapters trained on the 4-bit base, judged on the full-precision one)."""

import copy
import math

import pytest
import torch
from torch import nn

import train_direct_align
import train_srpo_flux
from flux_rl import flux, latents, models, quantization

BASE = ["--pretrained_model_name_or_path", "does/not-matter-it-is-never-loaded"]
NF4 = ["--quantize_base", "nf4"]


@pytest.fixture(scope="module")
def base(tiny_flux):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(f"{tiny_flux}/transformer")


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    cond = flux.Conditioning(torch.randn(1, 32, 32, generator=generator), torch.randn(1, 32, generator=generator), torch.zeros(32, 3))
    return latents.pack(torch.randn(1, 16, 8, 8, generator=generator)), cond, latents.image_ids(64, 64, 8, "cpu", torch.float32)


def block_linears(transformer):
    return [m for blocks in models.block_lists(transformer) for block in blocks for m in block.modules() if isinstance(m, nn.Linear)]


def test_every_block_linear_layer_is_nf4_and_the_output_stays_close(base):
    import bitsandbytes as bnb

    transformer = copy.deepcopy(base)
    count = quantization.quantize_blocks_nf4(transformer, "cpu", torch.float32)
    layers = block_linears(transformer)
    assert count == len(layers) == len(block_linears(base)) > 0
    assert all(isinstance(m, bnb.nn.Linear4bit) and m.weight.dtype == torch.uint8 and m.weight.quant_state is not None
               for m in layers)
    # the embedders and the output layer keep their weights as they were
    assert type(transformer.x_embedder) is nn.Linear and torch.equal(transformer.x_embedder.weight, base.x_embedder.weight)
    assert quantization.is_quantized(transformer) and not quantization.is_quantized(base)

    # Each weight dequantizes to within half the widest gap of the NF4 code book (-1 to -0.6962: 0.152 of its block's
    # absmax), plus the rounding of that absmax, itself stored in 8 bits. Blocks of 32 here (the tiny rows are 32, 96 and
    # 160 wide), of 64 for FLUX (quantization.blocksize).
    for original, quantized in zip(block_linears(base), layers):
        size = quantization.blocksize(original.in_features)
        assert quantized.weight.quant_state.blocksize == size
        restored = bnb.functional.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state).float()
        blocks = original.weight.detach().flatten().view(-1, size)
        error = (restored.flatten().view(-1, size) - blocks).abs()
        assert (error <= 0.17 * blocks.abs().amax(dim=1, keepdim=True)).all()
        assert error.max() > 0  # it was quantized, not copied

    x, cond, ids = inputs()
    with torch.no_grad():
        reference = flux.velocity(base, x, 0.5, 3.5, cond, ids)
        quantized = flux.velocity(transformer, x, 0.5, 3.5, cond, ids)
    relative = (quantized - reference).norm() / reference.norm()
    assert 0 < relative < 0.05, relative  # measured 0.9-1.0% over three seeds


def test_flux_rows_take_blocks_of_64():
    """Every linear layer of FLUX.1-dev's blocks has rows of a multiple of 64: bitsandbytes' default block size there."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from flux_rl import tiny_models

    with init_empty_weights():
        flux_dev = FluxTransformer2DModel(**tiny_models.FLUX_DEV_TRANSFORMER)
    assert {quantization.blocksize(m.in_features) for m in block_linears(flux_dev)} == {64}
    assert {quantization.blocksize(width) for width in (32, 96, 160)} == {32}


def test_weights_take_a_quarter_plus_the_scales(base):
    """4 bits per weight and one 8-bit scale per block (of 32 or 64 weights here, 64 for FLUX), with fp32 scales of the
    scales per 256 blocks, against 32 bits (fp32 tiny model; 16 for bf16 FLUX: 22.2 -> 5.8 GiB)."""
    transformer = copy.deepcopy(base)
    quantization.quantize_blocks_nf4(transformer, "cpu", torch.float32)
    kept = 0
    for layer in block_linears(base):
        blocks = layer.weight.numel() // quantization.blocksize(layer.in_features)
        # codes, one uint8 scale per block, one fp32 scale per 256 scales and the 256-entry fp32 code book of the scales
        kept += layer.weight.numel() // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256
    weights = sum(layer.weight.numel() for layer in block_linears(base))
    assert quantization.weight_bytes(base) - quantization.weight_bytes(transformer) == 4 * weights - kept  # biases as they were


def test_lora_trains_alone_on_the_4bit_base(base):
    """peft wraps the 4-bit layers; the gradient reaches every adapter through the dequantized weights, an optimizer
    step moves the adapters only, and the adapter keys are those of a LoRA on the full-precision base."""
    transformer = copy.deepcopy(base)
    quantization.quantize_blocks_nf4(transformer, "cpu", torch.float32)
    models.add_lora(transformer, rank=4, alpha=4, target_modules=models.DEFAULT_LORA_TARGETS)
    plain = models.add_lora(copy.deepcopy(base), rank=4, alpha=4, target_modules=models.DEFAULT_LORA_TARGETS)
    assert models.lora_state_dict(transformer).keys() == models.lora_state_dict(plain).keys()

    trainable = models.trainable_parameters(transformer)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = {name: p.detach().clone() for name, p in transformer.named_parameters() if not p.requires_grad}
    with torch.no_grad():  # lora_B starts at zero: give it a value, so that lora_A's gradient is not zero too
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    x, cond, ids = inputs(1)
    x.requires_grad_(True)
    flux.velocity(transformer, x, 0.5, 3.5, cond, ids).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert x.grad.abs().sum() > 0
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    before = [p.detach().clone() for p in trainable]
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))
    assert all(torch.equal(p, frozen[name]) for name, p in transformer.named_parameters() if not p.requires_grad)


def test_a_no_grad_rollout_leaves_the_gradient_through_the_base_as_it_was(base):
    """The rollout (eval mode, no gradient) before a training branch: on CPUs with AVX512-BF16 bitsandbytes would repack
    the weights for an inference kernel that autograd does not see (quantization.nf4_linear turns that off)."""
    transformer = copy.deepcopy(base)
    quantization.quantize_blocks_nf4(transformer, "cpu", torch.float32)
    transformer.eval()  # as without_dropout() runs the rollout of a model in training mode

    def input_gradient():
        x, cond, ids = inputs(3)
        x.requires_grad_(True)
        flux.velocity(transformer, x, 0.5, 3.5, cond, ids).square().sum().backward()
        return x.grad

    before = input_gradient()
    with torch.no_grad():
        flux.velocity(transformer, *inputs(4)[:1], 0.7, 3.5, *inputs(4)[1:])
    assert torch.equal(input_gradient(), before)


def test_compiled_blocks_trace_the_4bit_layers_whole(base):
    """--compile: each block kind is one graph with the NF4 layers inside (no graph break), forward and backward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    transformer = copy.deepcopy(base)
    quantization.quantize_blocks_nf4(transformer, "cpu", torch.float32)
    models.add_lora(transformer, rank=4, alpha=4, target_modules=models.DEFAULT_LORA_TARGETS)
    counter = CompileCounterWithBackend("eager")
    for blocks in models.block_lists(transformer):
        for block in blocks:
            block.compile(backend=counter, dynamic=False)
    x, cond, ids = inputs(2)
    flux.velocity(transformer, x, 0.5, 3.5, cond, ids).sum().backward()
    assert counter.frame_count == 2  # one double block, one single block: nothing broke out


@pytest.mark.parametrize("flags, message", [
    (["--full_finetune"], "--quantize_base nf4 freezes the base in 4 bits, which a full fine-tune trains"),
    (["--merge_lora_in_rollout"], "--merge_lora_in_rollout cannot fold adapters into 4-bit weights exactly"),
    (["--rollout_dtype", "fp8"], "--rollout_dtype fp8 makes FP8 copies of bf16 weights, not of 4-bit ones"),
])
def test_flags_that_need_float_weights_are_refused(flags, message, tmp_path):
    args = BASE + ["--output_dir", str(tmp_path), *NF4, *flags]
    with pytest.raises(ValueError, match=message) as error:
        train_direct_align.parse_args(args)
    assert "\n" not in str(error.value)


def test_refused_under_fsdp_and_the_rollout_keeps_the_adapters(monkeypatch, tmp_path):
    args = train_srpo_flux.parse_args(BASE + ["--output_dir", str(tmp_path), *NF4])
    assert args.quantize_base == "nf4" and args.merge_lora_in_rollout is False  # the default turns off (peft's merge is lossy)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="--quantize_base nf4 does not run on FSDP's sharded weights"):
        train_srpo_flux.parse_args(BASE + ["--output_dir", str(tmp_path), *NF4])


def test_model_card_says_the_base_was_4bit(tmp_path):
    from flux_rl import hub

    args = train_srpo_flux.parse_args(BASE + ["--output_dir", str(tmp_path), *NF4])
    hub.write_model_card(str(tmp_path), args, "SRPO")
    card = (tmp_path / "README.md").read_text()
    assert "trained on a 4-bit NF4 copy of the base" in card and "pipe.load_lora_weights" in card
