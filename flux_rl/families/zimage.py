"""Z-Image (ZImagePipeline: Z-Image-Turbo, Z-Image): Qwen3's second-to-last hidden states of a
chat-templated prompt, each prompt at its own length (the transformer takes lists), the latent
unpacked as one frame per image, the model's timestep 1 - sigma and its output the negative of the
velocity. Classifier-free guidance as the pipeline computes it, pos + g (pos - neg) against the
empty prompt, whenever the guidance is above 0 (two passes; Z-Image-Turbo is meant for 0; its
optional renormalisation and truncation are not used). AutoencoderKL with scale and shift (FLUX.1's VAE)."""

from dataclasses import dataclass

import torch

from rewards.base import host_to_device

from .. import flux, latents, schedules

PIPELINE = "ZImagePipeline"
NAME = "Z-Image"
EXAMPLE_CHECKPOINT = "Tongyi-MAI/Z-Image-Turbo"
GUIDANCE = ("the pipeline's guidance_scale: above 0 is classifier-free guidance against the empty prompt, pos + g (pos - neg), "
            "two transformer passes per step; 0 is one pass (Z-Image-Turbo). Note: 1 is guidance here, not its absence")
NEGATIVE_PROMPT = ""
TABULATES_MODULATIONS = False
_ATTENTION = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
LORA_PRESETS = {
    "attention": _ATTENTION,  # of the main layers and both refiners
    "default": _ATTENTION + ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
}
# The embedders and the final layer; not the blocks' modulations, whose name (adaLN_modulation.0) the final
# layer's SiLU shares.
LORA_PRESETS["all-linear"] = LORA_PRESETS["default"] + ["t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1",
                                                        "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1"]


@dataclass
class Conditioning:
    prompt_embeds: list  # one L_i x D tensor per prompt (its own length)
    negative: "Conditioning | None" = None  # the empty prompt's, for classifier-free guidance

    def to(self, device, dtype=None):
        return Conditioning([host_to_device(e, device, dtype) for e in self.prompt_embeds],
                            None if self.negative is None else self.negative.to(device, dtype))

    def repeat(self, times: int):
        return Conditioning(self.prompt_embeds * times, None if self.negative is None else self.negative.repeat(times))


class PromptEncoder(flux.PromptEncoder):
    """FLUX.1's cache and offloading (flux.PromptEncoder) around ZImagePipeline.encode_prompt."""

    negative_prompt = NEGATIVE_PROMPT

    def encode_chunk(self, chunk):
        # A copy: diffusers 0.42.1's ZImagePipeline writes the chat-templated text into the list it is given.
        embeds, _ = self.pipeline.encode_prompt(prompt=list(chunk), device=self.device, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length)
        return [e.cpu() for e in embeds]

    def collate(self, entries):
        return Conditioning(list(entries))


def prompt_encoder(pipeline, max_sequence_length, device, cache_size, offload):
    return PromptEncoder(pipeline, max_sequence_length, device, cache_size, offload)


text_encoders = flux.text_encoders


def initial_noise(batch, in_channels, height, width, vae_scale_factor, generator):
    """As ZImagePipeline.prepare_latents draws it: B x C x h x w with h, w even, kept unpacked."""
    rows, columns = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    return torch.randn((batch, in_channels, rows, columns), generator=generator)


def positions(height, width, vae_scale_factor, device=None, dtype=None):
    return None  # the transformer builds its positions from each latent's shape


def _call(transformer, latents, timestep, cond):
    frames = list(latents.unsqueeze(2).unbind(0))  # one C x 1 x h x w latent per image, as the pipeline passes them
    return torch.stack([out.float() for out in transformer(frames, timestep, cond.prompt_embeds, return_dict=False)[0]]).squeeze(2)


def velocity(transformer, latents, sigma, guidance, cond, positions=None):
    """The velocity at noise level `sigma`: the model is given 1 - sigma and predicts -velocity;
    `guidance` > 0: pos + g (pos - neg), as the pipeline combines the two outputs."""
    timestep = 1 - flux.timesteps(sigma, latents.shape[0], latents.device)  # the model counts from noise (0) to image (1)
    latents = latents.to(cond.prompt_embeds[0].dtype)
    prediction = _call(transformer, latents, timestep, cond)
    if guidance is not None and float(guidance) > 0:
        prediction = prediction + float(guidance) * (prediction - _call(transformer, latents, timestep, cond.negative))
    return -prediction


def pipeline_guidance(scale, batch):
    return {"guidance_scale": scale, "cfg_normalization": False, "cfg_truncation": 1.0}


dynamic_mu = schedules.resolution_shift_mu  # the pipeline's calculate_shift (used when its scheduler shifts dynamically)


def decode(vae, x, height, width, vae_scale_factor):
    """Latents (unpacked) -> images in [0, 1], differentiable."""
    return latents.decode_unpacked(vae, x)


encode = latents.encode_unpacked  # images in [0, 1] -> normalised latents (offline SRPO)
