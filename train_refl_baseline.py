#!/usr/bin/env python
"""ReFL baseline (Xu et al. 2023, "ImageReward", Reward Feedback Learning) re-implemented on FLUX.

Algorithm, per rollout image:
  1. From noise, sample WITHOUT gradient down to a random sampler step j in the late part of the
     trajectory (`--grad_step_range`, default the last quarter of the steps, as ImageReward's
     t in [30, 39] of 40).
  2. One model step WITH gradient that predicts x0 directly, in the flow form of paper Eq. 2:
     x0_hat = x_j - sigma_j * v(x_j, sigma_j).
  3. Decode, score with the reward, loss relu(threshold - r) * scale (ReFL used threshold 2 and
     scale 1e-3 with ImageReward; our defaults for HPSv2.1 are threshold 0.7 and scale 1, the same
     loss the SRPO release uses, so the two compare like for like) or -r * scale.
The pretraining-loss regulariser of ReFL's SDXL LoRA variant is not included (it is not part of
the method the SRPO paper compares with).

    accelerate launch train_refl_baseline.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --dataset_name data/hpdv2/prompts.txt --reward hpsv2:1.0 --mixed_precision bf16 --gradient_checkpointing \
        --output_dir output/refl-hps
"""

import argparse
import math
from collections import defaultdict

import torch

from flux_rl import args as common
from flux_rl import preemption, training
from flux_rl.data import step_generator


def add_refl_args(parser):
    parser.add_argument("--grad_step_range", type=str, default=None,
                        help="Sampler steps a,b (inclusive, 0-based) where the gradient step may happen; default: the last quarter.")
    # The trained image is the sampler's own, so one guidance value serves both phases.
    parser.set_defaults(rollout_guidance=3.5)
    return parser


def grad_step_range(args) -> tuple[int, int]:
    if args.grad_step_range is None:
        return args.num_inference_steps - math.ceil(args.num_inference_steps / 4), args.num_inference_steps - 1
    return args.grad_step_range


def parse_args(input_args=None):
    parser = add_refl_args(common.add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    args = parser.parse_args(input_args)
    common.validate_common_args(args)
    if args.grad_step_range is not None:
        args.grad_step_range = common.parse_pair(args.grad_step_range, "grad_step_range", int)
        low, high = args.grad_step_range
        if not 0 <= low <= high < args.num_inference_steps:
            raise ValueError(f"--grad_step_range {low},{high} must satisfy 0 <= a <= b < --num_inference_steps ({args.num_inference_steps})")
    return args


def refl_predict_x0(x_t, sigma, velocity_fn):
    """Eq. 2 in the flow form: one model step straight to x0 from x_t at noise level sigma."""
    return x_t.float() - sigma * velocity_fn(x_t, sigma).float()


def training_step(run, step, logs):
    """One optimiser step of ReFL: sample to a late step, one x0-predicting step with gradient."""
    args, accelerator = run.args, run.accelerator
    low, high = grad_step_range(args)
    for micro in range(args.gradient_accumulation_steps):
        micro_step = step * args.gradient_accumulation_steps + micro
        generator = step_generator(args.seed, micro_step, accelerator.process_index)
        prompts = run.batches.batch(micro_step)
        stop = int(torch.randint(low, high + 1, (1,), generator=generator))
        x_t, _, cond = run.rollout(prompts, generator, stop_index=stop, micro_step=micro_step)
        sigma = float(run.rollout_sigmas[stop])
        with run.sync_gradients(micro == args.gradient_accumulation_steps - 1):
            x0_hat = refl_predict_x0(x_t, sigma, run.velocity_fn(cond, args.rollout_guidance))
            reward, components = run.reward(run.decode(x0_hat), prompts)
            loss = training.reward_loss(reward, args).mean()
            accelerator.backward(loss / args.gradient_accumulation_steps)
        training.log_reward_terms(logs, loss, reward, components)
        logs["sigma"].append(sigma)


def main(args):
    run = training.setup(args, "refl")  # accelerator, prompts, rewards, FLUX with LoRA, optimizer, resume: flux_rl/training.py
    with preemption.StopRequest().listening() as stop:  # SIGTERM, SIGUSR1, Ctrl-C: finish the step, checkpoint, exit
        if run.start_step == 0:
            run.validate(0)  # the untrained model's images, which every later validation is compared with
        for step in run.steps():  # the optimiser steps still to run (a resumed run goes on), with a progress bar
            logs = defaultdict(list)
            training_step(run, step, logs)  # rollouts to a late step, one x0-predicting step with gradient, backward (above)
            grad_norm, skipped = run.optimizer_step()  # clip to --max_grad_norm, step unless the gradient is not finite, zero
            run.log(step, {**training.means(logs), "grad_norm": grad_norm, "update_skipped": skipped})  # averaged over processes
            run.end_of_step(step, stop)  # checkpoint and validation when due; a stop signal: checkpoint and exit
        training.finish(run)  # final validation, weights in diffusers format, model card, Hub push


if __name__ == "__main__":
    common.run_cli(parse_args, main)
