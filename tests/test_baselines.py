"""ReFL and DRaFT: the truncation is real, DRaFT-LV's samples each contribute, and both scripts
run end to end through `accelerate launch`."""

import os
from collections import defaultdict

import pytest
import torch

import train_draft_baseline as draft
import train_refl_baseline as refl
from flux_rl import models
from flux_rl.direct_align import inject_noise
from flux_rl.schedules import fixed_shift_sigmas
from tests.launch import launch, tiny_args
from tests.tensorboard_logs import scalar_tags

SIGMAS = fixed_shift_sigmas(6, 3.0)


def per_step_model(sigmas):
    """A velocity model with one parameter per sampler step, so gradients show which steps were in the graph."""
    theta = torch.full((len(sigmas) - 1,), 0.3, requires_grad=True)
    step_of = {float(s): i for i, s in enumerate(sigmas[:-1])}
    return theta, lambda x, sigma: theta[step_of[float(sigma)]] * x + 0.1


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_draft_k_truncates_the_gradient(k, checkpoint):
    """DRaFT-K's differentiable part is the last K steps, from the rollout's state at sigmas[-K-1]."""
    theta, velocity_fn = per_step_model(SIGMAS)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    draft.draft_k_sample(velocity_fn, x, SIGMAS, k, checkpoint=checkpoint).pow(2).sum().backward()
    steps = len(SIGMAS) - 1
    assert torch.all(theta.grad[: steps - k] == 0), "earlier steps must get no gradient"
    assert torch.all(theta.grad[steps - k :] != 0), "the last K steps must get gradient"


def test_draft_k_checkpointing_gives_the_same_gradient():
    grads = []
    for checkpoint in (False, True):
        theta, velocity_fn = per_step_model(SIGMAS)
        noise = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
        draft.draft_k_sample(velocity_fn, noise, SIGMAS, 3, checkpoint=checkpoint).pow(2).sum().backward()
        grads.append(theta.grad)
    assert torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("flags, no_grad_merged, grad_calls", [
    (["--draft_k", "2"], [True, True], 2 + 2),  # 2 rollout steps, then 2 with gradient, each recomputed in the backward
    (["--draft_k", "4"], [], 4 + 4),  # every step with gradient: the rollout returns the noise
    (["--draft_lv"], [True, True, True, False], 2),  # 3 rollout steps + the last one; 2 re-noised samples
])
def test_draft_steps_without_gradient_go_through_the_rollout(tiny_models, flags, no_grad_merged, grad_calls):
    """DRaFT's steps without gradient are the trainers' rollout (LoRA merged into the weights, as SRPO's),
    the rest carry gradient; 4 sampler steps."""
    from accelerate import Accelerator
    from peft.tuners.lora import LoraLayer

    from benchmarks import benchmark_trainers

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)  # one AcceleratorState per process: as the other tests
    # merged as the default is for adapters on the attention projections (the default layers roll out through peft's adapters)
    run = benchmark_trainers.build_run(draft, flags + ["--merge_lora_in_rollout"], "tiny", "lora", 64, 4, False, torch.device("cpu"),
                                       accelerator)
    lora_layer = next(m for m in run.transformer.modules() if isinstance(m, LoraLayer))
    calls = []  # (grad enabled, LoRA merged) per transformer call
    run.transformer.register_forward_pre_hook(lambda module, args: calls.append((torch.is_grad_enabled(), lora_layer.merged)))
    draft.training_step(run, 0, defaultdict(list))
    assert [merged for grad, merged in calls if not grad] == no_grad_merged
    assert sum(grad for grad, _ in calls) == grad_calls
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.trainable_parameters(run.transformer))


def test_draft_lv_each_sample_contributes():
    theta, velocity_fn = per_step_model(SIGMAS)
    x0 = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    sigma_last = float(SIGMAS[-2])
    noises = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    samples = draft.draft_lv_samples(velocity_fn, x0, sigma_last, noises)
    assert len(samples) == 3
    for sample, eps in zip(samples, noises):
        x = inject_noise(x0, eps, sigma_last)
        assert torch.allclose(sample, x - sigma_last * (theta[-1] * x + 0.1))  # one step from sigma_last to 0
    grads = []
    for sample in samples:
        (g,) = torch.autograd.grad(sample.pow(2).sum(), theta, retain_graph=True)
        assert g[-1] != 0 and torch.all(g[:-1] == 0)
        grads.append(g[-1])
    assert len(set(round(float(g), 6) for g in grads)) == 3, "each fresh noise gives its own gradient"


def test_refl_recovers_x0_with_true_velocity_and_default_range():
    x0, noise = torch.randn(2, 8), torch.randn(2, 8)
    x_t = inject_noise(x0, noise, 0.4)
    assert torch.allclose(refl.refl_predict_x0(x_t, 0.4, lambda x, s: noise - x0), x0, atol=1e-6)
    args = refl.parse_args(["--pretrained_model_name_or_path", "x", "--num_inference_steps", "40"])
    assert refl.grad_step_range(args) == (30, 39)  # ImageReward's t in [30, 39] of 40
    args = refl.parse_args(["--pretrained_model_name_or_path", "x"])
    assert refl.grad_step_range(args) == (18, 24)


@pytest.mark.parametrize(
    "module, extra, message",
    [
        (refl, ["--grad_step_range", "20,30"], "--grad_step_range 20,30"),
        (draft, ["--draft_k", "0"], "--draft_k 0"),
        (draft, ["--draft_lv", "--draft_k", "2"], "drop --draft_k or --draft_lv"),
        (draft, ["--lv_samples", "0"], "--lv_samples"),
    ],
)
def test_bad_baseline_flags(module, extra, message):
    with pytest.raises(ValueError, match=message):
        module.parse_args(["--pretrained_model_name_or_path", "x"] + extra)


@pytest.mark.parametrize(
    "script, extra",
    [
        ("train_refl_baseline.py", ["--train_batch_size", "2", "--offload_text_encoders", "--text_cache_size", "1"]),
        ("train_draft_baseline.py", ["--draft_k", "2"]),
        ("train_draft_baseline.py", ["--draft_lv", "--lv_samples", "2", "--lv_include_base", "--full_finetune"]),
    ],
)
def test_baselines_end_to_end(tiny_models, tmp_path, script, extra):
    output_dir = str(tmp_path / "run")
    launch(script, tiny_args(tiny_models, output_dir, "--max_train_steps", "2", "--rank", "4", *extra))
    tags = scalar_tags(output_dir)
    assert len(tags["loss"]) == 2 and "reward/hpsv2" in tags and all(g > 0 for g in tags["grad_norm"])
    final = "transformer" if "--full_finetune" in extra else "pytorch_lora_weights.safetensors"
    assert os.path.exists(os.path.join(output_dir, final))
