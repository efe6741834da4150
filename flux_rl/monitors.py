"""Drift monitors of rollout images. Reward hacking shows first as oversaturation, a brightness
shift or a build-up of high-frequency texture, well before the reward itself looks wrong."""

import torch


@torch.no_grad()
def image_statistics(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """images: B x 3 x H x W in [0, 1]. Scalars stay on the device (read back once per step)."""
    images = images.float()
    high, low = images.max(1).values, images.min(1).values
    saturation = ((high - low) / high.clamp_min(1e-6)).mean()  # HSV saturation
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    spectrum = torch.fft.fftshift(torch.fft.fft2(luma - luma.mean((-2, -1), keepdim=True)), dim=(-2, -1)).abs() ** 2
    height, width = luma.shape[-2:]
    fy = torch.fft.fftshift(torch.fft.fftfreq(height, device=images.device)).view(-1, 1)
    fx = torch.fft.fftshift(torch.fft.fftfreq(width, device=images.device)).view(1, -1)
    high_band = (fy**2 + fx**2).sqrt() > 0.25  # above half the Nyquist frequency
    high_frequency = (spectrum * high_band).sum((-2, -1)) / spectrum.sum((-2, -1)).clamp_min(1e-12)
    return {
        "drift/saturation": saturation,
        "drift/brightness": luma.mean(),
        "drift/high_frequency": high_frequency.mean(),
    }
