"""--lora_dropout: active in the steps that carry gradient (and the same in gradient
checkpointing's recompute), off in the rollout, which samples with the model as it is."""

from collections import defaultdict

import pytest
import torch
from peft.tuners.lora import LoraLayer

import train_srpo_flux
from benchmarks import benchmark_trainers
from flux_rl import models


def build(checkpointing, dropout="0.5"):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)  # one AcceleratorState per process: as the other tests
    torch.manual_seed(0)  # the same LoRA initialisation in every run built here
    run = benchmark_trainers.build_run(train_srpo_flux, ["--lora_dropout", dropout, "--no_merge_lora_in_rollout"], "tiny", "lora",
                                       64, 3, False, torch.device("cpu"), accelerator, checkpointing=checkpointing)
    with torch.no_grad():
        for name, parameter in run.transformer.named_parameters():
            if "lora_B" in name:  # gaussian init leaves B at 0: the adapters would change nothing
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))))
    return run


def gradient(run, seed):
    torch.manual_seed(seed)  # dropout draws from the global generator
    run.optimizer.zero_grad(set_to_none=True)
    train_srpo_flux.training_step(run, 0, defaultdict(list))
    return torch.cat([p.grad.flatten() for p in models.trainable_parameters(run.transformer)])


def test_dropout_in_gradient_steps_only(tmp_path):
    run = build(checkpointing=True)
    dropout = next(m for m in run.transformer.modules() if isinstance(m, LoraLayer)).lora_dropout["default"]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.5
    seen = []  # (grad enabled, dropout active) at each adapter call
    dropout.register_forward_pre_hook(lambda module, args: seen.append((torch.is_grad_enabled(), module.training)))
    gradient(run, seed=1)
    assert {(False, False), (True, True)} == set(seen)
    prompts, generator = ["a cat"], lambda: torch.Generator().manual_seed(3)
    first, second = run.rollout(prompts, generator())[0], run.rollout(prompts, generator())[0]
    assert torch.equal(first, second), "the rollout must not drop adapter inputs"
    assert run.transformer.training, "training mode back after the rollout"
    seen.clear()
    run.args.validation_prompt, run.args.output_dir = ["a cat"], str(tmp_path)
    run.validate(1)
    assert seen and set(seen) == {(False, False)}, "validation renders without dropout"
    assert run.transformer.training


def test_checkpointing_recomputes_with_the_same_dropout_mask():
    """Gradient checkpointing replays the RNG in its recompute: the gradient is the one without
    checkpointing. Another seed draws other masks: the dropout is really applied."""
    checkpointed, plain = gradient(build(checkpointing=True), seed=1), gradient(build(checkpointing=False), seed=1)
    assert torch.allclose(checkpointed, plain, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(gradient(build(checkpointing=False), seed=2), plain, rtol=1e-2)


def test_lora_dropout_flag_checks():
    with pytest.raises(ValueError, match="--lora_dropout must be in"):
        train_srpo_flux.parse_args(["--pretrained_model_name_or_path", "x", "--lora_dropout", "1"])
    with pytest.raises(ValueError, match="--lora_dropout is for LoRA training"):
        train_srpo_flux.parse_args(["--pretrained_model_name_or_path", "x", "--lora_dropout", "0.1", "--full_finetune"])


@pytest.mark.parametrize("dropout, training", [("0.5", True), ("0", False)])
def test_trainers_switch_to_training_mode_for_dropout(tiny_flux, dropout, training):
    """from_pretrained returns the model in eval mode, where peft's dropout does nothing."""
    import os

    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    assert not transformer.training
    args = train_srpo_flux.parse_args(["--pretrained_model_name_or_path", "x", "--lora_dropout", dropout])
    assert models.prepare_for_training(transformer, args).training == training
