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
  5. Each branch is weighted by its own timestep schedule (the release form's k, or lambda(t) of
     Eq. 6 for the srp, cfg and sgp forms); loss relu(0.7 - score) as the release.
Image-only rewards (aesthetic) take the appendix S1 form, R(x) against R(x + noise).

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
from collections import defaultdict
from dataclasses import dataclass

import torch

import rewards
from flux_rl import args as common
from flux_rl import preemption, training
from flux_rl.data import step_generator
from flux_rl.direct_align import direct_align_recover_batched
from flux_rl.monitors import image_statistics
from flux_rl.schedules import TrainingWindow, linear_weight, truncate_model_timesteps
from rewards.preprocess import clamp_after_resize

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
    a("--denoise_weights", type=str, default=None,
      help="The denoise branch's timestep weight late,early (linear over the window, read at the branch's less noisy end): "
           "k of the release form; the default lambda(t) of the other forms.")
    a("--inversion_weights", type=str, default=None, help="The same for the inversion branch.")
    a("--denoise_lambda", type=str, default=None,
      help="lambda(t) of Eq. 6 for the denoise branch, late,early: multiplies its loss. Default: 1,1 for the release form "
           "(its k is its timestep weighting), --denoise_weights for srp, cfg and sgp.")
    a("--inversion_lambda", type=str, default=None, help="The same for the inversion branch (default: 1,1 or --inversion_weights).")
    a("--cfg_scale", type=float, default=1.5,
      help="Eq. 11's k for --reward_form cfg: (1 - k) C_unwanted + k C_wanted = C_unwanted + k (C_wanted - C_unwanted), a "
           "guidance scale above 1, apart from the branch weights.")
    a("--match_release", action="store_true",
      help="Reproduce the authors' release where this project differs on purpose: the transformer's timestep truncated to "
           "1/1000, no clamp after the reward's resize, one initial noise for all processes, and the inversion branch ending "
           "at m + 1 for m <= g (README: 'Where we differ from the release').")
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
    for branch in ("denoise", "inversion"):  # lambda(t): 1 under the release form, whose k weighs the timesteps
        flag, weights = f"{branch}_lambda", getattr(args, f"{branch}_weights")
        value = getattr(args, flag) or ((1.0, 1.0) if args.reward_form == "release" else weights)
        setattr(args, flag, common.parse_pair(value, flag))
        if min(getattr(args, flag)) < 0:  # a negative weight would train that branch towards a lower reward
            raise ValueError(f"--{flag} {value}: lambda(t) of Eq. 6 weighs the loss, so both numbers must be non-negative")
    if args.cfg_scale <= 1:
        raise ValueError(f"--cfg_scale {args.cfg_scale}: Eq. 11's k is a guidance scale, (1 - k) C_unwanted + k C_wanted; "
                         "at or below 1 it rewards the unwanted phrase as much as or more than the wanted one. Use e.g. 1.5")
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


@dataclass(frozen=True)
class Branch:
    """One training branch from a start point m: everything that differs between SRPO's two branches,
    built in one place (make_branches) and read by the recovery, the reward and the loss alike."""

    direction: str  # "denoise" (Eq. 12) or "inversion" (Eq. 13)
    sigma_high: float  # the branch's noisier end
    sigma_low: float  # its less noisy end, where its weights are read
    k: float  # the release form's k (0 for the other forms)
    lam: float  # lambda(t) of Eq. 6: multiplies the branch's loss
    positive: object  # control phrase(s) in the C1 slot: the wanted ones on the denoise branch
    negative: object  # control phrase(s) in the C2 slot: the unwanted ones on the denoise branch
    sign: float  # +1 denoise, -1 inversion: the sign the model term enters the recovered image with

    @property
    def sigma_start(self) -> float:
        """Where the model is evaluated: the noisier end for denoise, the less noisy one for inversion."""
        return self.sigma_high if self.direction == "denoise" else self.sigma_low


def make_branches(args, window, index, wanted, unwanted) -> list[Branch]:
    """SRPO's branches from start point `index` of the training window. Both end on grid point m.

    denoise:   from grid index m + g one model step DOWN to m; reward with (wanted, unwanted).
    inversion: from m - g one model step UP to m; the model term enters with the opposite sign
               (Eq. 13), so its reward takes the phrases swapped (unwanted, wanted) and pushes the
               denoising direction the same way as the denoise branch: towards the wanted phrase,
               away from the unwanted one, with its k penalising the unwanted phrase (Eq. 12-13).
    Each branch's weights (k or lambda) are read at its less noisy end: m for denoise, m - g for
    inversion, as the release does.
    """
    branches = []
    for direction in ("denoise",) if args.no_inversion else ("denoise", "inversion"):
        if direction == "denoise":
            start, end = window.denoise_span(index)
            high, low, weight_index = window.sigma(start), window.sigma(end), end
            positive, negative, sign = wanted, unwanted, 1.0
        else:
            start, end = window.inversion_span(index)
            high, low, weight_index = window.sigma(end), window.sigma(start), start
            positive, negative, sign = unwanted, wanted, -1.0
        k = linear_weight(getattr(args, f"{direction}_weights"), weight_index) if args.reward_form == "release" else 0.0
        lam = linear_weight(getattr(args, f"{direction}_lambda"), weight_index)
        branches.append(Branch(direction, high, low, k, lam, positive, negative, sign))
    return branches


def form_score(args, branch: Branch, r_positive, r_negative):
    """A branch's reward from its two scores, r1 = r(C1) and r2 = r(C2), in the form --reward_form
    names (rewards.relative: every form is a * r1 + b * r2, which for a CLIP-like model equals scoring
    the text direction a * C1 + b * C2 of Eq. 10-11). To try another form, change this function."""
    k = args.cfg_scale if args.reward_form == "cfg" else branch.k  # Eq. 11's guidance scale, or the release form's k
    return rewards.combine_scores(r_positive, r_negative, args.reward_form, k)  # Eq. 8 / 9-10 / 11 / release form


def branch_scores(reward, branch_images, prompts, branches, args, generator):
    """Each branch's score, the weighted sum over the reward spec of each model's relative reward:
    [(score, details to log)]. All branches' images go through a model's image tower as one batch.

    text-image model: form_score of the scores against "<C1 phrase>. <prompt>" and "<C2 phrase>. <prompt>".
    image-only model (appendix S1): form_score of R(x) and R(x + small noise), the clean image in the
        wanted phrase's place; there is no unwanted phrase to penalise, so the inversion branch takes
        that score negated (sign -1): with its model term's opposite sign (Eq. 13) it then pushes the
        denoising direction the same way as the denoise branch, as the swapped phrases do for a text
        reward. Without the sign the two branches' gradients cancel (cosine -0.9 to -0.999).
    """
    scores, logged = [0.0] * len(branches), [{} for _ in branches]
    for name, model in reward.models.items():
        if model.uses_text:
            encodings = model.image_encoding(torch.cat(branch_images)).chunk(len(branches))  # one tower pass
            pairs = [(rewards.control_scores(model, images, prompts, branch.positive, encoding),
                      None if args.reward_form == "sgp" else rewards.control_scores(model, images, prompts, branch.negative, encoding))
                     for images, branch, encoding in zip(branch_images, branches, encodings)]
        else:
            clean, noised = rewards.noised_pair(model, torch.cat(branch_images), prompts and list(prompts) * len(branches),
                                                args.aesthetic_noise_std, generator)  # appendix S1
            pairs = list(zip(clean.chunk(len(branches)), noised.chunk(len(branches))))
        for i, (branch, (r_positive, r_negative)) in enumerate(zip(branches, pairs)):
            value = form_score(args, branch, r_positive, r_negative)
            if model.uses_text:  # logged by phrase: the inversion branch has the unwanted phrase in the C1 slot
                wanted, unwanted = (r_positive, r_negative) if branch.sign > 0 else (r_negative, r_positive)
                logged[i].update({f"{name}/wanted": wanted.detach()} | ({} if unwanted is None else {f"{name}/unwanted": unwanted.detach()}))
            else:
                value = branch.sign * value
                logged[i].update({f"{name}/clean": r_positive.detach(), f"{name}/noised": r_negative.detach()})
            logged[i][name] = value.detach()
            scores[i] = scores[i] + reward.weights[name] * value
    return list(zip(scores, logged))


def branch_losses(x0, noise, branches, velocity_fn, decode_fn, score_fn, loss_fn):
    """The branches of one start point, from the clean latent to their losses, as one batch: the
    model steps of all branches in one call (`velocity_fn` takes len(branches) * B samples and a
    sigma per sample), their images in one VAE decode and one score_fn call. With one branch in
    `branches` the same computation runs for that branch alone (--no_batch_branches).
    Returns [(loss, score)] in the order of `branches`; each loss is lambda(t) * loss(score) (Eq. 6)."""
    x0_hats = direct_align_recover_batched(
        x0, noise, [(branch.direction, branch.sigma_high, branch.sigma_low) for branch in branches], velocity_fn
    )  # Eq. 12 (denoise) and Eq. 13 (inversion): the model term enters with the branch's sign
    images = decode_fn(torch.cat(x0_hats)).chunk(len(branches))
    scores = score_fn(list(images), branches)
    return [(branch.lam * loss_fn(score).mean(), score) for branch, score in zip(branches, scores)]


def training_step(run, step, logs):
    """One optimiser step of SRPO: rollouts, then per start point a denoise and an inversion branch."""
    args, accelerator = run.args, run.accelerator
    window = TrainingWindow(*args.train_window, shift=args.window_shift, gt_ratio=args.gt_ratio,
                            release_inversion_end=args.match_release)
    branch_count = 1 if args.no_inversion else 2
    backward_passes = args.gradient_accumulation_steps * args.num_injections * branch_count

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

        def score_fn(branch_images, branches):
            results = branch_scores(run.reward, branch_images, prompts, branches, args, generator)
            for branch, (_, details) in zip(branches, results):
                for key, value in details.items():
                    logs[f"{branch.direction}/{key}"].append(value.mean())
            return [score for score, _ in results]

        for injection in range(args.num_injections):
            branches = make_branches(args, window, window.sample_index(generator), wanted, unwanted)
            last_injection = micro == args.gradient_accumulation_steps - 1 and injection == args.num_injections - 1
            # Batched: both branches in one model call and one backward (the same gradient); else one at a time.
            groups = [branches] if args.batch_branches else [[branch] for branch in branches]
            for group in groups:
                with run.sync_gradients(last_injection and group is groups[-1]):
                    results = branch_losses(x0, noise, group, run.velocity_fn(cond.repeat(len(group))), run.decode,
                                            score_fn, loss_fn)
                    accelerator.backward(sum(loss for loss, _ in results) / backward_passes)
                for branch, (loss, score) in zip(group, results):
                    logs["loss"].append(loss.detach())  # read back once per step, in Run.log
                    logs[f"{branch.direction}/score"].append(score.detach().mean())
                    logs[f"{branch.direction}/k"].append(branch.k)
                    logs[f"{branch.direction}/lambda"].append(branch.lam)
                    logs[f"{branch.direction}/sigma"].append(branch.sigma_start)


def main(args):
    # --match_release: the release's timestep truncation and unclamped reward resize, process-wide (the
    # shared initial noise: Run.next_batch; the inversion end point: the TrainingWindow above).
    truncate_model_timesteps(args.match_release)
    clamp_after_resize(not args.match_release)
    run = training.setup(args, "srpo")  # accelerator, prompts, rewards, FLUX with LoRA, optimizer, resume: flux_rl/training.py
    with preemption.StopRequest().listening() as stop:  # SIGTERM, SIGUSR1, Ctrl-C: finish the step, checkpoint, exit
        if run.start_step == 0:
            run.validate(0)  # the untrained model's images, which every later validation is compared with
        for step in run.steps():  # the optimiser steps still to run (a resumed run goes on), with a progress bar
            logs = defaultdict(list)
            training_step(run, step, logs)  # rollouts, then each start point's branches and backward passes (above)
            grad_norm, skipped = run.optimizer_step()  # clip to --max_grad_norm, step unless the gradient is not finite, zero
            run.log(step, {**training.means(logs), "grad_norm": grad_norm, "update_skipped": skipped})  # averaged over processes
            run.end_of_step(step, stop)  # checkpoint and validation when due; a stop signal: checkpoint and exit
        training.finish(run)  # final validation, weights in diffusers format, model card, Hub push


if __name__ == "__main__":
    common.run_cli(parse_args, main)
