"""Direct-Align (paper section 3.1): noise injection with a known noise, one model step, and
closed-form recovery of the clean image. All in fp32: the recovery divides by (1 - sigma),
which amplifies rounding error at high sigma.

Rectified flow: x_sigma = sigma * noise + (1 - sigma) * x0 (Eq. 3 with alpha = 1 - sigma), and the
model predicts the velocity v ~ noise - x0.
"""

from typing import Callable

import torch

DIRECTIONS = ("denoise", "inversion")


def inject_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    return sigma * noise + (1 - sigma) * x0  # Eq. 3


def recover_x0(x: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x - sigma * noise) / (1 - sigma)  # Eq. 4


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    return x + (sigma_to - sigma_from) * velocity


def branch_sigmas(direction: str, sigma_high: float, sigma_low: float) -> tuple[float, float]:
    """(sigma the branch starts at, sigma its one model step ends at): down for denoise, up for inversion."""
    if not 0.0 <= sigma_low < sigma_high < 1.0:
        raise ValueError(f"need 0 <= sigma_low < sigma_high < 1, got {sigma_low}, {sigma_high}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction '{direction}'; choose from {', '.join(DIRECTIONS)}")
    return (sigma_high, sigma_low) if direction == "denoise" else (sigma_low, sigma_high)


def direct_align_recover(
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma_high: float,
    sigma_low: float,
    velocity_fn: Callable[[torch.Tensor, float], torch.Tensor],
    direction: str = "denoise",
) -> torch.Tensor:
    """One Direct-Align branch: the recovered clean image x0_hat, differentiable through the model.

    denoise (Eq. 5, Eq. 12): noise x0 to sigma_high, one model step down to sigma_low, recover:
        x0_hat = (x_high - (sigma_high - sigma_low) v - sigma_low * noise) / (1 - sigma_low)
    inversion (Eq. 13): noise x0 to sigma_low, one model step UP to sigma_high, recover:
        x0_hat = (x_low + (sigma_high - sigma_low) v - sigma_high * noise) / (1 - sigma_high)
    The model term enters with opposite signs, so ascending a reward of the inversion branch's
    image descends the denoising direction: the penalty of Eq. 12-13.
    `velocity_fn(x, sigma)` runs the model at (x, sigma).
    """
    start, end = branch_sigmas(direction, sigma_high, sigma_low)
    x0, noise = x0.float(), noise.float()
    x = inject_noise(x0, noise, start)
    x = euler_step(x, velocity_fn(x, start).float(), start, end)
    return recover_x0(x, noise, end)


def direct_align_recover_batched(
    x0: torch.Tensor,
    noise: torch.Tensor,
    branches: list[tuple[str, float, float]],
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Several Direct-Align branches of the same (x0, noise) with ONE model call on their stacked
    batch: the same x0_hat per branch as direct_align_recover (Eq. 5 / 12 / 13), the same FLOPs,
    fewer and larger kernels. `branches`: (direction, sigma_high, sigma_low) each.
    `velocity_fn(x, sigmas)` gets len(branches) * B samples and a per-sample sigma vector."""
    x0, noise = x0.float(), noise.float()
    spans = [branch_sigmas(direction, high, low) for direction, high, low in branches]
    starts = torch.cat([inject_noise(x0, noise, start) for start, _ in spans])  # Eq. 3, per branch
    # Filled on the device (a torch.tensor(list, device="cuda") would wait for the GPU).
    sigmas = torch.cat([torch.full((x0.shape[0],), start, device=x0.device, dtype=torch.float32) for start, _ in spans])
    velocities = velocity_fn(starts, sigmas).float().chunk(len(branches))
    return [recover_x0(euler_step(x_start, v, start, end), noise, end)  # Eq. 4 after one model step
            for x_start, v, (start, end) in zip(starts.chunk(len(branches)), velocities, spans)]
