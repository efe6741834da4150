"""FLUX latent packing (2x2 patches into tokens), VAE decode with gradient, VAE encode."""

import torch

# diffusers is imported where it is used: importing it takes 3 s, and `--help` or a mistyped flag should answer at once.


def latent_shape(vae_scale_factor: int, latent_channels: int, height: int, width: int) -> tuple[int, int, int]:
    """Unpacked latent C x h x w for an image, as FluxPipeline.prepare_latents computes it."""
    return latent_channels, 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))


def packed_noise(batch: int, in_channels: int, height: int, width: int, vae_scale_factor: int, generator) -> torch.Tensor:
    """The initial noise of `batch` images, drawn as FluxPipeline and QwenImagePipeline draw it (B x C x h x w, C the
    transformer's in_channels / 4), packed; on the host."""
    shape = latent_shape(vae_scale_factor, in_channels // 4, height, width)
    return pack(torch.randn((batch, *shape), generator=generator))


def pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor)


def image_ids(height: int, width: int, vae_scale_factor: int, device, dtype) -> torch.Tensor:
    from diffusers import FluxPipeline

    latent_h, latent_w = height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)
    return FluxPipeline._prepare_latent_image_ids(1, latent_h, latent_w, device, dtype)


def decode(vae, packed_latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Packed latents -> images in [0, 1], differentiable."""
    return decode_unpacked(vae, unpack(packed_latents, height, width, vae_scale_factor))


def decode_unpacked(vae, latents: torch.Tensor) -> torch.Tensor:
    """B x C x h x w latents of an AutoencoderKL with scale and shift (FLUX.1's, SD3's, Z-Image's) -> images in [0, 1]."""
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> packed, normalised latents (offline SRPO: real images replace rollouts)."""
    return pack(encode_unpacked(vae, images))


@torch.no_grad()
def encode_unpacked(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> B x C x h x w latents, normalised with the VAE's scale and shift."""
    latents = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mode()
    return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()
