"""Differentiable image preprocessing for the reward models.

Each reward model's official preprocessing works on PIL images (resize, crop, to-tensor,
normalise), which cuts the gradient. These functions do the same on B x 3 x H x W tensors in
[0, 1], with each official path's size arithmetic, at any size and aspect ratio: they equal it up
to the uint8 rounding PIL does (tests/test_rewards_preprocess.py compares them on square,
non-square, odd and small sizes).
- HPSv2.1 (hpsv2's scoring): the longest side to 224, zero padding to a square, no crop, no clamp.
- CLIP-H (open_clip) and ImageReward (torchvision): the shortest side to 224 (the other truncated
  to an integer), centre crop at torchvision's rounded offset.
- PickScore (transformers' CLIPImageProcessor): the same resize, the crop offset floored.
- Aesthetic v2.5 (SigLIP): squashed to 384 x 384, no crop.

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
    """The shortest side to `size`, the other in proportion, truncated to an integer as torchvision's
    Resize(size) and transformers' CLIPImageProcessor both compute it (int(size * long / short))."""
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_hw = (size, new_long) if height <= width else (new_long, size)
    if new_hw == (height, width):
        return images
    return F.interpolate(images, size=new_hw, mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int, offset: str = "round") -> torch.Tensor:
    """A size x size crop from the middle. `offset`: "round", torchvision's CenterCrop
    (int(round((h - size) / 2)), Python's round: halves to even), or "floor", transformers'
    center_crop ((h - size) // 2); they differ by a pixel when h - size is odd."""
    height, width = images.shape[-2:]
    if offset == "round":
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def resize_longest_side_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """hpsv2's scoring transform (its open_clip fork, ResizeMaxSize): the LONGEST side to `size`
    (sizes rounded with Python's round), bicubic on the float tensor, then zero padding, split
    as evenly as it goes with the extra pixel right and bottom, to size x size. An image whose
    longest side already is `size` is left as it is by hpsv2 (and would not fit its ViT unless
    square); here it is padded like the others."""
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_height, new_width = round(height * scale), round(width * scale)
        images = F.interpolate(images, size=(new_height, new_width), mode="bicubic", antialias=True, align_corners=False)
    pad_h, pad_w = size - images.shape[-2], size - images.shape[-1]
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return images


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


def clip_preprocess(images: torch.Tensor, size: int, mean, std, crop_offset: str = "round") -> torch.Tensor:
    """CLIP-style: resize the shortest side to `size` (bicubic), centre crop, normalise: torchvision's
    Resize + CenterCrop (open_clip's CLIP-H, ImageReward), or with crop_offset="floor" transformers'
    CLIPImageProcessor (PickScore)."""
    images = resize_shortest_side(images, size)
    images = center_crop(images, size, crop_offset)
    return normalize(_clamped(images), mean, std)


def hps_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """HPSv2.1 as hpsv2 scores an image: longest side to `size`, zero padding, normalise, on the
    float tensor (ToTensor comes first there), so no clamp either."""
    return normalize(resize_longest_side_and_pad(images, size), mean, std)


def squash_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """SigLIP-style: resize straight to size x size (bicubic), no crop, normalise."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return normalize(_clamped(images), mean, std)
