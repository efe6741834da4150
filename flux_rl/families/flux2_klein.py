"""FLUX.2 [klein] (Flux2KleinPipeline: FLUX.2-klein-4B / -9B and their "base" versions): Qwen3's
hidden states of layers 9, 18 and 27 side by side (a chat-templated prompt padded to
--max_sequence_length), 4-D position ids (T, H, W, L) for text and image tokens, no guidance input:
classifier-free guidance is two transformer passes against the empty prompt (the pipeline's, not
rescaled; the step-distilled klein models are meant for guidance 1). AutoencoderKLFlux2: latents
2 x 2-patchified into channels, normalised by the VAE's BatchNorm running statistics, and packed
channel-last (not FLUX.1's packing), so the initial noise is drawn in that layout."""

from dataclasses import dataclass

import torch

from rewards.base import host_to_device

from .. import flux

PIPELINE = "Flux2KleinPipeline"
NAME = "FLUX.2 [klein]"
EXAMPLE_CHECKPOINT = "black-forest-labs/FLUX.2-klein-base-4B"
GUIDANCE = ("true CFG: --rollout_guidance / --train_guidance > 1 is the pipeline's guidance_scale against the empty prompt, "
            "two transformer passes per step; 1 is one pass (the step-distilled klein models)")
NEGATIVE_PROMPT = ""
TABULATES_MODULATIONS = False  # FLUX.2 shares its modulations across blocks: FLUX.1's tables do not apply
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_qkv_mlp_proj"]
LORA_PRESETS = {
    # q, k, v (and the double blocks' outputs) of every block; the single blocks' fused projection carries their q, k, v
    # and MLP input.
    "attention": _ATTENTION,
    # + the MLPs, and the single blocks' output projection (attention and MLP outputs side by side into one Linear, as
    # FLUX.1's single-block proj_out, which its default adapts too). By suffix "attn.to_out" would also name the double
    # blocks' ModuleList, so the index is a wildcard (models.names_target).
    "default": _ATTENTION + ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                             "single_transformer_blocks.*.attn.to_out"],
}
LORA_PRESETS["all-linear"] = LORA_PRESETS["default"] + ["x_embedder", "context_embedder", "linear_1", "linear_2",
                                                        "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                                                        "single_stream_modulation.linear", "norm_out.linear", "proj_out"]


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # B x L x 3D: Qwen3's layers 9, 18, 27 side by side, L = --max_sequence_length
    text_ids: torch.Tensor  # L x 4
    negative: "Conditioning | None" = None  # the empty prompt's, for classifier-free guidance

    def to(self, device, dtype=None):
        return Conditioning(host_to_device(self.prompt_embeds, device, dtype), host_to_device(self.text_ids, device),
                            None if self.negative is None else self.negative.to(device, dtype))

    def repeat(self, times: int):
        return Conditioning(self.prompt_embeds.repeat(times, 1, 1), self.text_ids,
                            None if self.negative is None else self.negative.repeat(times))


class PromptEncoder(flux.PromptEncoder):
    """FLUX.1's cache and offloading (flux.PromptEncoder) around Flux2KleinPipeline.encode_prompt."""

    negative_prompt = NEGATIVE_PROMPT

    def encode_chunk(self, chunk):
        embeds, text_ids = self.pipeline.encode_prompt(prompt=chunk, device=self.device, max_sequence_length=self.max_sequence_length)
        self.text_ids = text_ids[0].cpu()
        return list(embeds.cpu())

    def collate(self, entries):
        return Conditioning(torch.stack(entries), self.text_ids)


def prompt_encoder(pipeline, max_sequence_length, device, cache_size, offload):
    return PromptEncoder(pipeline, max_sequence_length, device, cache_size, offload)


text_encoders = flux.text_encoders


def latent_grid(height, width, vae_scale_factor):
    """Rows and columns of image tokens: the VAE's latent after the 2 x 2 patchify."""
    return height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)


def initial_noise(batch, channels, height, width, vae_scale_factor, generator):
    """As Flux2KleinPipeline.prepare_latents draws it: B x 4C x h x w, then packed channel-last.
    `channels`: the transformer's in_channels (4 x the VAE's latent channels)."""
    rows, columns = latent_grid(height, width, vae_scale_factor)
    noise = torch.randn((batch, channels, rows, columns), generator=generator)
    return noise.reshape(batch, channels, rows * columns).permute(0, 2, 1)


def positions(height, width, vae_scale_factor, device, dtype=None):
    """The image tokens' (T, H, W, L) position ids, row-major, as _prepare_latent_ids makes them."""
    rows, columns = latent_grid(height, width, vae_scale_factor)
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(columns), torch.arange(1))
    return host_to_device(ids, device)


def _call(transformer, latents, timestep, cond, image_ids):
    return transformer(hidden_states=latents, timestep=timestep, guidance=None, encoder_hidden_states=cond.prompt_embeds,
                       txt_ids=cond.text_ids, img_ids=image_ids, return_dict=False)[0]


def velocity(transformer, latents, sigma, guidance, cond, image_ids):
    """The velocity at noise level `sigma`; `guidance` > 1: v_neg + g (v - v_neg), as the pipeline."""
    timestep = flux.timesteps(sigma, latents.shape[0], latents.device)
    latents = latents.to(cond.prompt_embeds.dtype)
    prediction = _call(transformer, latents, timestep, cond, image_ids)
    if guidance is None or float(guidance) <= 1.0:
        return prediction
    negative = _call(transformer, latents, timestep, cond.negative, image_ids)
    return negative + float(guidance) * (prediction - negative)


def pipeline_guidance(scale, batch):
    return {"guidance_scale": scale}


def dynamic_mu(image_seq_len, num_steps, scheduler_config):
    """The pipeline's schedule shift: an empirical fit in the image tokens and the step count."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)


def _batch_norm_statistics(vae, like):
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def decode(vae, packed, height, width, vae_scale_factor):
    """Packed latents -> images in [0, 1], differentiable."""
    from diffusers import Flux2KleinPipeline

    rows, columns = latent_grid(height, width, vae_scale_factor)
    patches = packed.permute(0, 2, 1).reshape(packed.shape[0], packed.shape[2], rows, columns).to(vae.dtype)
    mean, std = _batch_norm_statistics(vae, patches)
    images = vae.decode(Flux2KleinPipeline._unpatchify_latents(patches * std + mean), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(vae, images):
    """Images in [0, 1] -> packed, normalised latents (offline SRPO)."""
    from diffusers import Flux2KleinPipeline

    patches = Flux2KleinPipeline._patchify_latents(vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mode())
    mean, std = _batch_norm_statistics(vae, patches)
    return Flux2KleinPipeline._pack_latents((patches - mean) / std).float()
