"""Speed and memory options give the same numbers as the plain path."""

import os

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from flux_rl import latents, models


def test_vae_gradient_checkpointing_same_gradient(tiny_flux):
    grads = []
    for checkpointing in (False, True):
        vae = AutoencoderKL.from_pretrained(os.path.join(tiny_flux, "vae")).requires_grad_(False)
        if checkpointing:
            vae.enable_gradient_checkpointing()
        packed = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        latents.decode(vae, packed, 64, 64, 8).pow(2).sum().backward()
        grads.append(packed.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_compiled_blocks_match_eager(tiny_flux):
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    models.add_lora(transformer, 4, 4, models.DEFAULT_LORA_TARGETS)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        pooled_projections=torch.randn(1, 32), encoder_hidden_states=torch.randn(1, 8, 32),
        txt_ids=torch.zeros(8, 3), img_ids=latents.image_ids(64, 64, 8, "cpu", torch.float32), return_dict=False,
    )
    eager = transformer(**inputs)[0]
    models.compile_blocks(transformer, backend="aot_eager")
    compiled = transformer(**inputs)[0]
    assert torch.allclose(eager, compiled, atol=1e-5)
    compiled.sum().backward()  # the compiled blocks train: LoRA gets gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.trainable_parameters(transformer))


def test_trainer_with_every_speed_option(tiny_models, tmp_path):
    """bf16 base weights with fp32 LoRA, per-block compile, 8-bit AdamW, both checkpointings,
    two injections per rollout: one SRPO run through accelerate launch."""
    from safetensors.torch import load_file

    from tests.launch import launch, tiny_args
    from tests.tensorboard_logs import scalar_tags

    output_dir = str(tmp_path / "fast")
    launch("train_srpo_flux.py", tiny_args(
        tiny_models, output_dir, "--max_train_steps", "2", "--rank", "4", "--mixed_precision", "bf16", "--compile",
        "--compile_backend", "aot_eager", "--use_8bit_adam", "--gradient_checkpointing", "--vae_gradient_checkpointing",
        "--num_injections", "2",
    ))
    lora = load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    tags = scalar_tags(output_dir)
    assert len(tags["loss"]) == 2 and all(g > 0 for g in tags["grad_norm"])


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
