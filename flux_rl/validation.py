"""Validation: fixed prompts and seed rendered with the current weights, scored by the training
reward, saved as a PNG grid under output_dir/validation/ and logged to every tracker."""

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from rewards.base import host_to_device

from . import flux


def image_grid(images: torch.Tensor, captions: list[str] | None = None, columns: int | None = None) -> Image.Image:
    """B x 3 x H x W in [0, 1] -> one PIL grid, each tile captioned (e.g. with its reward)."""
    count, _, height, width = images.shape
    columns = columns or min(count, 4)
    rows = (count + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height))
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    for i, tile in enumerate(array):
        tile = Image.fromarray(tile)
        if captions:
            ImageDraw.Draw(tile).text((2, 2), captions[i], fill=(255, 255, 255))
        grid.paste(tile, ((i % columns) * width, (i // columns) * height))
    return grid


@torch.no_grad()
def render(transformer, vae, prompt_encoder, prompts, seed, height, width, sigmas, guidance, vae_scale_factor, device, dtype,
           tabulate_modulations_of=None, family=None):
    """Images for `prompts` from a fixed seed, through the same rollout the trainer uses.
    `tabulate_modulations_of`: the unwrapped transformer, for --batch_rollout_modulations.
    `family`: the model family's adapter (flux_rl/families; default FLUX.1)."""
    from .families import flux1

    family = family or flux1
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = family.initial_noise(len(prompts), flux.model_config(transformer).in_channels, height, width, vae_scale_factor, generator)
    noise = host_to_device(noise, device)
    cond = prompt_encoder(prompts).to(device, dtype)
    positions = family.positions(height, width, vae_scale_factor, device, dtype)
    x0 = flux.sample(transformer, noise, sigmas, guidance, cond, positions, tabulate_modulations_of=tabulate_modulations_of,
                     velocity=family.velocity)
    return family.decode(vae, x0, height, width, vae_scale_factor)


def log_validation(accelerator, images, prompts, scores, step, output_dir, tag="validation", columns=None):
    """`prompts` and `scores`: one per image. `columns`: tiles per grid row (default up to 4)."""
    captions = [f"{s:.3f}" for s in scores.tolist()]
    grid = image_grid(images, captions, columns)
    os.makedirs(os.path.join(output_dir, tag), exist_ok=True)
    path = os.path.join(output_dir, tag, f"step-{step:06d}.png")
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(img, caption=f"{p} | {c}") for img, p, c in zip(images.cpu(), prompts, captions)]}, step=step)
    accelerator.log({f"{tag}/reward": float(scores.mean())}, step=step)
    return path
