"""Differentiable image preprocessing for the reward models.

Each reward model's official preprocessing works on PIL images (resize, crop, to-tensor,
normalise), which cuts the gradient. These functions do the same on B x 3 x H x W tensors in
[0, 1]. For square images they equal the official path up to the uint8 rounding PIL does
(tests/test_rewards_preprocess.py compares the two on tiny models).

Resizing uses antialiased bicubic interpolation, which is what PIL's bicubic does when
downsampling. The authors' release resizes with torchvision's `Resize(224, BICUBIC)` on tensors,
which antialiases too (torchvision >= 0.17), so the resize itself is the same as ours (measured
equal). What differs is the clamp: PIL's uint8 output is clamped to [0, 255], so we clamp the
resized image to [0, 1] as the reward models saw in training; the release passes bicubic's
overshoot through. `--match_release` turns the clamp off (`clamp_after_resize(False)`).
"""

import functools

import torch
import torch.nn.functional as F

from .base import host_to_device


def resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_hw = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new_hw == (height, width):
        return images
    return F.interpolate(images, size=new_hw, mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


_clamp_after_resize = True


def clamp_after_resize(enabled: bool) -> None:
    """Process-wide: clamp resized images to [0, 1] (default, as the official PIL path) or not (the
    SRPO release, --match_release)."""
    global _clamp_after_resize
    _clamp_after_resize = bool(enabled)


def _clamped(images: torch.Tensor) -> torch.Tensor:
    # Clamp after resampling, as PIL's uint8 output is clamped to [0, 255]: bicubic overshoots.
    return images.clamp(0, 1) if _clamp_after_resize else images


@functools.lru_cache(maxsize=64)
def _channel_constants(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built once per (values, dtype, device): a fresh torch.tensor(..., device="cuda") per call
    # would be a host-to-device copy that waits for the GPU, mid-step. Never an inference tensor:
    # a first call under torch.inference_mode must not break a later backward.
    with torch.inference_mode(False):
        return host_to_device(torch.tensor(values, dtype=dtype), device).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = _channel_constants(tuple(float(m) for m in mean), images.dtype, images.device)
    std = _channel_constants(tuple(float(s) for s in std), images.dtype, images.device)
    return (images - mean) / std


def clip_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """CLIP-style: resize the shortest side to `size` (bicubic), centre crop, normalise."""
    images = resize_shortest_side(images, size)
    images = center_crop(images, size)
    return normalize(_clamped(images), mean, std)


def squash_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """SigLIP-style: resize straight to size x size (bicubic), no crop, normalise."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return normalize(_clamped(images), mean, std)
