"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline: SD3.5 Large, Large Turbo, Medium): CLIP-L and
CLIP-G token states padded to T5's width and stacked before T5's, their pooled outputs side by side,
no guidance input: classifier-free guidance is two transformer passes against the empty prompt
(the pipeline's, not rescaled; its optional skip-layer guidance is not used). The transformer takes
the latent unpacked (it patchifies itself) and the timestep in [0, 1000]; AutoencoderKL with scale
and shift as FLUX.1's."""

from dataclasses import dataclass

import torch

from rewards.base import host_to_device

from .. import flux, latents, schedules

PIPELINE = "StableDiffusion3Pipeline"
NAME = "SD3.5"
EXAMPLE_CHECKPOINT = "stabilityai/stable-diffusion-3.5-medium"
GUIDANCE = ("true CFG: --rollout_guidance / --train_guidance > 1 is the pipeline's guidance_scale against the empty prompt, "
            "two transformer passes per step; 1 is one pass (SD3.5 Large Turbo)")
NEGATIVE_PROMPT = ""
TABULATES_MODULATIONS = False
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_PRESETS = {
    # SD3.5 Medium's extra self-attention (attn2) in its first blocks matches these names too.
    "attention": _ATTENTION,
    "default": _ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}
LORA_PRESETS["all-linear"] = LORA_PRESETS["default"] + ["norm1.linear", "norm1_context.linear", "context_embedder", "linear_1",
                                                        "linear_2", "norm_out.linear", "proj_out"]


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # B x (77 + L) x D: CLIP-L | CLIP-G padded to T5's width D, then T5's L tokens
    pooled_embeds: torch.Tensor  # B x (768 + 1280): CLIP-L's and CLIP-G's pooled projections
    negative: "Conditioning | None" = None  # the empty prompt's, for classifier-free guidance

    def to(self, device, dtype=None):
        return Conditioning(host_to_device(self.prompt_embeds, device, dtype), host_to_device(self.pooled_embeds, device, dtype),
                            None if self.negative is None else self.negative.to(device, dtype))

    def repeat(self, times: int):
        return Conditioning(self.prompt_embeds.repeat(times, 1, 1), self.pooled_embeds.repeat(times, 1),
                            None if self.negative is None else self.negative.repeat(times))


class PromptEncoder(flux.PromptEncoder):
    """FLUX.1's cache and offloading (flux.PromptEncoder) around StableDiffusion3Pipeline.encode_prompt."""

    negative_prompt = NEGATIVE_PROMPT

    def encode_chunk(self, chunk):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, device=self.device,
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=self.max_sequence_length)
        return list(zip(embeds.cpu(), pooled.cpu()))

    def collate(self, entries):
        return Conditioning(torch.stack([e for e, _ in entries]), torch.stack([p for _, p in entries]))


def prompt_encoder(pipeline, max_sequence_length, device, cache_size, offload):
    return PromptEncoder(pipeline, max_sequence_length, device, cache_size, offload)


text_encoders = flux.text_encoders


def initial_noise(batch, in_channels, height, width, vae_scale_factor, generator):
    """As StableDiffusion3Pipeline.prepare_latents draws it: B x C x H/8 x W/8, kept unpacked (the
    transformer patchifies it; the Euler steps and Direct-Align's algebra do not mind the layout)."""
    return torch.randn((batch, in_channels, height // vae_scale_factor, width // vae_scale_factor), generator=generator)


def positions(height, width, vae_scale_factor, device=None, dtype=None):
    return None  # SD3's transformer adds its own learnt position embedding


def _call(transformer, latents, timestep, cond):
    return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                       pooled_projections=cond.pooled_embeds, return_dict=False)[0]


def velocity(transformer, latents, sigma, guidance, cond, positions=None):
    """The velocity at noise level `sigma` (the model's timestep is 1000 sigma); `guidance` > 1:
    v_neg + g (v - v_neg), as the pipeline."""
    timestep = flux.timesteps(sigma, latents.shape[0], latents.device) * 1000  # the model's scale: [0, 1000]
    latents = latents.to(cond.prompt_embeds.dtype)
    prediction = _call(transformer, latents, timestep, cond)
    if guidance is None or float(guidance) <= 1.0:
        return prediction
    negative = _call(transformer, latents, timestep, cond.negative)
    return negative + float(guidance) * (prediction - negative)


def pipeline_guidance(scale, batch):
    return {"guidance_scale": scale}


dynamic_mu = schedules.resolution_shift_mu  # used only by a scheduler with use_dynamic_shifting (SD3.5's is a fixed shift 3)


def decode(vae, x, height, width, vae_scale_factor):
    """Latents (unpacked) -> images in [0, 1], differentiable."""
    return latents.decode_unpacked(vae, x)


encode = latents.encode_unpacked  # images in [0, 1] -> normalised latents (offline SRPO)
