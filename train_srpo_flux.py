#!/usr/bin/env python
"""SRPO: Semantic Relative Preference Optimization on Direct-Align (paper section 3.2, appendix S1).

What it does, in five lines:
  1. Roll out an image x0 from noise with the current model, without gradient (25 Euler steps).
  2. Inject the same noise again at a point of the training window and recover x0 in closed form
     after ONE model step (Direct-Align, Eq. 3-5), for a denoise branch and an inversion branch.
  3. Score the recovered image with the reward model against "<wanted>. <prompt>" and
     "<unwanted>. <prompt>": the relative reward cancels the reward model's general bias (Eq. 9-11).
  4. The inversion branch (one model step towards MORE noise, phrases swapped) enters with the
     opposite sign: a penalty at the late timesteps where reward hacking happens (Eq. 12-13).
  5. Each branch is weighted by its own timestep schedule; loss relu(0.7 - score) as the release.

Smoke run on the built-in tiny models (CPU):

    python -m flux_rl.tiny_models --output_dir tiny-models
    accelerate launch --cpu --num_processes 1 train_srpo_flux.py \
        --pretrained_model_name_or_path tiny-models/flux --reward_models_dir tiny-models/rewards \
        --resolution 64 --num_inference_steps 4 --max_train_steps 4 --output_dir output/srpo-smoke

FLUX.1-dev with HPSv2.1 and the authors' settings (defaults = their release):

    accelerate launch train_srpo_flux.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --dataset_name data/hpdv2/prompts.txt --mixed_precision bf16 --gradient_checkpointing \
        --output_dir output/srpo-hps
"""

import argparse
import json

import torch

import rewards
from flux_rl import args as common
from flux_rl import training
from flux_rl.data import step_generator
from flux_rl.direct_align import direct_align_recover, direct_align_recover_batched
from flux_rl.monitors import image_statistics
from flux_rl.schedules import TrainingWindow, linear_weight

# The release's two recipes (shared/notes/reference-implementation.md). "hps" is the default.
PRESETS = {
    "hps": dict(reward="hpsv2:1.0", train_window="5,25", denoise_weights="0.1,0.25", inversion_weights="0.3,0.01",
                rollout_guidance=1.0),
    # PickScore is about 20-23; the release divides it by 20 to reach HPS's scale (weight 0.05).
    "pickscore": dict(reward="pickscore:0.05", train_window="5,30", denoise_weights="0.1,0.5", inversion_weights="0.6,0.01",
                      rollout_guidance=2.0),
}


def add_srpo_args(parser):
    a = parser.add_argument
    a("--preset", type=str, default="hps", choices=sorted(PRESETS), help="Release recipe whose defaults to use.")
    a("--reward_form", type=str, default="release", choices=rewards.REWARD_FORMS,
      help="release: (1+k) C_wanted - C_unwanted; srp: Eq. 9-10; cfg: Eq. 11; sgp: Eq. 8.")
    a("--wanted_controls", type=str, default=",".join(rewards.DEFAULT_WANTED_CONTROLS), help="Comma-separated wanted control phrases.")
    a("--unwanted_controls", type=str, default=",".join(rewards.DEFAULT_UNWANTED_CONTROLS), help="Comma-separated unwanted control phrases.")
    a("--controls_file", type=str, default=None, help='JSON {"wanted": [...], "unwanted": [...]}; overrides the two flags above.')
    a("--control_mode", type=str, default="cycle", choices=["cycle", "average"], help="One phrase of each per step, cycling; or all averaged.")
    a("--no_inversion", action="store_true", help="Only the denoise branch with the relative reward (no Eq. 12-13 regulariser).")
    a("--denoise_weights", type=str, default=None, help="k of the denoise branch, linear from the window's late to early end.")
    a("--inversion_weights", type=str, default=None, help="k of the inversion branch, linear from late to early.")
    a("--aesthetic_noise_std", type=float, default=0.05, help="Noise of the appendix S1 relative form for image-only rewards.")
    a("--train_data_dir", type=str, default=None, help="Offline SRPO: an image folder with metadata.jsonl replaces the rollout.")
    a("--monitor_steps", type=int, default=10,
      help="Log drift monitors of the rollout images every N steps (0: never). Each costs one no-grad VAE decode of the "
           "rollout image (about 50 ms at 720 px on an H200, eager), for a trend line.")
    a("--batch_branches", action="store_true", default=True,
      help="Run the denoise and inversion branches of a start point as one batch-2 model call, one batch-2 VAE decode, "
           "one batch-2 pass of the reward's image tower and one backward pass (same gradient, same FLOPs, half the kernel "
           "launches; both branches' activations held at once: the compiled LoRA step at 720 px on an H200 peaked at 35.6 GiB "
           "with this and the other speed defaults, 31.9 GiB without them). Default: on.")
    a("--no_batch_branches", dest="batch_branches", action="store_false",
      help="One branch at a time: fewer activations held at once, more kernel launches.")
    return common.add_window_args(parser)


def parse_args(input_args=None):
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default="hps", choices=sorted(PRESETS))
    preset = preset_parser.parse_known_args(input_args)[0].preset
    parser = add_srpo_args(common.add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args):
    if args.train_data_dir and args.dataset_name:
        raise ValueError("give either --train_data_dir (offline SRPO on images) or --dataset_name (prompts), not both")
    common.validate_common_args(args)
    common.validate_window_args(args)
    common.check_ranges(args, [
        ("monitor_steps", "non-negative", "0 turns the drift monitor off"),
        ("aesthetic_noise_std", "positive", "the appendix S1 reward R(x) - R(x + noise) is 0 without noise"),
    ])
    args.denoise_weights = common.parse_pair(args.denoise_weights, "denoise_weights")
    args.inversion_weights = common.parse_pair(args.inversion_weights, "inversion_weights")
    if args.controls_file:
        try:
            with open(args.controls_file) as f:
                controls = json.load(f)
            args.wanted_controls, args.unwanted_controls = controls["wanted"], controls["unwanted"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"--controls_file {args.controls_file}: need a JSON file with 'wanted' and 'unwanted' lists ({error})") from None
    else:
        args.wanted_controls = [c.strip() for c in args.wanted_controls.split(",") if c.strip()]
        args.unwanted_controls = [c.strip() for c in args.unwanted_controls.split(",") if c.strip()]
    if not args.wanted_controls or (args.reward_form != "sgp" and not args.unwanted_controls):
        raise ValueError("--wanted_controls and --unwanted_controls need at least one phrase each")
    if args.reward_form == "sgp" and not args.no_inversion:
        raise ValueError("--reward_form sgp has no unwanted phrase to swap in the inversion branch; add --no_inversion")


def controls_for_step(args, step):
    """(wanted, unwanted) phrases of this step: one of each, cycling with the step, or all."""
    if args.control_mode == "average":
        return args.wanted_controls, args.unwanted_controls
    wanted = args.wanted_controls[step % len(args.wanted_controls)]
    unwanted = args.unwanted_controls[step % len(args.unwanted_controls)] if args.unwanted_controls else None
    return wanted, unwanted


def relative_score(reward, images, prompts, positive, negative, form, k, noise_std, generator):
    """Weighted sum over the reward spec of each model's semantic-relative reward (Eq. 8-11), or
    for image-only models the appendix S1 form. `positive` phrases go in the C1 slot,
    `negative` ones in the C2 slot. Returns (score, per-model details to log)."""
    return relative_scores(reward, [images], prompts, [(positive, negative)], form, [k], noise_std, generator)[0]


def relative_scores(reward, branch_images, prompts, branch_phrases, form, ks, noise_std, generator):
    """relative_score of several branches' images of the same prompts, each with its own
    (positive, negative) phrases and k: [(score, details)] per branch. A text-image reward encodes
    all branches' images in one batch, once for both phrases (one pass of its image tower, forward
    and backward)."""
    results = [(0.0, {}) for _ in branch_images]
    for name, model in reward.models.items():
        encodings = [None] * len(branch_images)
        if model.uses_text:
            encodings = model.image_encoding(torch.cat(branch_images)).chunk(len(branch_images))
        for i, (images, (positive, negative), k) in enumerate(zip(branch_images, branch_phrases, ks)):
            total, details = results[i]
            if model.uses_text:  # Eq. 8 / 9-10 / 11 / release form
                value, r_positive, r_negative = rewards.relative_terms(model, images, prompts, positive, negative, form, k, encodings[i])
                details[f"{name}/positive"] = r_positive.detach()
                if r_negative is not None:
                    details[f"{name}/negative"] = r_negative.detach()
            else:
                value = rewards.noised_relative_reward(model, images, prompts, noise_std, generator)  # appendix S1
            details[name] = value.detach()
            results[i] = (total + reward.weights[name] * value, details)
    return results


def branch_span(window, index, direction, weight_schedule):
    """Where an SRPO branch runs: (sigma_high, sigma_low, k, sigma_start).

    denoise:   start at grid index m + g, one model step down to m, reward (wanted, unwanted).
    inversion: start at m - g, one model step UP to m, reward with the phrases swapped (Eq. 13).
    Both end on grid point m. The branch's k is read at its less noisy end (m for denoise,
    m - g for inversion), as the release does.
    """
    if direction == "denoise":
        start, end = window.denoise_span(index)
        return window.sigma(start), window.sigma(end), linear_weight(weight_schedule, end), window.sigma(start)
    start, end = window.inversion_span(index)
    return window.sigma(end), window.sigma(start), linear_weight(weight_schedule, start), window.sigma(start)


def branch_loss(x0, noise, window, index, direction, velocity_fn, decode_fn, score_fn, weight_schedule, loss_fn):
    """One SRPO training branch, from the clean latent to a loss. `decode_fn(x0_hat)` -> images,
    `score_fn([images], [k], [swapped])` -> [B scores]. Returns (loss, score, k, sigma_start)."""
    sigma_high, sigma_low, k, sigma_start = branch_span(window, index, direction, weight_schedule)
    x0_hat = direct_align_recover(x0, noise, sigma_high, sigma_low, velocity_fn, direction)  # Eq. 12 / Eq. 13
    (score,) = score_fn([decode_fn(x0_hat)], [k], [direction == "inversion"])
    return loss_fn(score).mean(), score, k, sigma_start


def branch_losses_batched(x0, noise, window, index, directions, velocity_fn, decode_fn, score_fn, weight_schedules, loss_fn):
    """branch_loss for each of `directions` from the same start point m, with the model steps of all
    branches in one call on their stacked batch (`velocity_fn` takes len(directions) * B samples and a
    sigma per sample), their images in one VAE decode and one score_fn call. Returns
    [(loss, score, k, sigma_start)] in the order of `directions`."""
    spans = [branch_span(window, index, direction, weight_schedules[direction]) for direction in directions]
    x0_hats = direct_align_recover_batched(
        x0, noise, [(direction, high, low) for direction, (high, low, _, _) in zip(directions, spans)], velocity_fn
    )  # Eq. 12 and Eq. 13 in one model call
    images = decode_fn(torch.cat(x0_hats)).chunk(len(directions))
    scores = score_fn(list(images), [k for _, _, k, _ in spans], [direction == "inversion" for direction in directions])
    return [(loss_fn(score).mean(), score, k, sigma_start) for score, (_, _, k, sigma_start) in zip(scores, spans)]


def training_step(run, step, logs):
    """One optimiser step of SRPO: rollouts, then per start point a denoise and an inversion branch."""
    args, accelerator = run.args, run.accelerator
    window = TrainingWindow(*args.train_window, shift=args.window_shift, gt_ratio=args.gt_ratio)
    directions = ["denoise"] if args.no_inversion else ["denoise", "inversion"]
    schedules = {"denoise": args.denoise_weights, "inversion": args.inversion_weights}
    backward_passes = args.gradient_accumulation_steps * args.num_injections * len(directions)

    def loss_fn(score):
        return training.reward_loss(score, args)

    wanted, unwanted = controls_for_step(args, step)
    for micro in range(args.gradient_accumulation_steps):
        micro_step = step * args.gradient_accumulation_steps + micro
        generator = step_generator(args.seed, micro_step, accelerator.process_index)
        x0, noise, cond, prompts = run.next_batch(micro_step, generator)
        if args.monitor_steps and step % args.monitor_steps == 0 and micro == 0:
            with torch.no_grad():
                for key, value in image_statistics(run.decode(x0)).items():
                    logs[key].append(value)

        def score_fn(branch_images, ks, swaps):
            """Scores of each branch's images; `swaps[i]`: the inversion branch's swapped phrases."""
            phrases = [(unwanted, wanted) if swapped else (wanted, unwanted) for swapped in swaps]
            results = relative_scores(run.reward, branch_images, prompts, phrases, args.reward_form, ks,
                                      args.aesthetic_noise_std, generator)
            for swapped, (_, details) in zip(swaps, results):
                branch = "inversion" if swapped else "denoise"
                # The inversion branch puts the unwanted phrase in the positive slot; log by phrase.
                roles = {"positive": "unwanted", "negative": "wanted"} if swapped else {"positive": "wanted", "negative": "unwanted"}
                for key, value in details.items():
                    name, _, slot = key.partition("/")
                    logs[f"{branch}/{name}/{roles[slot]}" if slot else f"{branch}/{name}"].append(value.mean())
            return [score for score, _ in results]

        def log_branch(direction, loss, score, k, sigma):
            logs["loss"].append(loss.detach())  # read back once per step, in Run.log
            logs[f"{direction}/score"].append(score.detach().mean())
            logs[f"{direction}/k"].append(k)
            logs[f"{direction}/sigma"].append(sigma)

        for injection in range(args.num_injections):
            index = window.sample_index(generator)
            last_injection = micro == args.gradient_accumulation_steps - 1 and injection == args.num_injections - 1
            if args.batch_branches:  # both branches in one model call and one backward: the same gradient
                with run.sync_gradients(last_injection):
                    results = branch_losses_batched(x0, noise, window, index, directions, run.velocity_fn(cond.repeat(len(directions))),
                                                    run.decode, score_fn, schedules, loss_fn)
                    accelerator.backward(sum(loss for loss, *_ in results) / backward_passes)
                for direction, result in zip(directions, results):
                    log_branch(direction, *result)
                continue
            for direction in directions:
                with run.sync_gradients(last_injection and direction == directions[-1]):
                    loss, score, k, sigma = branch_loss(x0, noise, window, index, direction, run.velocity_fn(cond),
                                                        run.decode, score_fn, schedules[direction], loss_fn)
                    accelerator.backward(loss / backward_passes)
                log_branch(direction, loss, score, k, sigma)


def main(args):
    training.train(training.setup(args, "srpo"), training_step)


if __name__ == "__main__":
    common.run_cli(parse_args, main)
