"""Qwen-Image (flux_rl/families/qwen_image.py) on its tiny model: the rollout and decode equal
QwenImagePipeline's for the same seed and schedule (with and without true CFG), every trainer runs
end to end, the LoRA file loads with QwenImagePipeline.load_lora_weights and renders the trainer's
own validation images, a full fine-tune saves a transformer folder the pipeline loads, and training
raises the reward on held-out prompts and seeds."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.learning_curves import BRIGHTNESS, LORA, LearningRun, heldout_images, measure, train
from flux_rl import families, heldout, latents, schedules, validation
from flux_rl.families import qwen_image

PROMPTS = ["a photo of a cat", "a red car on a long road"]


@pytest.fixture(scope="module")
def tiny_qwen(tiny_models):
    return os.path.join(tiny_models, "qwen-image")


@pytest.fixture(scope="module")
def pipe(tiny_qwen):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_qwen)


def test_the_tokenizer_drops_exactly_the_template_head(pipe):
    """QwenImagePipeline drops the first 34 token states of its template: the tiny tokenizer's head is
    34 tokens, as Qwen2.5-VL's, so the prompt's own tokens are what remains."""
    head = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(head, add_special_tokens=False).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert families.family_of(pipe) is qwen_image


@pytest.mark.parametrize("true_cfg", [1.0, 3.0])
def test_rollout_and_decode_equal_the_pipeline(pipe, true_cfg):
    """Our sampler (flux.sample with the family's velocity, diffusers' dynamic schedule for this image size)
    and decode against QwenImagePipeline's own latents and images, same seed; true CFG against " "."""
    from flux_rl import flux

    height, width, steps = 32, 48, 3
    encoder = qwen_image.prompt_encoder(pipe, 512, "cpu", 64, False)
    cond = encoder(PROMPTS)
    assert cond.mask is not None and cond.mask.sum(1).tolist()[0] < cond.mask.shape[1]  # prompts of two lengths
    shape = latents.latent_shape(pipe.vae_scale_factor, pipe.transformer.config.in_channels // 4, height, width)
    noise = latents.pack(torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)))
    image_seq_len = (height // (pipe.vae_scale_factor * 2)) * (width // (pipe.vae_scale_factor * 2))
    sigmas = schedules.rollout_sigmas(steps, image_seq_len, pipe.scheduler.config, None)
    positions = qwen_image.positions(height, width, pipe.vae_scale_factor)
    ours = flux.sample(pipe.transformer, noise, sigmas, true_cfg, cond, positions, velocity=qwen_image.velocity)
    call = dict(prompt=PROMPTS, height=height, width=width, num_inference_steps=steps, true_cfg_scale=true_cfg,
                negative_prompt=[qwen_image.NEGATIVE_PROMPT] * 2 if true_cfg > 1 else None)
    reference = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours, noise)
    images = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose(qwen_image.decode(pipe.vae, ours, height, width, pipe.vae_scale_factor), images, atol=1e-5)


def test_encode_then_decode_round_trips_the_latents(pipe):
    """Offline SRPO's encode: normalised with the VAE's latent mean and std (not 0 / 1 in the tiny VAE),
    so that decode(encode(decode(z))) comes back to the same image closely."""
    z = latents.pack(torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)))
    image = qwen_image.decode(pipe.vae, z, 32, 32, pipe.vae_scale_factor)
    again = qwen_image.encode(pipe.vae, image)
    assert again.shape == z.shape
    mean = torch.tensor(pipe.vae.config.latents_mean)
    raw = pipe.vae.encode((image * 2 - 1)[:, :, None]).latent_dist.mode()[:, :, 0]
    assert torch.allclose(latents.pack((raw - mean.view(1, 4, 1, 1)) / torch.tensor(pipe.vae.config.latents_std).view(1, 4, 1, 1)), again)


def qwen_flags(tiny_qwen, *flags):
    return ("--pretrained_model_name_or_path", tiny_qwen, "--max_sequence_length", "512", *flags)


@pytest.mark.parametrize("script, flags", [
    ("train_srpo_flux", ("--reward", "toy_colour:1.0", "--wanted_controls", "red", "--unwanted_controls", "blue")),
    ("train_direct_align", ("--reward", "hpsv2:1.0", "--rollout_guidance", "2.0")),  # true CFG in the rollout
    ("train_refl_baseline", BRIGHTNESS),
    ("train_draft_baseline", (*BRIGHTNESS, "--draft_lv")),
])
def test_every_trainer_runs_on_qwen_image(tiny_qwen, tmp_path, script, flags):
    output_dir = train(LearningRun(script, qwen_flags(tiny_qwen, *flags), "brightness", 1), os.path.dirname(tiny_qwen),
                       str(tmp_path / script), steps=2)
    assert os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    assert "QwenImagePipeline" in open(os.path.join(output_dir, "README.md")).read()


@pytest.fixture(scope="module")
def lora_output(tiny_qwen, tmp_path_factory):
    """A 3-step Direct-Align LoRA run on Qwen-Image with validation images."""
    return train(LearningRun("train_direct_align", qwen_flags(tiny_qwen, *BRIGHTNESS, *LORA, "--validation_prompt",
                                                               "a photo of a cat", "--validation_guidance", "1.0"),
                             "brightness", 1), os.path.dirname(tiny_qwen), str(tmp_path_factory.mktemp("qwen") / "lora"), steps=3)


def test_the_lora_loads_in_the_pipeline_and_renders_the_trainers_images(pipe, lora_output):
    """QwenImagePipeline.load_lora_weights reads the trainer's file; the same seed then renders the final
    validation image the trainer saved (to its PNG's uint8 rounding)."""
    output_dir = lora_output
    saved = sorted(os.listdir(os.path.join(output_dir, "validation")))[-1]
    expected = torch.from_numpy(np.array(Image.open(os.path.join(output_dir, "validation", saved)))).permute(2, 0, 1) / 255.0
    base = validation.render(pipe.transformer, pipe.vae, qwen_image.prompt_encoder(pipe, 512, "cpu", 64, False),
                             ["a photo of a cat"], 0, 64, 64, schedules.fixed_shift_sigmas(3, 3.0), 1.0, pipe.vae_scale_factor,
                             "cpu", torch.float32, family=qwen_image)
    pipe.load_lora_weights(output_dir)
    try:
        trained = validation.render(pipe.transformer, pipe.vae, qwen_image.prompt_encoder(pipe, 512, "cpu", 64, False),
                                    ["a photo of a cat"], 0, 64, 64, schedules.fixed_shift_sigmas(3, 3.0), 1.0,
                                    pipe.vae_scale_factor, "cpu", torch.float32, family=qwen_image)
    finally:
        pipe.unload_lora_weights()
    # The grid's tile carries its score as a caption in the top-left corner: compare below it.
    assert (trained[0, :, 16:] - expected[:, 16:64]).abs().max() <= 2 / 255
    assert (base[0, :, 16:] - expected[:, 16:64]).abs().max() > 2 / 255  # the LoRA changed the image


def test_a_full_fine_tune_saves_a_transformer_the_pipeline_loads(tiny_qwen, tmp_path):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    output_dir = train(LearningRun("train_direct_align", qwen_flags(tiny_qwen, *BRIGHTNESS, "--full_finetune",
                                                                      "--learning_rate", "1e-3"), "brightness", 1),
                       os.path.dirname(tiny_qwen), str(tmp_path / "full"), steps=1)
    transformer = QwenImageTransformer2DModel.from_pretrained(os.path.join(output_dir, "transformer"))
    loaded = QwenImagePipeline.from_pretrained(tiny_qwen, transformer=transformer)
    base = QwenImageTransformer2DModel.from_pretrained(os.path.join(tiny_qwen, "transformer"))
    changed = [name for name, p in transformer.named_parameters() if not torch.equal(p, base.get_parameter(name))]
    assert changed and loaded.transformer is transformer


def test_training_raises_the_heldout_reward_on_qwen_image(tiny_qwen, pipe, tmp_path):
    """Direct-Align LoRA on the brightness reward, 30 steps: held-out prompts and seeds, judged as the FLUX
    learning tests are (tests/test_learning.py), in standard errors of the paired difference."""
    output_dir = train(LearningRun("train_direct_align", qwen_flags(tiny_qwen, *BRIGHTNESS, *LORA), "brightness", 1),
                       os.path.dirname(tiny_qwen), str(tmp_path / "learn"), steps=30)
    before, after = measure(heldout_images(pipe, None), "brightness"), measure(heldout_images(pipe, output_dir), "brightness")
    gain, standard_error, z = heldout.paired_gain(before, after)
    assert z >= 5, f"held-out brightness moved by {gain:+.5f} ({z:+.1f} standard errors)"


def test_evaluate_renders_qwen_image_through_its_pipeline(tiny_models, tiny_qwen, lora_output, tmp_path):
    """evaluate_flux.py on a Qwen-Image base and a LoRA of it: the pipeline's own call with true CFG (2.0 against
    " "), scored; the LoRA's images differ from the base's."""
    import csv
    import json

    import evaluate_flux
    from flux_rl import evaluation

    benchmark = tmp_path / "benchmark"
    benchmark.mkdir()
    for style in evaluation.HPDV2_STYLES:
        (benchmark / f"{style}.json").write_text(json.dumps([f"{style} of a cat"]))
    output_dir = str(tmp_path / "eval")
    flags = ["--pretrained_model_name_or_path", tiny_qwen, "--hpdv2_benchmark_dir", str(benchmark), "--prompts_per_style", "1",
             "--models", f"lora={lora_output}", "--output_dir", output_dir, "--resolution", "32", "--num_inference_steps", "2",
             "--guidance_scale", "2.0", "--metrics", "toy_brightness"]
    try:
        evaluate_flux.main(evaluate_flux.parse_args(flags))
    finally:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    rows = list(csv.DictReader(open(os.path.join(output_dir, "scores.csv"))))
    assert len(rows) == 8 and {r["model"] for r in rows} == {"base", "lora"}
    by_model = {m: [float(r["toy_brightness"]) for r in rows if r["model"] == m] for m in ("base", "lora")}
    assert by_model["base"] != by_model["lora"]
