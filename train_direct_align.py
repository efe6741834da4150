#!/usr/bin/env python
"""Direct-Align (SRPO paper, section 3.1): reward fine-tuning of FLUX that trains early, noisy
timesteps by recovering the clean image in closed form from a known noise.

Smoke run on the built-in tiny models (CPU, a minute):

    python -m flux_rl.tiny_models --output_dir tiny-models
    accelerate launch --cpu --num_processes 1 train_direct_align.py \
        --pretrained_model_name_or_path tiny-models/flux --reward_models_dir tiny-models/rewards \
        --resolution 64 --num_inference_steps 4 --max_train_steps 4 --output_dir output/direct-align-smoke

FLUX.1-dev with HPSv2.1 (one GPU, LoRA):

    accelerate launch train_direct_align.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --dataset_name data/hpdv2/prompts.txt --reward hpsv2:1.0 --mixed_precision bf16 --gradient_checkpointing \
        --max_train_steps 200 --learning_rate 1e-4 --output_dir output/direct-align-hps

Per optimiser step: for each of `--gradient_accumulation_steps` rollouts, sample x0 from the
initial noise without gradient (ODE, `--num_inference_steps`), then `--num_injections` times:
draw a start point in the training window, inject the SAME noise (Eq. 3), take one model step
with gradient, recover x0_hat (Eq. 4-5), decode, score, weight by the discount lambda(t) (Eq. 6).
"""

import argparse
from collections import defaultdict


from flux_rl import args as common
from flux_rl import preemption, training
from flux_rl.data import step_generator
from flux_rl.direct_align import direct_align_recover
from flux_rl.schedules import TrainingWindow, linear_weight


def add_direct_align_args(parser):
    a = parser.add_argument
    a("--discount", type=str, default="0.5,1.0", help="lambda(t) of Eq. 6, linear from the window's late end to its early end.")
    return common.add_window_args(parser)



def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Direct-Align reward fine-tuning for FLUX.")
    args = add_direct_align_args(common.add_common_args(parser)).parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args):
    common.validate_common_args(args)
    common.validate_window_args(args)
    args.discount = common.parse_pair(args.discount, "discount")
    if min(args.discount) < 0 or max(args.discount) == 0:  # a negative weight would train towards a lower reward
        common.fail(f"--discount {args.discount[0]:g},{args.discount[1]:g}: lambda(t) of Eq. 6 weighs the reward, so both "
                    "must be non-negative and one positive (default 0.5,1.0)")


def training_step(run, step, logs):
    """One optimiser step of Direct-Align: rollouts, noise injections, recovery, discounted reward."""
    args, accelerator = run.args, run.accelerator
    window = TrainingWindow(*args.train_window, shift=args.window_shift, gt_ratio=args.gt_ratio)
    backward_passes = args.gradient_accumulation_steps * args.num_injections
    for micro in range(args.gradient_accumulation_steps):
        micro_step = step * args.gradient_accumulation_steps + micro
        generator = step_generator(args.seed, micro_step, accelerator.process_index)
        x0, noise, cond, prompts = run.next_batch(micro_step, generator)
        for injection in range(args.num_injections):
            high, low = window.denoise_span(window.sample_index(generator))
            sigma_high, sigma_low = window.sigma(high), window.sigma(low)
            last = micro == args.gradient_accumulation_steps - 1 and injection == args.num_injections - 1
            with run.sync_gradients(last):
                x0_hat = direct_align_recover(x0, noise, sigma_high, sigma_low, run.velocity_fn(cond), "denoise")  # Eq. 5
                images = run.decode(x0_hat)
                reward, components = run.reward(images, prompts)
                discount = linear_weight(args.discount, low)  # Eq. 6: lambda(t), read at the less noisy end
                loss = discount * training.reward_loss(reward, args).mean()
                accelerator.backward(loss / backward_passes)
            training.log_reward_terms(logs, loss, reward, components)
            logs["sigma"].append(sigma_high)
            logs["discount"].append(discount)


def main(args):
    run = training.setup(args, "direct-align")  # accelerator, prompts, rewards, FLUX with LoRA, optimizer, resume: flux_rl/training.py
    with preemption.StopRequest().listening() as stop:  # SIGTERM, SIGUSR1, Ctrl-C: finish the step, checkpoint, exit
        if run.start_step == 0:
            run.validate(0)  # the untrained model's images, which every later validation is compared with
        for step in run.steps():  # the optimiser steps still to run (a resumed run goes on), with a progress bar
            logs = defaultdict(list)
            training_step(run, step, logs)  # rollouts, noise injections, recovery, discounted reward, backward (above)
            grad_norm, skipped = run.optimizer_step()  # clip to --max_grad_norm, step unless the gradient is not finite, zero
            run.log(step, {**training.means(logs), "grad_norm": grad_norm, "update_skipped": skipped})  # averaged over processes
            run.end_of_step(step, stop)  # checkpoint and validation when due; a stop signal: checkpoint and exit
        training.finish(run)  # final validation, weights in diffusers format, model card, Hub push


if __name__ == "__main__":
    common.run_cli(parse_args, main)
