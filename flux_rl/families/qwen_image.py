"""Qwen-Image (QwenImagePipeline: Qwen/Qwen-Image, Qwen-Image-2512): Qwen2.5-VL-7B's last hidden
states of a prompt template (the template's first 34 tokens dropped) with a padding mask, image
positions from the latent grid (img_shapes), no guidance input: classifier-free guidance is two
transformer passes against the negative prompt " ", combined as the pipeline does (rescaled to the
conditional prediction's norm). AutoencoderKLQwenImage is a video VAE: one frame, and per-channel
latent mean and std instead of a scale and shift. Latents pack as FLUX's (2 x 2 patches)."""

from dataclasses import dataclass

import torch

from rewards.base import host_to_device

from .. import flux, latents, schedules

PIPELINE = "QwenImagePipeline"
NAME = "Qwen-Image"
EXAMPLE_CHECKPOINT = "Qwen/Qwen-Image"
GUIDANCE = ("true CFG: --rollout_guidance / --train_guidance > 1 is the pipeline's true_cfg_scale against the negative "
            "prompt \" \", two transformer passes per step (twice the cost of a model call); 1 is one pass")
NEGATIVE_PROMPT = " "  # the pipeline's advice: "even an empty negative prompt like ' ' enables classifier-free guidance"
TABULATES_MODULATIONS = False
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_PRESETS = {
    "attention": _ATTENTION,
    # diffusers' train_dreambooth_lora_qwen_image.py adapts to_k, to_q, to_v, to_out.0; here both streams'
    # attention and their MLPs, as the FLUX default adapts the feed-forwards too.
    "default": _ATTENTION + ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"],
}
LORA_PRESETS["all-linear"] = LORA_PRESETS["default"] + ["img_mod.1", "txt_mod.1", "img_in", "txt_in", "linear_1", "linear_2",
                                                        "norm_out.linear", "proj_out"]


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # B x L x D, zero rows after each prompt's own length
    mask: torch.Tensor | None  # B x L, 1 for a prompt's tokens; None when every prompt fills L (as encode_prompt gives it)
    negative: "Conditioning | None" = None  # the negative prompt's, for true CFG

    def to(self, device, dtype=None):
        return Conditioning(host_to_device(self.prompt_embeds, device, dtype),
                            None if self.mask is None else host_to_device(self.mask, device),
                            None if self.negative is None else self.negative.to(device, dtype))

    def repeat(self, times: int):
        return Conditioning(self.prompt_embeds.repeat(times, 1, 1), None if self.mask is None else self.mask.repeat(times, 1),
                            None if self.negative is None else self.negative.repeat(times))


def collate(rows: list) -> Conditioning:
    """Per-prompt embeddings (L_i x D) zero-padded to the longest, with the mask; None when all are full."""
    length = max(row.shape[0] for row in rows)
    embeds = torch.stack([torch.cat([row, row.new_zeros(length - row.shape[0], row.shape[1])]) for row in rows])
    if all(row.shape[0] == length for row in rows):
        return Conditioning(embeds, None)
    mask = torch.stack([torch.arange(length) < row.shape[0] for row in rows]).long()
    return Conditioning(embeds, mask)


class PromptEncoder(flux.PromptEncoder):
    """FLUX's cache and offloading (flux.PromptEncoder), Qwen-Image's encoder: each prompt's embeddings
    kept at its own length; the negative prompt's beside every batch."""

    negative_prompt = NEGATIVE_PROMPT

    def encode_chunk(self, chunk):
        embeds, mask = self.pipeline.encode_prompt(prompt=chunk, device=self.device, max_sequence_length=self.max_sequence_length)
        lengths = [embeds.shape[1]] * len(chunk) if mask is None else mask.sum(1).tolist()
        return [row[:length] for row, length in zip(embeds.cpu(), lengths)]

    def collate(self, entries):
        return collate(entries)



initial_noise = latents.packed_noise  # drawn and packed as FLUX.1's
dynamic_mu = schedules.resolution_shift_mu  # QwenImagePipeline's calculate_shift, with its scheduler's exponential time shift


def prompt_encoder(pipeline, max_sequence_length, device, cache_size, offload):
    return PromptEncoder(pipeline, max_sequence_length, device, cache_size, offload)


text_encoders = flux.text_encoders


def positions(height, width, vae_scale_factor, device=None, dtype=None):
    """The image's latent grid (frames, rows, columns of 2 x 2 patches): the transformer's RoPE reads it."""
    return (1, height // vae_scale_factor // 2, width // vae_scale_factor // 2)


def _call(transformer, latents, timestep, cond, image_shape):
    return transformer(hidden_states=latents, timestep=timestep, guidance=None, encoder_hidden_states_mask=cond.mask,
                       encoder_hidden_states=cond.prompt_embeds, img_shapes=[[image_shape]] * latents.shape[0],
                       return_dict=False)[0]


def velocity(transformer, latents, sigma, guidance, cond: Conditioning, image_shape):
    """The velocity at noise level `sigma` (a float or a B-tensor); `guidance` > 1: true CFG as
    QwenImagePipeline combines it: v_neg + g (v - v_neg), rescaled to |v| per token."""
    timestep = flux.timesteps(sigma, latents.shape[0], latents.device)
    latents = latents.to(cond.prompt_embeds.dtype)
    prediction = _call(transformer, latents, timestep, cond, image_shape)
    if guidance is None or float(guidance) <= 1.0:
        return prediction
    negative = _call(transformer, latents, timestep, cond.negative, image_shape)
    combined = negative + float(guidance) * (prediction - negative)
    return combined * (prediction.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


def pipeline_guidance(scale, batch):
    """QwenImagePipeline's own call at this guidance: true CFG against " " above 1 (its guidance_scale is
    for guidance-distilled models only)."""
    return {"true_cfg_scale": scale, "negative_prompt": [NEGATIVE_PROMPT] * batch} if scale > 1 else {"true_cfg_scale": 1.0}


def _latent_statistics(vae, like):
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = host_to_device(torch.tensor(vae.config.latents_mean).view(shape), like.device, like.dtype)
    std = host_to_device(torch.tensor(vae.config.latents_std).view(shape), like.device, like.dtype)
    return mean, std


def decode(vae, packed, height, width, vae_scale_factor):
    """Packed latents -> images in [0, 1], differentiable (one frame of the video VAE)."""
    from diffusers import QwenImagePipeline

    frames = QwenImagePipeline._unpack_latents(packed, height, width, vae_scale_factor).to(vae.dtype)  # B x C x 1 x h x w
    mean, std = _latent_statistics(vae, frames)
    images = vae.decode(frames * std + mean, return_dict=False)[0][:, :, 0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(vae, images):
    """Images in [0, 1] -> packed, normalised latents (offline SRPO)."""
    frames = vae.encode((images * 2 - 1)[:, :, None].to(vae.dtype)).latent_dist.mode()
    mean, std = _latent_statistics(vae, frames)
    return latents.pack(((frames - mean) / std)[:, :, 0].float())
