"""SRPO's options around the method, run in this process on the tiny models: validation settings,
--match_release, the widest LoRA preset."""

import types

import pytest
import torch

from benchmarks.learning_curves import COLOUR, LearningRun, train


def srpo_run(*flags):
    return LearningRun("train_srpo_flux", (*COLOUR, "--rank", "4", "--lora_alpha", "4", *flags), "red_minus_blue", 1)


def test_validation_renders_at_its_own_guidance_and_steps(tiny_models, tmp_path, monkeypatch):
    """Validation images as users render them (guidance 3.5 by default, not the rollout's 1 under the HPS preset),
    with their own number of steps."""
    from flux_rl import validation

    seen, original = [], validation.render

    def recording_render(*args, **kwargs):
        seen.append((len(args[7]) - 1, args[8]))  # (steps, guidance)
        return original(*args, **kwargs)

    monkeypatch.setattr(validation, "render", recording_render)
    train(srpo_run("--validation_prompt", "a cat", "--validation_inference_steps", "5"), tiny_models, str(tmp_path / "a"), steps=1)
    assert seen == [(5, 3.5), (5, 3.5)]  # before the first step and at the end
    seen.clear()
    train(srpo_run("--validation_prompt", "a cat", "--validation_guidance", "2"), tiny_models, str(tmp_path / "b"), steps=1)
    assert seen == [(3, 2.0), (3, 2.0)]  # default: --num_inference_steps (3 in these runs)


def test_match_release_truncates_the_model_timestep_and_keeps_the_overshoot(tiny_models, tmp_path, monkeypatch):
    """The release gives the transformer int(sigma * 1000) / 1000 and passes bicubic's overshoot to the reward;
    without the switch the model gets the exact sigma and the resized image is clamped, and the switch is
    process-wide only for its own run."""
    from diffusers import FluxTransformer2DModel

    from rewards import preprocess

    timesteps, clamps, original_forward = [], [], FluxTransformer2DModel.forward

    def recording_forward(self, *args, **kwargs):
        timesteps.extend(kwargs["timestep"].flatten().tolist())
        clamps.append(preprocess._clamp_after_resize)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", recording_forward)
    train(srpo_run("--match_release", "--no_batch_rollout_modulations"), tiny_models, str(tmp_path / "release"), steps=2)
    assert timesteps and all(abs(t * 1000 - round(t * 1000)) < 1e-3 for t in timesteps) and not any(clamps)
    timesteps.clear(), clamps.clear()
    train(srpo_run("--no_batch_rollout_modulations"), tiny_models, str(tmp_path / "ours"), steps=2)
    assert any(abs(t * 1000 - round(t * 1000)) > 1e-2 for t in timesteps) and all(clamps)


@pytest.mark.parametrize("match_release", [False, True])
def test_match_release_shares_the_initial_noise_across_processes(match_release):
    """The release broadcasts one initial noise to every rank; ours draws each process its own."""
    from flux_rl import training
    from flux_rl.data import step_generator

    drawn = []
    run = types.SimpleNamespace(
        args=types.SimpleNamespace(seed=7, match_release=match_release), image_dataset=None,
        batches=types.SimpleNamespace(batch=lambda micro_step: ["a cat"]),
        rollout=lambda prompts, generator, micro_step: drawn.append(torch.randn(3, generator=generator)) or (None, None, None),
    )
    for process_index in (0, 1):
        training.Run.next_batch(run, 4, step_generator(7, 4, process_index))
    assert torch.equal(drawn[0], drawn[1]) == match_release


def test_every_linear_layer_trains_with_the_speed_defaults(tiny_models, tmp_path):
    """--lora_layers all-linear adapts the modulation layers too, which the rollout tabulates once per schedule
    (--batch_rollout_modulations) with the adapters merged: a run trains and saves them."""
    from safetensors.torch import load_file

    output = train(srpo_run("--lora_layers", "all-linear"), tiny_models, str(tmp_path / "all"), steps=2)
    saved = load_file(f"{output}/pytorch_lora_weights.safetensors")
    assert any("norm1.linear" in key for key in saved) and any("x_embedder" in key for key in saved)
