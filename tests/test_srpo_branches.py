"""SRPO's per-branch computation on its own: explicit tensors in, a loss out."""

import pytest
import torch

import rewards
import train_srpo_flux as srpo
from flux_rl.schedules import TrainingWindow

WINDOW = TrainingWindow(5, 25, shift=3.0, gt_ratio=0.9)


def run_branch(direction, velocity, index=500, schedule=(0.1, 0.25), loss_type="neg"):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    seen = {}

    def score_fn(branch_images, ks, swaps):  # one branch: lists of one
        (x0_hat,), (k,), (swapped,) = branch_images, ks, swaps
        seen.update(x0_hat=x0_hat, k=k, swapped=swapped)
        return [x0_hat.flatten(1).sum(1)]

    def velocity_fn(x, sigma):
        seen.setdefault("sigmas", []).append(sigma)
        return velocity if callable(velocity) is False else velocity(x)

    loss, score, k, sigma = srpo.branch_loss(
        x0, noise, WINDOW, index, direction, velocity_fn, lambda x0_hat: x0_hat, score_fn, schedule, lambda s: -s if loss_type == "neg" else torch.relu(0.7 - s)
    )
    return x0, noise, loss, seen, k, sigma


@pytest.mark.parametrize("direction", ["denoise", "inversion"])
def test_true_velocity_recovers_x0_in_both_branches(direction):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    _, _, _, seen, _, _ = run_branch(direction, noise - x0)
    assert torch.allclose(seen["x0_hat"], x0, atol=1e-5)
    assert seen["swapped"] == (direction == "inversion")


def test_both_branches_end_on_the_same_grid_point():
    m = 500
    denoise_start, denoise_end = WINDOW.denoise_span(m)
    inversion_start, inversion_end = WINDOW.inversion_span(m)
    assert denoise_end == inversion_end == m
    # The model is evaluated at each branch's start: sigma(m + g) for denoise, sigma(m - g) for inversion.
    _, _, _, seen_d, _, sigma_d = run_branch("denoise", torch.zeros(2, 4, 64), index=m)
    _, _, _, seen_i, _, sigma_i = run_branch("inversion", torch.zeros(2, 4, 64), index=m)
    assert seen_d["sigmas"] == [WINDOW.sigma(m + 100)] and sigma_d == WINDOW.sigma(m + 100)
    assert seen_i["sigmas"] == [WINDOW.sigma(m - 100)] and sigma_i == WINDOW.sigma(m - 100)
    assert WINDOW.sigma(m + 100) > WINDOW.sigma(m) > WINDOW.sigma(m - 100)


def test_inversion_gradient_has_opposite_sign():
    grads = {}
    for direction in ("denoise", "inversion"):
        v = torch.zeros(2, 4, 64, requires_grad=True)
        _, _, loss, _, _, _ = run_branch(direction, v)
        loss.backward()
        grads[direction] = v.grad
    assert (grads["denoise"] > 0).all() and (grads["inversion"] < 0).all()


@pytest.mark.parametrize("m", [5, 300, 995])
def test_weight_read_at_the_less_noisy_end(m):
    _, _, _, seen_d, k_d, _ = run_branch("denoise", torch.zeros(2, 4, 64), index=m, schedule=(0.1, 0.25))
    _, _, _, seen_i, k_i, _ = run_branch("inversion", torch.zeros(2, 4, 64), index=m, schedule=(0.3, 0.01))
    assert k_d == pytest.approx(torch.linspace(0.1, 0.25, 1000)[m].item(), abs=1e-6)
    start = max(1, m - WINDOW.branch_gap(m))
    assert k_i == pytest.approx(torch.linspace(0.3, 0.01, 1000)[start].item(), abs=1e-6)
    assert seen_d["k"] == k_d and seen_i["k"] == k_i


def test_relative_score_hand_computation(tiny_rewards):
    reward = rewards.load_combined_reward("hpsv2:1.0,aesthetic:0.5", tiny_rewards)
    hps, aesthetic = reward.models["hpsv2"], reward.models["aesthetic"]
    images = torch.rand(2, 3, 64, 64)
    prompts = ["a cat", "a dog"]
    score, details = srpo.relative_score(reward, images, prompts, "Real", "Anime", "release", 0.2, 0.05,
                                         torch.Generator().manual_seed(1))
    r1 = hps(images, ["Real. a cat", "Real. a dog"])
    r2 = hps(images, ["Anime. a cat", "Anime. a dog"])
    s1 = rewards.noised_relative_reward(aesthetic, images, prompts, 0.05, torch.Generator().manual_seed(1))
    assert torch.allclose(score, 1.2 * r1 - r2 + 0.5 * s1, atol=1e-5)
    assert torch.allclose(details["hpsv2/positive"], r1, atol=1e-6) and torch.allclose(details["hpsv2/negative"], r2, atol=1e-6)


def test_relative_score_with_a_cross_attention_scorer(tiny_rewards):
    reward = rewards.load_combined_reward("imagereward:2.0", tiny_rewards)
    model = reward.models["imagereward"]
    images = torch.rand(2, 3, 64, 64)
    score, details = srpo.relative_score(reward, images, ["a cat", "a dog"], ["Real", "Detail"], "Anime", "srp", 0.0, 0.05, None)
    r1 = (model(images, ["Real. a cat", "Real. a dog"]) + model(images, ["Detail. a cat", "Detail. a dog"])) / 2
    r2 = model(images, ["Anime. a cat", "Anime. a dog"])
    assert torch.allclose(score, 2.0 * (r1 - r2), atol=1e-6)
    assert torch.allclose(details["imagereward/positive"], r1, atol=1e-6)


def test_controls_cycle_and_average():
    args = srpo.parse_args(["--pretrained_model_name_or_path", "x"])
    assert srpo.controls_for_step(args, 0) == ("Natural-lighting", "Concept art")
    assert srpo.controls_for_step(args, 5) == ("Detail", "Concept art")
    args = srpo.parse_args(["--pretrained_model_name_or_path", "x", "--control_mode", "average", "--wanted_controls", "A,B"])
    assert srpo.controls_for_step(args, 3) == (["A", "B"], list(rewards.DEFAULT_UNWANTED_CONTROLS))


def test_defaults_reproduce_the_release():
    args = srpo.parse_args(["--pretrained_model_name_or_path", "x", "--full_finetune"])
    assert args.train_window == (5, 25) and args.gt_ratio == 0.9
    assert args.denoise_weights == (0.1, 0.25) and args.inversion_weights == (0.3, 0.01)
    assert (args.loss_type, args.reward_threshold, args.learning_rate, args.max_grad_norm) == ("relu", 0.7, 5e-6, 0.1)
    assert (args.adam_weight_decay, args.resolution, args.num_inference_steps, args.rollout_shift) == (1e-4, 720, 25, 3.0)
    assert (args.rollout_guidance, args.train_guidance, args.reward, args.reward_form) == (1.0, 3.5, "hpsv2:1.0", "release")


def test_lora_learning_rate_default():
    assert srpo.parse_args(["--pretrained_model_name_or_path", "x"]).learning_rate == 1e-4
    assert srpo.parse_args(["--pretrained_model_name_or_path", "x", "--learning_rate", "3e-5"]).learning_rate == 3e-5


def test_pickscore_preset_and_override():
    args = srpo.parse_args(["--pretrained_model_name_or_path", "x", "--preset", "pickscore"])
    assert args.reward == "pickscore:0.05" and args.train_window == (5, 30)
    assert args.denoise_weights == (0.1, 0.5) and args.inversion_weights == (0.6, 0.01) and args.rollout_guidance == 2.0
    args = srpo.parse_args(["--pretrained_model_name_or_path", "x", "--preset", "pickscore", "--train_window", "3,20"])
    assert args.train_window == (3, 20)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward_form", "sgp"], "add --no_inversion"),
        (["--denoise_weights", "0.1"], "two comma-separated numbers"),
        (["--controls_file", "/nonexistent.json"], "--controls_file"),
        (["--train_data_dir", "imgs", "--dataset_name", "someone/prompts"], "not both"),
        (["--wanted_controls", ","], "at least one phrase"),
    ],
)
def test_bad_srpo_flags(extra, message):
    with pytest.raises(ValueError, match=message):
        srpo.parse_args(["--pretrained_model_name_or_path", "x"] + extra)
