"""The trainer's rollout equals FluxPipeline's sampling for the same noise, embeddings and sigmas."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from flux_rl import flux, latents, schedules


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80)])
def test_rollout_equals_flux_pipeline(height, width, tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    vae_scale = pipe.vae_scale_factor
    prompts = ["a photo of a cat", "a red car"]
    encoder = flux.PromptEncoder(pipe, max_sequence_length=64)
    cond = encoder(prompts)
    shape = latents.latent_shape(vae_scale, 16, height, width)
    noise = latents.pack(torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)))
    sigmas = schedules.fixed_shift_sigmas(4, 3.0)
    ids = latents.image_ids(height, width, vae_scale, "cpu", torch.float32)
    ours = flux.sample(pipe.transformer, noise, sigmas, 3.5, cond, ids)
    reference = pipe(
        prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_embeds, latents=noise.clone(),
        height=height, width=width, num_inference_steps=4, guidance_scale=3.5, output_type="latent",
    ).images
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours, noise)


def test_dynamic_schedule_equals_pipeline_scheduler(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    ours = schedules.dynamic_shift_sigmas(10, 4096, pipe.scheduler.config)
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10), mu=mu)
    assert torch.allclose(ours, pipe.scheduler.sigmas.float())
    assert ours[-1] == 0 and len(ours) == 11


def test_prompt_cache_encodes_each_prompt_once(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    encoder = flux.PromptEncoder(pipe, max_sequence_length=32)
    calls = []
    original = pipe.encode_prompt
    pipe.encode_prompt = lambda **kw: calls.append(kw["prompt"]) or original(**kw)
    first = encoder(["a", "b"])
    second = encoder(["b", "a", "a"])
    assert calls == [["a", "b"]]
    assert torch.equal(second.prompt_embeds[0], first.prompt_embeds[1])


def test_prompt_cache_is_bounded_and_offload_returns_encoders(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    encoder = flux.PromptEncoder(pipe, max_sequence_length=32, cache_size=2, offload=True)
    reference = flux.PromptEncoder(pipe, max_sequence_length=32)
    got = encoder(["a", "b", "c"])
    assert list(encoder.cache) == ["b", "c"]  # the oldest dropped
    assert torch.allclose(got.prompt_embeds, reference(["a", "b", "c"]).prompt_embeds)
    encoder(["b"])
    encoder(["d"])
    assert list(encoder.cache) == ["b", "d"]  # "b" was used last, so "c" went
    assert next(pipe.text_encoder_2.parameters()).device.type == "cpu"


def test_offloaded_encoders_encode_upcoming_prompts_in_the_same_visit(tiny_flux):
    """With offload, one visit of the encoders also encodes the prompts of the next micro-steps
    (within the look-ahead and the room the cache has), ENCODE_BATCH at a time; each embedding
    is the one a visit for that prompt alone gives."""
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    encoder = flux.PromptEncoder(pipe, max_sequence_length=32, cache_size=4, offload=True)
    encoder.ENCODE_BATCH = 2
    reference = flux.PromptEncoder(pipe, max_sequence_length=32)
    calls, visits = [], []
    original_encode_prompt, original_to = pipe.encode_prompt, pipe.text_encoder_2.to
    pipe.encode_prompt = lambda **kw: calls.append(kw["prompt"]) or original_encode_prompt(**kw)
    pipe.text_encoder_2.to = lambda device: visits.append(str(device)) or original_to(device)

    first = encoder(["a"], upcoming=["b", "a", "c", "d", "e"])  # room for 3 more beside "a": b, c, d
    assert calls == [["a", "b"], ["c", "d"]] and visits == ["cpu", "cpu"]  # one visit (there and back), two calls
    assert list(encoder.cache) == ["b", "c", "d", "a"]
    for prompt in ["b", "c", "d"]:
        encoder([prompt], upcoming=["e", "f"])
    assert len(calls) == 2, "prompts encoded ahead are not encoded again"
    later = encoder(["e"], upcoming=["f"])
    assert calls[2:] == [["e", "f"]]
    for got, prompt in [(first, "a"), (later, "e")]:
        assert torch.allclose(got.prompt_embeds, reference([prompt]).prompt_embeds, atol=1e-6)
        assert torch.allclose(got.pooled_embeds, reference([prompt]).pooled_embeds, atol=1e-6)
    assert flux.PromptEncoder(pipe, offload=False).lookahead == 0  # on the GPU for good: one prompt costs little


def test_vae_encode_decode_shapes(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    images = torch.rand(1, 3, 64, 64)
    packed = latents.encode(pipe.vae, images)
    decoded = latents.decode(pipe.vae, packed.requires_grad_(True), 64, 64, pipe.vae_scale_factor)
    assert decoded.shape == images.shape
    decoded.sum().backward()
    assert packed.grad.abs().sum() > 0
