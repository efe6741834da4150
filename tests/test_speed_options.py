"""Speed and memory options give the same numbers as the plain path."""

import contextlib
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from flux_rl import latents, models


def _decode_with_gradient(vae, seed=0):
    packed = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    images = latents.decode(vae, packed, 64, 64, 8)
    images.pow(2).sum().backward()
    return images.detach(), packed.grad


def test_vae_gradient_checkpointing_same_gradient(tiny_flux):
    grads = []
    for checkpointing in (False, True):
        vae = AutoencoderKL.from_pretrained(os.path.join(tiny_flux, "vae")).requires_grad_(False)
        if checkpointing:
            vae.enable_gradient_checkpointing()
        grads.append(_decode_with_gradient(vae)[1])
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


class _CountFusedAttention(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vae_math_attention_matches_fused_kernel(tiny_flux, checkpointing):
    """--vae_attention math (the default): a decode with gradient never calls torch's fused kernel
    (whose backward is slow for the VAE's head dim of 512) and gives the fused path's images and
    gradient; a decode without gradient keeps the fused kernel (no N x N scores for a batch)."""
    results = {}
    for kind in ("sdpa", "math"):
        vae = AutoencoderKL.from_pretrained(os.path.join(tiny_flux, "vae"))
        args = SimpleNamespace(vae_attention=kind, vae_gradient_checkpointing=checkpointing, compile_vae=False)
        models.prepare_vae(vae, args)
        with _CountFusedAttention() as counter:
            results[kind] = _decode_with_gradient(vae)
        assert (counter.calls > 0) == (kind == "sdpa"), (kind, counter.calls)
        with _CountFusedAttention() as counter, torch.no_grad():
            latents.decode(vae, torch.randn(2, 16, 64), 64, 64, 8)
        assert counter.calls > 0, kind
    assert torch.allclose(results["sdpa"][0], results["math"][0], atol=1e-5)
    assert torch.allclose(results["sdpa"][1], results["math"][1], atol=1e-5)
    assert results["math"][1].abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_vae_decoder_matches_eager(tiny_flux, checkpointing):
    """--compile_vae: the decoder runs as one compiled graph (its checkpointing inside) with the
    eager decode's images and gradient; a no-grad decode of another batch size adds one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_flux, "vae"))
    args = SimpleNamespace(vae_attention="math", vae_gradient_checkpointing=checkpointing, compile_vae=False,
                           compile_backend=None, compile_mode=None)
    models.prepare_vae(vae, args)
    eager_images, eager_grad = _decode_with_gradient(vae)
    counter = CompileCounterWithBackend("aot_eager")
    models.prepare_vae(vae, SimpleNamespace(**{**vars(args), "compile_vae": True, "compile_backend": counter}))
    compiled_images, compiled_grad = _decode_with_gradient(vae)
    assert counter.frame_count == 1  # the whole decoder, no graph break
    assert torch.allclose(eager_images, compiled_images, atol=1e-5)
    assert torch.allclose(eager_grad, compiled_grad, atol=1e-5)
    with torch.no_grad():
        latents.decode(vae, torch.randn(2, 16, 64), 64, 64, 8)
    assert counter.frame_count == 2
    assert not any(p.requires_grad for p in vae.parameters())


def test_attention_backend_is_set_on_every_attention_and_computes_the_same(tiny_flux):
    """--attention_backend goes to diffusers' dispatcher for every FLUX attention; here a backend
    that runs on the CPU (the math kernel) gives the default path's output."""
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    inputs = _transformer_inputs(torch.float32)
    with torch.no_grad():
        default = transformer(**inputs)[0]
    args = SimpleNamespace(full_finetune=True, bf16_weights=False, attention_backend="_native_math",
                           gradient_checkpointing=False, compile=False)
    models.prepare_for_training(transformer, args)
    processors = [m.processor for m in transformer.modules() if hasattr(m, "processor")]
    assert len(processors) == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert {p._attention_backend for p in processors} == {"_native_math"}
    with torch.no_grad():
        assert torch.allclose(transformer(**inputs)[0], default, atol=1e-5)
    # diffusers would also make it every later model's default: a transformer built afterwards keeps the native one
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    assert _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE


def test_compiled_blocks_match_eager(tiny_flux):
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    models.add_lora(transformer, 4, 4, models.DEFAULT_LORA_TARGETS)
    inputs = _transformer_inputs(torch.float32)
    eager = transformer(**inputs)[0]
    models.compile_blocks(transformer, backend="aot_eager")
    compiled = transformer(**inputs)[0]
    assert torch.allclose(eager, compiled, atol=1e-5)
    compiled.sum().backward()  # the compiled blocks train: LoRA gets gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.trainable_parameters(transformer))


def test_trainer_with_every_speed_option(tiny_models, tmp_path):
    """bf16 base weights with fp32 LoRA, per-block compile of the transformer, the VAE decoder and the reward's image tower compiled,
    8-bit AdamW, both checkpointings, two injections per rollout, LoRA merged for the rollout, both
    branches in one batch, another attention backend (the math kernel stands in for cuDNN's on the
    CPU), the rollout's and validation's modulation layers batched over the steps: one SRPO run
    through accelerate launch."""
    from safetensors.torch import load_file

    from tests.launch import launch, tiny_args
    from tests.tensorboard_logs import scalar_tags

    output_dir = str(tmp_path / "fast")
    launch("train_srpo_flux.py", tiny_args(
        tiny_models, output_dir, "--max_train_steps", "2", "--rank", "4", "--mixed_precision", "bf16", "--compile",
        "--compile_backend", "aot_eager", "--use_8bit_adam", "--gradient_checkpointing", "--vae_gradient_checkpointing",
        "--num_injections", "2", "--merge_lora_in_rollout", "--batch_branches", "--compile_vae",
        "--compile_reward", "--attention_backend", "_native_math", "--batch_rollout_modulations",
        "--validation_prompt", "a photo of a cat", "--validation_steps", "1", "--upcast_before_saving",
    ))
    lora = load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    assert lora and all(v.dtype == torch.float32 for v in lora.values())  # --upcast_before_saving; bf16 without it
    tags = scalar_tags(output_dir)
    assert len(tags["loss"]) == 2 and all(g > 0 for g in tags["grad_norm"])
    assert os.path.exists(os.path.join(output_dir, "validation", "step-000001.png"))


def test_full_finetune_with_bf16_weights(tiny_models, tiny_flux, tmp_path):
    """--bf16_weights: the trained transformer is saved in bf16 and has moved."""
    from tests.launch import launch, tiny_args

    output_dir = str(tmp_path / "bf16")
    launch("train_srpo_flux.py", tiny_args(
        tiny_models, output_dir, "--max_train_steps", "2", "--full_finetune", "--bf16_weights", "--mixed_precision", "bf16",
        "--learning_rate", "1e-2", "--gradient_checkpointing",
    ))
    from safetensors.torch import load_file

    trained = load_file(os.path.join(output_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    original = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer")).state_dict()
    assert all(v.dtype == torch.bfloat16 for v in trained.values())
    assert any(not torch.equal(v, original[k].to(torch.bfloat16)) for k, v in trained.items())


def test_training_turns_cudnn_attention_off(tiny_models, tiny_flux, tmp_path):
    """torch 2.11's cuDNN attention backward crashed on FLUX's q/k/v at 720 px on an H200
    ("mha_graph.execute ... is_good()", then an illegal memory access); every trainer runs
    prepare_for_training, which leaves attention to flash / memory-efficient kernels."""
    import train_srpo_flux
    from tests.launch import tiny_args

    args = train_srpo_flux.parse_args(tiny_args(tiny_models, str(tmp_path)))
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        models.prepare_for_training(transformer, args)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def _randomize_lora_b(model, std, seed):
    """LoRA layers of `model` with B drawn at random (peft starts B at zero: a merge would add nothing)."""
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for layer in layers:
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    return layers


def _lora_transformer(tiny_flux, dtype):
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer")).to(dtype)
    models.add_lora(transformer, 4, 4, models.DEFAULT_LORA_TARGETS)
    return transformer, _randomize_lora_b(transformer, 0.5, seed=1)


def _transformer_inputs(dtype):
    generator = torch.Generator().manual_seed(2)
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=generator, dtype=dtype), timestep=torch.tensor([0.5], dtype=dtype),
        guidance=torch.tensor([3.5], dtype=dtype), pooled_projections=torch.randn(1, 32, generator=generator, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=generator, dtype=dtype), txt_ids=torch.zeros(8, 3),
        img_ids=latents.image_ids(64, 64, 8, "cpu", torch.float32), return_dict=False,
    )


@pytest.mark.parametrize("ratio, recomputed", [(1.0, {"double": [0, 1], "single": [0, 1, 2, 3]}),
                                               (0.5, {"double": [0], "single": [0, 2]}),
                                               (0.25, {"double": [0], "single": [0]}),
                                               (0.0, {"double": [], "single": []})])
def test_checkpointing_a_share_of_the_blocks(ratio, recomputed):
    """--gradient_checkpointing_ratio: that share of each block kind (evenly spread) runs its forward
    again in the backward pass, the others run once; the LoRA gradient is the same as with every
    block checkpointed and with none."""
    from flux_rl import tiny_models

    gradients = {}
    for setting in (None, ratio):  # None: no checkpointing at all, the reference
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**dict(tiny_models.TINY_TRANSFORMER, num_layers=2, num_single_layers=4))
        args = SimpleNamespace(full_finetune=False, bf16_weights=False, lora_target_modules=None, rank=4, lora_alpha=4,
                               attention_backend=None, gradient_checkpointing=setting is not None,
                               gradient_checkpointing_ratio=setting, compile=False)
        models.prepare_for_training(transformer, args)
        _randomize_lora_b(transformer, 0.5, seed=1)
        calls = {"double": [], "single": []}
        for kind, blocks in (("double", transformer.transformer_blocks), ("single", transformer.single_transformer_blocks)):
            for index, block in enumerate(blocks):
                block.register_forward_pre_hook(lambda module, args, kind=kind, index=index: calls[kind].append(index))
        transformer(**_transformer_inputs(torch.float32))[0].pow(2).mean().backward()
        gradients[setting] = torch.cat([p.grad.flatten() for p in models.trainable_parameters(transformer)])
    ran_twice = {kind: sorted(i for i in set(indices) if indices.count(i) == 2) for kind, indices in calls.items()}
    assert ran_twice == recomputed
    assert all(indices.count(i) in (1, 2) for indices in calls.values() for i in indices)
    assert gradients[None].abs().sum() > 0
    assert torch.allclose(gradients[ratio], gradients[None], rtol=1e-5, atol=1e-7)


def test_rollout_attention_backend_serves_the_rollout_only(tiny_models):
    """--rollout_attention_backend: the no-grad rollout's attention goes through that backend (the
    math kernel stands in for cuDNN's on the CPU), the training branches' through the transformer's
    own; the rollout's image is the same as with the default kernel."""
    from accelerate import Accelerator
    from diffusers.models.attention_dispatch import AttentionBackendName

    from benchmarks import benchmark_trainers

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)  # one AcceleratorState per process: the suite's
    module, flags = benchmark_trainers.TRAINERS["srpo"]
    images = {}
    for backend in (None, "_native_math"):
        torch.manual_seed(0)
        run = benchmark_trainers.build_run(module, flags + (["--rollout_attention_backend", backend] if backend else []),
                                           "tiny", "lora", 64, 2, False, torch.device("cpu"), accelerator)
        run.accelerator = _WithoutAutocast(accelerator)  # fp32: the two kernels agree to rounding
        seen = []  # (grad enabled, backend) per attention call
        for attention in (m for m in run.transformer.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")):
            attention.register_forward_pre_hook(
                lambda module, args: seen.append((torch.is_grad_enabled(), module.processor._attention_backend)))
        images[backend], _, _ = run.rollout(["a cat"], torch.Generator().manual_seed(1))
        module.training_step(run, 0, defaultdict(list))
        rollout_backends = {b for grad, b in seen if not grad}
        training_backends = {b for grad, b in seen if grad}
        assert rollout_backends == {AttentionBackendName(backend) if backend else None}
        assert training_backends == {None}  # the transformer's own (diffusers' default)
    assert torch.allclose(images[None], images["_native_math"], atol=1e-5)


def test_lora_merged_computes_the_same_and_restores_the_weights(tiny_flux):
    transformer, layers = _lora_transformer(tiny_flux, torch.float32)
    inputs = _transformer_inputs(torch.float32)
    before = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    with torch.no_grad():
        plain = transformer(**inputs)[0]
        with models.lora_merged(transformer):
            assert all(layer.merged for layer in layers)  # the adapters are skipped: their work is in W
            changed = [name for name, tensor in transformer.state_dict().items() if not torch.equal(tensor, before[name])]
            assert len(changed) == len(layers) and all(name.endswith("base_layer.weight") for name in changed)
            merged = transformer(**inputs)[0]
        after = transformer(**inputs)[0]
    assert torch.allclose(merged, plain, atol=1e-5, rtol=1e-4) and not torch.equal(merged, plain)
    assert torch.equal(after, plain) and not any(layer.merged for layer in layers)
    assert all(torch.equal(tensor, before[name]) for name, tensor in transformer.state_dict().items())


def test_lora_merged_restores_bf16_weights_exactly_where_unmerge_would_not(tiny_flux):
    transformer, layers = _lora_transformer(tiny_flux, torch.bfloat16)
    originals = [layer.get_base_layer().weight.clone() for layer in layers]
    with models.lora_merged(transformer):
        pass
    assert all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(layers, originals))
    for layer in layers:  # peft's own way back: W + d - d, rounded twice in bf16
        layer.merge()
        layer.unmerge()
    assert not all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(layers, originals))


def test_rollout_with_merged_lora_matches_the_adapters(tiny_models):
    """Run.rollout with --merge_lora_in_rollout gives the image the adapters give, and leaves the
    model as it found it."""
    from accelerate import Accelerator

    from benchmarks import benchmark_trainers

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)  # one AcceleratorState per process: as the other tests
    module, flags = benchmark_trainers.TRAINERS["srpo"]
    run = benchmark_trainers.build_run(module, flags + ["--merge_lora_in_rollout"], "tiny", "lora", 64, 3, False,
                                       torch.device("cpu"), accelerator)
    _randomize_lora_b(run.transformer, 2.0, seed=3)
    before = {name: tensor.clone() for name, tensor in run.transformer.state_dict().items()}
    merged = run.rollout(["a cat"], torch.Generator().manual_seed(0))[0]
    run.args.merge_lora_in_rollout = False
    plain = run.rollout(["a cat"], torch.Generator().manual_seed(0))[0]
    assert all(torch.equal(tensor, before[name]) for name, tensor in run.transformer.state_dict().items())
    run.transformer.disable_adapters()
    without_lora = run.rollout(["a cat"], torch.Generator().manual_seed(0))[0]
    run.transformer.enable_adapters()

    def relative_error(x):
        return ((x - plain).norm() / plain.norm()).item()

    # bf16 autocast rounds W + BA once where the adapters round x W and x A B apart: close, not equal;
    # dropping the adapters (a merge that folded nothing) is far off.
    assert 0 < relative_error(merged) < 0.01 and relative_error(without_lora) > 20 * relative_error(merged)


def test_batched_branches_give_the_gradient_of_separate_ones(tiny_models):
    """SRPO --batch_branches: one batch-2 transformer call, one batch-2 VAE decode, one batch-2 pass of
    the reward's image tower and one backward per start point, the same loss, scores and LoRA gradient
    as two of each."""
    from accelerate import Accelerator

    from benchmarks import benchmark_trainers

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    module, flags = benchmark_trainers.TRAINERS["srpo"]
    results = {}
    for batched in (False, True):
        torch.manual_seed(0)  # the same random models both times
        run = benchmark_trainers.build_run(module, flags + ["--num_injections", "2"] + (["--batch_branches"] if batched else ["--no_batch_branches"]),
                                           "tiny", "lora", 64, 2, False, torch.device("cpu"), accelerator)
        _randomize_lora_b(run.transformer, 0.5, seed=3)
        batch_sizes = []
        run.transformer.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]),
                                                  with_kwargs=True)
        decode_sizes, reward_sizes = [], []
        run.vae.decoder.register_forward_pre_hook(lambda module, args: decode_sizes.append(args[0].shape[0]))
        # (the benchmark shares one reward model between runs: the hook comes off after the step)
        hook = run.reward.models["hpsv2"].image_tower().register_forward_pre_hook(lambda module, args: reward_sizes.append(args[0].shape[0]))
        run.accelerator = _WithoutAutocast(accelerator)  # fp32 throughout: bf16 rounding would hide a real difference
        logs = defaultdict(list)
        module.training_step(run, 0, logs)
        hook.remove()
        grads = torch.cat([p.grad.flatten() for p in models.trainable_parameters(run.transformer)])
        results[batched] = grads, {k: [float(v) for v in values] for k, values in logs.items()}, batch_sizes, decode_sizes, reward_sizes
    (separate, separate_logs, separate_calls, separate_decodes, separate_rewards), (
        together, together_logs, together_calls, together_decodes, together_rewards) = results[False], results[True]
    rollout_calls = [1, 1]  # 2 rollout steps of batch 1
    assert separate_calls == rollout_calls + [1, 1, 1, 1] and together_calls == rollout_calls + [2, 2]
    assert separate_decodes == [1, 1, 1, 1] and together_decodes == [2, 2]  # (the benchmark's runs have no drift monitor)
    assert separate_rewards == [1, 1, 1, 1] and together_rewards == [2, 2]  # the reward's image tower
    assert separate.abs().sum() > 0
    assert torch.allclose(separate, together, rtol=1e-4, atol=1e-7)
    assert separate_logs.keys() == together_logs.keys()
    for key in separate_logs:
        assert separate_logs[key] == pytest.approx(together_logs[key], rel=1e-4, abs=1e-6), key


class _WithoutAutocast:
    """The test process's Accelerator (bf16: one AcceleratorState per process) with autocast turned off."""

    def __init__(self, accelerator):
        self._accelerator = accelerator

    def __getattr__(self, name):
        return getattr(self._accelerator, name)

    def autocast(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("name", ["hpsv2", "clip", "pickscore", "aesthetic", "imagereward"])
def test_compiled_reward_image_tower_matches_eager(tiny_rewards, name):
    """--compile_reward: each reward's image tower runs as one compiled graph, with the eager
    score and the eager gradient with respect to the images."""
    import rewards
    from torch._dynamo.testing import CompileCounterWithBackend

    model = rewards.load_reward_model(name, tiny_rewards)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat", "a red car"]

    def score_and_gradient():
        pixels = images.clone().requires_grad_(True)
        score = model(pixels, prompts)
        score.sum().backward()
        return score.detach(), pixels.grad

    eager_score, eager_grad = score_and_gradient()
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_image_tower(backend=counter)
    compiled_score, compiled_grad = score_and_gradient()
    assert counter.frame_count == 1
    assert torch.allclose(eager_score, compiled_score, atol=1e-5)
    assert torch.allclose(eager_grad, compiled_grad, atol=1e-6)
    assert eager_grad.abs().sum() > 0
