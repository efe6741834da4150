"""Did training raise the reward? The same held-out prompts and seeds rendered by the base model and
by a trained output (a LoRA folder, a full fine-tune or one of their checkpoints), scored, and the
paired difference judged in standard errors. Used by the learning tests and by
benchmarks/learning_curves.py; evaluate_flux.py is the same idea at the paper's scale."""

import math

import torch

from . import families, models, schedules, validation
from .evaluation import ModelVariant


def load_base(pretrained_model_name_or_path: str, device="cpu", dtype=torch.float32):
    return models.load_pipeline(pretrained_model_name_or_path, dtype=dtype).to(device)


@torch.no_grad()
def render_images(pipe, trained_output, prompts, seeds, resolution=64, num_inference_steps=3, guidance=3.5, shift=3.0,
                  max_sequence_length=32):
    """Images (len(seeds) * len(prompts), seed-major) of `pipe` with `trained_output` applied
    (None: the base model), sampled as the trainers' validation samples (fixed-shift Euler ODE)."""
    variant = ModelVariant("trained", trained_output)
    variant.apply(pipe)
    try:
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
        family, vae_scale_factor = families.family_of(pipe), pipe.vae_scale_factor
        image_seq_len = (resolution // (vae_scale_factor * 2)) ** 2
        sigmas = schedules.rollout_sigmas(num_inference_steps, image_seq_len, pipe.scheduler.config, shift or None, family.dynamic_mu)
        encoder = family.prompt_encoder(pipe, max_sequence_length, device, 2048, False)
        batches = [validation.render(pipe.transformer, pipe.vae, encoder, list(prompts), seed, resolution, resolution, sigmas,
                                     guidance, vae_scale_factor, device, dtype, family=family) for seed in seeds]
    finally:
        variant.restore(pipe)
    return torch.cat(batches)


def paired_gain(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float, float]:
    """(mean of after - before, its standard error, mean / standard error) over paired samples:
    the same prompt and seed before and after training, so the images' own spread cancels."""
    difference = (after - before).double()
    mean = float(difference.mean())
    standard_error = float(difference.std(unbiased=True)) / math.sqrt(difference.numel())
    return mean, standard_error, mean / max(standard_error, 1e-12)
