"""FLUX.1 (FluxPipeline: FLUX.1-dev, -schnell, -Krea-dev): CLIP pooled + T5 embeddings, 3-D
position ids, the guidance value given to the model as an input (one pass), AutoencoderKL with
scale and shift. The calls themselves live in flux_rl/flux.py and flux_rl/latents.py."""

from rewards.base import host_to_device

from .. import flux, latents, schedules

PIPELINE = "FluxPipeline"
NAME = "FLUX.1"
EXAMPLE_CHECKPOINT = "black-forest-labs/FLUX.1-dev"
GUIDANCE = "embedded: --rollout_guidance / --train_guidance are the model's guidance input (FLUX.1-dev 3.5), one pass"
TABULATES_MODULATIONS = True  # --batch_rollout_modulations (flux_rl/modulations.py) knows its AdaLN layers
LORA_PRESETS = None  # models.LORA_LAYER_PRESETS, written for FLUX.1


def prompt_encoder(pipeline, max_sequence_length, device, cache_size, offload):
    return flux.PromptEncoder(pipeline, max_sequence_length, device, cache_size, offload)


text_encoders = flux.text_encoders


def positions(height, width, vae_scale_factor, device, dtype):
    """The image tokens' position ids (made on the host, queued to the device)."""
    return host_to_device(latents.image_ids(height, width, vae_scale_factor, "cpu", dtype), device)


velocity = flux.velocity
initial_noise = latents.packed_noise
dynamic_mu = schedules.resolution_shift_mu


def pipeline_guidance(scale, batch):
    """FluxPipeline's own call at this guidance (evaluate_flux.py renders through the pipeline)."""
    return {"guidance_scale": scale}


def decode(vae, packed, height, width, vae_scale_factor):
    return latents.decode(vae, packed, height, width, vae_scale_factor)


def encode(vae, images):
    return latents.encode(vae, images)
