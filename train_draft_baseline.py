#!/usr/bin/env python
"""DRaFT baselines (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable
Rewards", arXiv 2309.17400) re-implemented on FLUX.

DRaFT-K (`--draft_k K`): sample without gradient, then backpropagate the reward through only the
last K sampler steps (paper Eq. 1); each of those steps is recomputed in the backward pass
(gradient checkpointing per step), so K > 1 fits in memory.

DRaFT-LV (`--draft_lv`, K = 1 with lower variance): sample the final image x0 without gradient,
then n times (`--lv_samples`, default 2 as the paper) draw FRESH noise, re-noise x0 to the last
sampler step's noise level sigma_last, and denoise that one step with gradient:
    x0_hat_i = x_i - sigma_last * v(x_i, sigma_last),  x_i = sigma_last * eps_i + (1 - sigma_last) x0
The loss averages the n rewards. Following the paper's algorithm the base sample does not count
(its last step ran without gradient); `--lv_include_base` adds it, computing the real last
step with gradient, for n + 1 terms as one public FLUX re-implementation does.

    accelerate launch train_draft_baseline.py --draft_lv --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --dataset_name data/hpdv2/prompts.txt --reward hpsv2:1.0 --mixed_precision bf16 --gradient_checkpointing \
        --output_dir output/draft-lv-hps
"""

import argparse
from collections import defaultdict

import torch

from flux_rl import args as common
from flux_rl import preemption, training
from flux_rl.data import step_generator
from flux_rl.direct_align import inject_noise
from flux_rl.flux import ode_sample
from rewards.base import host_to_device


def add_draft_args(parser):
    a = parser.add_argument
    a("--draft_k", type=int, default=1, help="DRaFT-K: backpropagate through the last K sampler steps.")
    a("--draft_lv", action="store_true", help="DRaFT-LV: K = 1 with --lv_samples re-noised copies of the final image.")
    a("--lv_samples", type=int, default=2, help="n of DRaFT-LV (the paper's default 2).")
    a("--lv_include_base", action="store_true", help="DRaFT-LV: also backpropagate through the real last step (n + 1 terms).")
    parser.set_defaults(rollout_guidance=3.5)
    return parser


def parse_args(input_args=None):
    parser = add_draft_args(common.add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    args = parser.parse_args(input_args)
    common.validate_common_args(args)
    if not 1 <= args.draft_k <= args.num_inference_steps:
        raise ValueError(f"--draft_k {args.draft_k} must lie in [1, --num_inference_steps = {args.num_inference_steps}]")
    if args.draft_lv and args.draft_k != 1:
        raise ValueError("--draft_lv is DRaFT with K = 1; drop --draft_k or --draft_lv")
    if args.lv_samples < 1:
        raise ValueError(f"--lv_samples must be at least 1, got {args.lv_samples}")
    return args


def draft_k_sample(velocity_fn, x, sigmas, k, checkpoint=True):
    """DRaFT-K's differentiable part: from x, the no-grad rollout's state at sigmas[-k-1], the last k
    sampler steps with gradient (each recomputed in the backward pass when k > 1)."""
    return ode_sample(velocity_fn, x, sigmas[len(sigmas) - k - 1 :], checkpoint=checkpoint and k > 1)


def draft_lv_samples(velocity_fn, x0, sigma_last, noises):
    """DRaFT-LV: the final image re-noised with each fresh noise to sigma_last, then one
    denoising step with gradient straight to sigma = 0."""
    return [ode_sample(velocity_fn, inject_noise(x0.detach().float(), eps, sigma_last), [sigma_last, 0.0]) for eps in noises]


def training_step(run, step, logs):
    """One optimiser step of DRaFT-K or DRaFT-LV."""
    args, accelerator = run.args, run.accelerator
    sigmas = run.rollout_sigmas
    for micro in range(args.gradient_accumulation_steps):
        micro_step = step * args.gradient_accumulation_steps + micro
        generator = step_generator(args.seed, micro_step, accelerator.process_index)
        prompts = run.batches.batch(micro_step)
        # The steps without gradient go through the trainers' rollout (LoRA merged into the weights,
        # --rollout_attention_backend, --batch_rollout_modulations): to sigmas[-2] for DRaFT-LV,
        # to sigmas[-k-1] for DRaFT-K.
        stop = len(sigmas) - 2 if args.draft_lv else len(sigmas) - 1 - args.draft_k
        x_stop, _, cond = run.rollout(prompts, generator, stop_index=stop, micro_step=micro_step)
        velocity_fn = run.velocity_fn(cond, args.rollout_guidance)
        last_micro = micro == args.gradient_accumulation_steps - 1
        if args.draft_lv:
            # The final image, without gradient; its last step is redone with gradient if counted.
            x_last = x_stop
            with torch.no_grad():
                x0 = ode_sample(velocity_fn, x_last, sigmas[-2:])
            noises = [host_to_device(torch.randn(x0.shape, generator=generator), x0.device) for _ in range(args.lv_samples)]
            terms = [lambda eps=eps: draft_lv_samples(velocity_fn, x0, float(sigmas[-2]), [eps])[0] for eps in noises]
            if args.lv_include_base:
                terms.append(lambda: ode_sample(velocity_fn, x_last, sigmas[-2:]))
        else:
            terms = [lambda: draft_k_sample(velocity_fn, x_stop, sigmas, args.draft_k)]  # steps checkpointed when K > 1
        # One backward per term keeps one graph in memory at a time; the gradient is the
        # same as the mean loss over the terms.
        for i, term in enumerate(terms):
            with run.sync_gradients(last_micro and i == len(terms) - 1):
                reward, components = run.reward(run.decode(term()), prompts)
                loss = training.reward_loss(reward, args).mean()
                accelerator.backward(loss / (len(terms) * args.gradient_accumulation_steps))
            training.log_reward_terms(logs, loss, reward, components)


def main(args):
    method = "draft-lv" if args.draft_lv else f"draft-k{args.draft_k}"
    run = training.setup(args, method)  # accelerator, prompts, rewards, FLUX with LoRA, optimizer, resume: flux_rl/training.py
    with preemption.StopRequest().listening() as stop:  # SIGTERM, SIGUSR1, Ctrl-C: finish the step, checkpoint, exit
        if run.start_step == 0:
            run.validate(0)  # the untrained model's images, which every later validation is compared with
        for step in run.steps():  # the optimiser steps still to run (a resumed run goes on), with a progress bar
            logs = defaultdict(list)
            training_step(run, step, logs)  # rollouts, the last K steps (or LV's re-noised copies) with gradient, backward (above)
            grad_norm, skipped = run.optimizer_step()  # clip to --max_grad_norm, step unless the gradient is not finite, zero
            run.log(step, {**training.means(logs), "grad_norm": grad_norm, "update_skipped": skipped})  # averaged over processes
            run.end_of_step(step, stop)  # checkpoint and validation when due; a stop signal: checkpoint and exit
        training.finish(run)  # final validation, weights in diffusers format, model card, Hub push


if __name__ == "__main__":
    common.run_cli(parse_args, main)
