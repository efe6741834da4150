"""Direct-Align math against the equations (paper Eq. 3-5, 12-13) and the release's schedule."""

import pytest
import torch

from flux_rl.direct_align import direct_align_recover, inject_noise, recover_x0
from flux_rl.schedules import TrainingWindow, fixed_shift_sigmas, linear_weight, shift_sigmas


@pytest.mark.parametrize("direction", ["denoise", "inversion"])
def test_recovery_with_true_velocity_returns_x0(direction):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    true_velocity = noise - x0  # rectified flow: d x_sigma / d sigma
    recovered = direct_align_recover(x0, noise, 0.9, 0.8, lambda x, sigma: true_velocity, direction)
    assert torch.allclose(recovered, x0, atol=1e-5)


def test_inject_then_recover_is_identity():
    x0, noise = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.allclose(recover_x0(inject_noise(x0, noise, 0.95), noise, 0.95), x0, atol=1e-5)


def test_model_evaluated_at_branch_start():
    x0, noise = torch.zeros(1, 4), torch.ones(1, 4)
    seen = []
    for direction in ("denoise", "inversion"):
        direct_align_recover(x0, noise, 0.9, 0.8, lambda x, s: seen.append((s, x.clone())) or torch.zeros_like(x), direction)
    assert seen[0][0] == 0.9 and torch.allclose(seen[0][1], inject_noise(x0, noise, 0.9))
    assert seen[1][0] == 0.8 and torch.allclose(seen[1][1], inject_noise(x0, noise, 0.8))


def test_inversion_gradient_has_opposite_sign():
    x0, noise = torch.randn(2, 8), torch.randn(2, 8)
    grads = {}
    for direction in ("denoise", "inversion"):
        v = torch.randn(2, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        recovered = direct_align_recover(x0, noise, 0.9, 0.8, lambda x, s: v, direction)
        recovered.sum().backward()
        grads[direction] = v.grad
    # d x0_hat / d v = (s_lo - s_hi) / (1 - s_lo) for denoise, (s_hi - s_lo) / (1 - s_hi) for inversion.
    assert torch.allclose(grads["denoise"], torch.full((2, 8), (0.8 - 0.9) / (1 - 0.8)))
    assert torch.allclose(grads["inversion"], torch.full((2, 8), (0.9 - 0.8) / (1 - 0.9)))


def test_bad_sigmas_and_direction_fail():
    with pytest.raises(ValueError, match="sigma_low < sigma_high"):
        direct_align_recover(torch.zeros(1), torch.zeros(1), 0.5, 0.6, lambda x, s: x)
    with pytest.raises(ValueError, match="unknown direction"):
        direct_align_recover(torch.zeros(1), torch.zeros(1), 0.6, 0.5, lambda x, s: x, "sideways")


def test_shift_schedule():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_sigmas(t, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    sigmas = fixed_shift_sigmas(25, 3.0)
    assert len(sigmas) == 26 and sigmas[0] == 1 and sigmas[-1] == 0


def test_training_window_matches_release():
    window = TrainingWindow(5, 25, shift=3.0, gt_ratio=0.9)
    schedule = fixed_shift_sigmas(50, 3.0)
    assert window.gap == 100
    assert abs(window.sigma(1000) - float(schedule[5])) < 1e-6  # index 1000: the noisy end
    assert abs(window.sigma(1) - float(torch.linspace(float(schedule[5]), float(schedule[25]), 1000)[999])) < 1e-6
    assert 0.95 < window.sigma(1000) < 0.97 and 0.74 < window.sigma(1) < 0.76
    assert window.denoise_span(500) == (600, 500)
    assert window.inversion_span(500) == (400, 500)
    assert window.denoise_span(950) == (1000, 950)  # the gap shrinks near the ends
    assert window.inversion_span(5) == (1, 5)  # clamped to index 1
    g = torch.Generator().manual_seed(0)
    draws = [window.sample_index(g) for _ in range(2000)]
    assert min(draws) >= 5 and max(draws) <= 995


def test_linear_weight_reads_index():
    assert linear_weight((0.1, 0.25), 0) == pytest.approx(0.1)
    assert linear_weight((0.1, 0.25), 999) == pytest.approx(0.25)
    assert linear_weight((0.3, 0.01), 333) == pytest.approx(torch.linspace(0.3, 0.01, 1000)[333].item(), abs=1e-6)


def test_bad_window_fails():
    with pytest.raises(ValueError, match="--train_window 25,5"):
        TrainingWindow(25, 5)
    with pytest.raises(ValueError, match="--gt_ratio 1.0"):
        TrainingWindow(5, 25, gt_ratio=1.0)


def test_batched_branches_equal_one_call_per_branch():
    """direct_align_recover_batched: the x0_hat and the gradient of separate calls, from one model call."""
    from flux_rl.direct_align import direct_align_recover_batched

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    branches = [("denoise", 0.7, 0.6), ("inversion", 0.6, 0.5)]
    results, calls = {}, {}
    for batched in (False, True):
        weight = torch.tensor(0.3, requires_grad=True)
        calls[batched] = []

        def velocity(x, sigma, weight=weight, log=calls[batched]):  # depends on x and on the per-sample sigma
            log.append(x.shape[0])
            sigma = torch.as_tensor(sigma).expand(x.shape[0]).view(-1, 1, 1)
            return weight * x.tanh() * (1 + sigma)

        if batched:
            recovered = direct_align_recover_batched(x0, noise, branches, velocity)
        else:
            recovered = [direct_align_recover(x0, noise, high, low, velocity, d) for d, high, low in branches]
        sum(r.pow(2).sum() * (i + 1) for i, r in enumerate(recovered)).backward()
        results[batched] = (recovered, weight.grad)
    assert calls == {False: [2, 2], True: [4]}
    for separate, together in zip(results[False][0], results[True][0]):
        assert torch.allclose(separate, together, atol=1e-6)
    assert torch.allclose(results[False][1], results[True][1], rtol=1e-5)
    # and with the true velocity both branches return x0 (Eq. 5 / 13)
    for recovered in direct_align_recover_batched(x0, noise, branches, lambda x, sigma: (noise - x0).repeat(2, 1, 1)):
        assert torch.allclose(recovered, x0, atol=1e-5)
