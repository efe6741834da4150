"""SRPO's per-branch computation on its own: explicit tensors in, a loss out (paper Eq. 3-6, 8-13, S1)."""

import pytest
import torch

import rewards
import train_srpo_flux as srpo
from flux_rl.schedules import TrainingWindow

WINDOW = TrainingWindow(5, 25, shift=3.0, gt_ratio=0.9)


def srpo_args(*extra):
    return srpo.parse_args(["--pretrained_model_name_or_path", "x", *extra])


def run_branch(direction, velocity, index=500, args=None):
    """One branch of `direction` from start point `index`, with an identity decode and a score that
    sums the recovered latent. Returns (x0, noise, loss, what the model and the score saw, branch)."""
    args = args or srpo_args("--loss_type", "neg")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    (branch,) = [b for b in srpo.make_branches(args, WINDOW, index, "Real", "Anime") if b.direction == direction]
    seen = {}

    def score_fn(branch_images, branches):  # one branch: lists of one
        (x0_hat,), (seen_branch,) = branch_images, branches
        seen.update(x0_hat=x0_hat, branch=seen_branch)
        return [x0_hat.flatten(1).sum(1)]

    def velocity_fn(x, sigmas):
        seen.setdefault("sigmas", []).extend(sorted(set(sigmas.tolist())))
        return velocity(x) if callable(velocity) else velocity

    def loss_fn(score):
        return -score if args.loss_type == "neg" else torch.relu(0.7 - score)

    ((loss, _),) = srpo.branch_losses(x0, noise, [branch], velocity_fn, lambda x0_hat: x0_hat, score_fn, loss_fn)
    return x0, noise, loss, seen, branch


@pytest.mark.parametrize("direction", ["denoise", "inversion"])
def test_true_velocity_recovers_x0_in_both_branches(direction):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    _, _, _, seen, branch = run_branch(direction, noise - x0)
    assert torch.allclose(seen["x0_hat"], x0, atol=1e-5)
    # Eq. 13's branch scores with the phrases swapped and enters with the opposite sign.
    assert (branch.positive, branch.negative, branch.sign) == (("Real", "Anime", 1.0) if direction == "denoise" else ("Anime", "Real", -1.0))


def test_both_branches_end_on_the_same_grid_point():
    m = 500
    denoise_start, denoise_end = WINDOW.denoise_span(m)
    inversion_start, inversion_end = WINDOW.inversion_span(m)
    assert denoise_end == inversion_end == m
    # The model is evaluated at each branch's start: sigma(m + g) for denoise, sigma(m - g) for inversion.
    _, _, _, seen_d, branch_d = run_branch("denoise", torch.zeros(2, 4, 64), index=m)
    _, _, _, seen_i, branch_i = run_branch("inversion", torch.zeros(2, 4, 64), index=m)
    assert seen_d["sigmas"] == pytest.approx([WINDOW.sigma(m + 100)]) and branch_d.sigma_start == WINDOW.sigma(m + 100)
    assert seen_i["sigmas"] == pytest.approx([WINDOW.sigma(m - 100)]) and branch_i.sigma_start == WINDOW.sigma(m - 100)
    assert WINDOW.sigma(m + 100) > WINDOW.sigma(m) > WINDOW.sigma(m - 100)


def test_inversion_gradient_has_opposite_sign():
    grads = {}
    for direction in ("denoise", "inversion"):
        v = torch.zeros(2, 4, 64, requires_grad=True)
        _, _, loss, _, _ = run_branch(direction, v)
        loss.backward()
        grads[direction] = v.grad
    assert (grads["denoise"] > 0).all() and (grads["inversion"] < 0).all()


@pytest.mark.parametrize("m", [5, 300, 995])
def test_weights_read_at_the_less_noisy_end(m):
    release = {b.direction: b for b in srpo.make_branches(srpo_args(), WINDOW, m, "Real", "Anime")}
    assert release["denoise"].k == pytest.approx(torch.linspace(0.1, 0.25, 1000)[m].item(), abs=1e-6)
    start = max(1, m - WINDOW.branch_gap(m))
    assert release["inversion"].k == pytest.approx(torch.linspace(0.3, 0.01, 1000)[start].item(), abs=1e-6)
    # The release form's k is its timestep weighting: lambda(t) = 1. The other forms take the same schedules as lambda(t).
    assert release["denoise"].lam == release["inversion"].lam == 1.0
    srp = {b.direction: b for b in srpo.make_branches(srpo_args("--reward_form", "srp"), WINDOW, m, "Real", "Anime")}
    assert srp["denoise"].k == srp["inversion"].k == 0.0
    assert (srp["denoise"].lam, srp["inversion"].lam) == (release["denoise"].k, release["inversion"].k)


def test_lambda_multiplies_the_branch_loss():
    """Eq. 6: lambda(t) weighs the branch's loss; set apart from the schedules, it is read at the same place."""
    args = srpo_args("--reward_form", "srp", "--loss_type", "neg", "--denoise_lambda", "2,4")
    v = torch.zeros(2, 4, 64)
    _, _, loss, seen, branch = run_branch("denoise", v, index=300, args=args)
    assert branch.lam == pytest.approx(2 + 2 * 300 / 999)
    assert torch.allclose(loss, -branch.lam * seen["x0_hat"].flatten(1).sum(1).mean())


def test_release_inversion_end_point_with_match_release():
    """For m <= g the release starts the inversion branch at index 1 (clamped from m - g = 0) and ends it g later,
    at m + 1; ours ends both branches on m. Past the corner both agree."""
    release = TrainingWindow(5, 25, release_inversion_end=True)
    assert WINDOW.inversion_span(60) == (1, 60) and release.inversion_span(60) == (1, 61)
    assert WINDOW.inversion_span(500) == release.inversion_span(500) == (400, 500)


def test_branch_scores_hand_computation(tiny_rewards):
    """Text-image part: the release form with each branch's phrases. Image-only part (appendix S1): the same form
    of R(x) and R(x + noise), negated on the inversion branch."""
    reward = rewards.load_combined_reward("hpsv2:1.0,aesthetic:0.5", tiny_rewards)
    hps, aesthetic = reward.models["hpsv2"], reward.models["aesthetic"]
    images = [torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)]
    prompts = ["a cat", "a dog"]
    args = srpo_args()
    branches = srpo.make_branches(args, WINDOW, 500, "Real", "Anime")
    results = srpo.branch_scores(reward, images, prompts, branches, args, torch.Generator().manual_seed(1))
    clean, noised = rewards.noised_pair(aesthetic, torch.cat(images), prompts * 2, args.aesthetic_noise_std,
                                        torch.Generator().manual_seed(1))
    for i, (branch, (score, details)) in enumerate(zip(branches, results)):
        k = branch.k
        r_real = hps(images[i], ["Real. a cat", "Real. a dog"])
        r_anime = hps(images[i], ["Anime. a cat", "Anime. a dog"])
        text = (1 + k) * r_real - r_anime if branch.direction == "denoise" else (1 + k) * r_anime - r_real
        s1 = branch.sign * ((1 + k) * clean.chunk(2)[i] - noised.chunk(2)[i])
        assert torch.allclose(score, text + 0.5 * s1, atol=1e-5)
        # logged by phrase, whichever slot it was in
        assert torch.allclose(details["hpsv2/wanted"], r_real, atol=1e-6) and torch.allclose(details["hpsv2/unwanted"], r_anime, atol=1e-6)


def test_branch_scores_with_a_cross_attention_scorer(tiny_rewards):
    reward = rewards.load_combined_reward("imagereward:2.0", tiny_rewards)
    model = reward.models["imagereward"]
    images = torch.rand(2, 3, 64, 64)
    args = srpo_args("--reward_form", "srp", "--no_inversion", "--control_mode", "average", "--wanted_controls", "Real,Detail",
                     "--unwanted_controls", "Anime")
    branches = srpo.make_branches(args, WINDOW, 500, ["Real", "Detail"], ["Anime"])
    ((score, details),) = srpo.branch_scores(reward, [images], ["a cat", "a dog"], branches, args, None)
    r1 = (model(images, ["Real. a cat", "Real. a dog"]) + model(images, ["Detail. a cat", "Detail. a dog"])) / 2
    r2 = model(images, ["Anime. a cat", "Anime. a dog"])
    assert torch.allclose(score, 2.0 * (r1 - r2), atol=1e-6)
    assert torch.allclose(details["imagereward/wanted"], r1, atol=1e-6)


def test_cfg_form_takes_cfg_scale_not_the_branch_weight(tiny_rewards):
    """Eq. 11, (1 - k) C2 + k C1, is classifier-free guidance: its k is --cfg_scale on both branches (the branch
    weights 0.01-0.3 made it mostly a reward for the unwanted phrase); the branch weights become lambda(t)."""
    reward = rewards.load_combined_reward("hpsv2:1.0", tiny_rewards)
    hps = reward.models["hpsv2"]
    images = torch.rand(2, 3, 64, 64)
    args = srpo_args("--reward_form", "cfg", "--cfg_scale", "2.5")
    branches = srpo.make_branches(args, WINDOW, 500, "Real", "Anime")
    results = srpo.branch_scores(reward, [images, images], ["a cat", "a dog"], branches, args, None)
    r_real, r_anime = hps(images, ["Real. a cat", "Real. a dog"]), hps(images, ["Anime. a cat", "Anime. a dog"])
    (denoise, _), (inversion, _) = results
    assert torch.allclose(denoise, 2.5 * r_real - 1.5 * r_anime, atol=1e-6)
    assert torch.allclose(inversion, 2.5 * r_anime - 1.5 * r_real, atol=1e-6)
    assert branches[0].lam == pytest.approx(torch.linspace(0.1, 0.25, 1000)[500].item(), abs=1e-6)


REWARD_KINDS = [
    ("hpsv2:1.0", "Real", "Anime"), ("pickscore:0.05", "Real", "Anime"), ("clip:1.0", "Real", "Anime"),
    ("imagereward:1.0", "Real", "Anime"), ("aesthetic:1.0", "Real", "Anime"), ("toy_brightness:1.0", "Real", "Anime"),
    ("toy_colour:1.0", "red", "blue"), ("hpsv2:1.0,aesthetic:1.0", "Real", "Anime"), ("hpsv3:1.0", "Real", "Anime"),
]


@pytest.fixture(scope="module")
def tiny_rollout(tiny_flux):
    """The tiny FLUX with every weight trainable, and a rollout image of it."""
    from flux_rl import flux, latents, models
    from flux_rl.schedules import fixed_shift_sigmas

    pipe = models.load_pipeline(tiny_flux)
    transformer = pipe.transformer.requires_grad_(True)
    prompts = ["a cat", "a dog"]
    cond = flux.PromptEncoder(pipe, 32, "cpu")(prompts)
    ids = latents.image_ids(64, 64, 8, "cpu", torch.float32)
    noise = latents.pack(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)))
    x0 = flux.sample(transformer, noise, fixed_shift_sigmas(3), 1.0, cond, ids)
    return pipe, cond, ids, noise, x0, prompts


@pytest.mark.parametrize("spec, wanted, unwanted", REWARD_KINDS)
def test_the_two_branches_push_the_same_way(tiny_rollout, tiny_rewards, spec, wanted, unwanted):
    """The inversion branch regularises by pushing the denoising direction the same way as the denoise branch
    (towards wanted, away from unwanted): their parameter gradients agree (cosine > 0) for every reward kind.
    Image-only rewards took the denoise branch's S1 score on both branches, so the two cancelled (cosine -0.999)."""
    from flux_rl import flux, latents, training

    pipe, cond, ids, noise, x0, prompts = tiny_rollout
    reward = rewards.load_combined_reward(spec, tiny_rewards)
    args = srpo_args("--reward", spec, "--loss_type", "neg")
    parameters = list(pipe.transformer.parameters())
    for m in (100, 800):
        gradients = []
        for branch in srpo.make_branches(args, WINDOW, m, wanted, unwanted):
            generator = torch.Generator().manual_seed(1)

            def score_fn(images, branches):
                return [score for score, _ in srpo.branch_scores(reward, images, prompts, branches, args, generator)]

            ((loss, _),) = srpo.branch_losses(
                x0, noise, [branch], lambda x, sigma: flux.velocity(pipe.transformer, x, sigma, 3.5, cond, ids),
                lambda x: latents.decode(pipe.vae, x, 64, 64, 8), score_fn, lambda score: training.reward_loss(score, args))
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
            gradients.append(torch.cat([g.flatten() for g in grads if g is not None]).double())
        cosine = torch.nn.functional.cosine_similarity(*gradients, dim=0)
        assert cosine > 0.2, f"{spec} at m={m}: the branches' gradients have cosine {cosine:.3f}"


def test_controls_cycle_and_average():
    args = srpo_args()
    assert srpo.controls_for_step(args, 0) == ("Natural-lighting", "Concept art")
    assert srpo.controls_for_step(args, 5) == ("Detail", "Concept art")
    args = srpo_args("--control_mode", "average", "--wanted_controls", "A,B")
    assert srpo.controls_for_step(args, 3) == (["A", "B"], list(rewards.DEFAULT_UNWANTED_CONTROLS))


def test_defaults_reproduce_the_release():
    args = srpo_args("--full_finetune")
    assert args.train_window == (5, 25) and args.gt_ratio == 0.9
    assert args.denoise_weights == (0.1, 0.25) and args.inversion_weights == (0.3, 0.01)
    assert args.denoise_lambda == args.inversion_lambda == (1.0, 1.0)
    assert (args.loss_type, args.reward_threshold, args.learning_rate, args.max_grad_norm) == ("relu", 0.7, 5e-6, 0.1)
    assert (args.adam_weight_decay, args.resolution, args.num_inference_steps, args.rollout_shift) == (1e-4, (720, 720), 25, 3.0)
    assert (args.rollout_guidance, args.train_guidance, args.reward, args.reward_form) == (1.0, 3.5, "hpsv2:1.0", "release")
    assert not args.match_release


def test_lora_learning_rate_default():
    assert srpo_args().learning_rate == 1e-4
    assert srpo_args("--learning_rate", "3e-5").learning_rate == 3e-5


def test_pickscore_preset_and_override():
    args = srpo_args("--preset", "pickscore")
    assert args.reward == "pickscore:0.05" and args.train_window == (5, 30)
    assert args.denoise_weights == (0.1, 0.5) and args.inversion_weights == (0.6, 0.01) and args.rollout_guidance == 2.0
    args = srpo_args("--preset", "pickscore", "--train_window", "3,20")
    assert args.train_window == (3, 20)
    assert srpo_args("--preset", "pickscore", "--reward_form", "srp").inversion_lambda == (0.6, 0.01)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward_form", "sgp"], "add --no_inversion"),
        (["--denoise_weights", "0.1"], "two comma-separated numbers"),
        (["--controls_file", "/nonexistent.json"], "--controls_file"),
        (["--train_data_dir", "imgs", "--dataset_name", "someone/prompts"], "not both"),
        (["--wanted_controls", ","], "at least one phrase"),
        (["--cfg_scale", "1.0"], "guidance scale"),
        (["--cfg_scale", "0.25", "--reward_form", "cfg"], "guidance scale"),
        (["--inversion_lambda=-0.1,1"], "non-negative"),
    ],
)
def test_bad_srpo_flags(extra, message):
    with pytest.raises(ValueError, match=message):
        srpo_args(*extra)
