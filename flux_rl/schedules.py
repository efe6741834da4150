"""Sigma schedules (rectified flow: x_sigma = sigma * noise + (1 - sigma) * x0, sigma = 1 is noise)."""

import numpy as np
import torch

# --match_release: the authors' release gives the transformer its timestep truncated to 1/1000,
# int(sigma * 1000) / 1000, while its Euler steps and recoveries use the exact sigma. Ours gives the
# exact sigma (the truncation moves the model's input by up to 1e-3 for no gain). Process-wide: set
# once by the trainer.
_truncate_model_timesteps = False


def truncate_model_timesteps(enabled: bool) -> None:
    global _truncate_model_timesteps
    _truncate_model_timesteps = bool(enabled)


def model_timestep(sigma):
    """The sigma the transformer is given for noise level `sigma` (a float or a tensor)."""
    if not _truncate_model_timesteps:
        return sigma
    if isinstance(sigma, torch.Tensor):
        return torch.trunc(sigma * 1000) / 1000
    return int(float(sigma) * 1000) / 1000


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style fixed shift: shift(t) = s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def fixed_shift_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """shift(linspace(1, 0, num_steps + 1)): the authors' rollout schedule (25 steps, s = 3)."""
    return shift_sigmas(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift).float()


def resolution_shift_mu(image_seq_len: int, num_steps: int, scheduler_config) -> float:
    """FluxPipeline's and QwenImagePipeline's shift: linear in the packed image sequence length
    between the scheduler config's (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", 1.15))


def dynamic_shift_sigmas(num_steps: int, image_seq_len: int, scheduler_config, dynamic_mu=resolution_shift_mu) -> torch.Tensor:
    """The resolution-dependent schedule, exactly as the pipeline builds it (mu from the packed image
    sequence length: `dynamic_mu`, the family's rule), ending with sigma = 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = dynamic_mu(image_seq_len, num_steps, scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.float().cpu()


def rollout_sigmas(num_steps: int, image_seq_len: int, scheduler_config, shift: float | None,
                   dynamic_mu=resolution_shift_mu) -> torch.Tensor:
    """`shift` given: the fixed-shift schedule; None: diffusers' resolution-dependent one."""
    if shift is None:
        return dynamic_shift_sigmas(num_steps, image_seq_len, scheduler_config, dynamic_mu)
    return fixed_shift_sigmas(num_steps, shift)


class TrainingWindow:
    """Where along the trajectory the training branches start, as in the authors' release.

    A 50-step schedule S = shift(linspace(1, 0, 51)) is cut to the window [S[a], S[b]] and
    refined into a grid of `grid_size` sigmas. Indices count from the grid's late (less noisy)
    end: index j is sigma grid[grid_size - j], so a larger j is a noisier point. A branch spans
    `gap` grid indices: the share (1 - gt_ratio) of the grid that the model's one step covers,
    the rest of the way back to x0 being covered by the known noise.
    """

    def __init__(self, start=5, end=25, shift=3.0, gt_ratio=0.9, grid_size=1000, schedule_steps=50, margin=5,
                 release_inversion_end=False):
        if not 1 <= start < end <= schedule_steps:
            # start 0 is pure noise (sigma 1): a branch starting there has no x0 to recover (Eq. 4 divides by 1 - sigma).
            raise ValueError(f"--train_window {start},{end} must satisfy 1 <= start < end <= {schedule_steps} "
                             "(step 0 is pure noise, from which no x0 can be recovered)")
        if not 0.0 < gt_ratio < 1.0:
            raise ValueError(f"--gt_ratio {gt_ratio} must lie strictly between 0 and 1")
        schedule = fixed_shift_sigmas(schedule_steps, shift).double()
        self.grid = torch.linspace(float(schedule[start]), float(schedule[end]), grid_size, dtype=torch.float64)
        self.grid_size = grid_size
        self.margin = margin
        # round(), not int(): the release's int((1 - 0.9) * 1000) + 1 is 100 only through float error.
        self.gap = max(1, round((1 - gt_ratio) * grid_size))
        self.release_inversion_end = release_inversion_end

    def sigma(self, index: int) -> float:
        return float(self.grid[self.grid_size - index])

    def sample_index(self, generator: torch.Generator) -> int:
        """m uniform in [margin, grid_size - margin], as the release's [5, 995]."""
        return int(torch.randint(self.margin, self.grid_size - self.margin + 1, (1,), generator=generator))

    def branch_gap(self, index: int) -> int:
        return min(self.grid_size - index, index, self.gap)

    def denoise_span(self, index: int) -> tuple[int, int]:
        """(start, end) indices of the denoise branch: from m + g down to m."""
        return index + self.branch_gap(index), index

    def inversion_span(self, index: int) -> tuple[int, int]:
        """(start, end) indices of the inversion branch: from m - g up to m (start clamped to >= 1).
        `release_inversion_end` (--match_release): the release ends it at start + g, which for
        m <= g (start clamped from 0 to 1) is m + 1 rather than m, the denoise branch's end."""
        start = max(1, index - self.branch_gap(index))
        return start, (start + self.branch_gap(index) if self.release_inversion_end else index)


def linear_weight(schedule: tuple[float, float], index: int, grid_size: int = 1000) -> float:
    """linspace(late, early, grid_size)[index]: a timestep-dependent weight, small index = late."""
    late, early = schedule
    return late + (early - late) * min(index, grid_size - 1) / (grid_size - 1)
