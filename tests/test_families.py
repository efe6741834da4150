"""The model families beside FLUX.1 (flux_rl/families: Qwen-Image, FLUX.2 [klein]) on their tiny models:
the rollout and decode equal the family's own pipeline's for the same seed and schedule (with and
without classifier-free guidance), every trainer runs end to end, the LoRA file loads with the
pipeline's load_lora_weights and renders the trainer's own validation images, a full fine-tune saves
a transformer folder the pipeline loads, training raises the reward on held-out prompts and seeds,
and evaluate_flux.py renders through the pipeline."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.learning_curves import BRIGHTNESS, LORA, LearningRun, heldout_images, measure, train
from flux_rl import families, heldout, latents, schedules, validation
from flux_rl.families import flux2_klein, qwen_image, sd3, zimage
from tests.conftest import made_once

PROMPTS = ["a photo of a cat", "a red car on a long road"]
# The tiny models' folders (flux_rl/tiny_models.py) and their text length: Qwen-Image keeps each prompt's own
# length (masked), FLUX.2 pads every prompt to --max_sequence_length.
FAMILIES = {"qwen-image": (qwen_image, "512"), "flux2-klein": (flux2_klein, "32"), "sd3": (sd3, "32"), "zimage": (zimage, "64")}


@pytest.fixture(scope="module")
def pipes(tiny_models):
    from diffusers import DiffusionPipeline

    return {name: DiffusionPipeline.from_pretrained(os.path.join(tiny_models, name)) for name in FAMILIES}


def family_flags(tiny_models, name, *flags):
    return ("--pretrained_model_name_or_path", os.path.join(tiny_models, name), "--max_sequence_length", FAMILIES[name][1], *flags)


def reset_accelerate():
    """accelerate keeps one state per process: the next in-process run starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_klein_default_lora_adapts_every_linear_layer_of_its_blocks(tiny_models):
    """FLUX.2's single blocks' output projection (attn.to_out, a Linear) shares its suffix with the double blocks'
    attn.to_out (a ModuleList, which peft refuses): the preset names it with a wildcard index, given to peft as full
    names. Every Linear inside the blocks is adapted (FLUX.2's modulations sit outside them); nothing else."""
    from diffusers import Flux2Transformer2DModel

    from flux_rl import models

    assert models.names_target("single_transformer_blocks.11.attn.to_out", "single_transformer_blocks.*.attn.to_out")
    assert not models.names_target("transformer_blocks.1.attn.to_out", "single_transformer_blocks.*.attn.to_out")
    assert not models.names_target("single_transformer_blocks.1.attn.to_out.0", "single_transformer_blocks.*.attn.to_out")
    assert not models.names_target("single_transformer_blocks.1.2.attn.to_out", "single_transformer_blocks.*.attn.to_out")
    assert models.names_target("transformer_blocks.1.attn.to_out.0", "to_out.0")
    assert not models.names_target("transformer_blocks.1.attn.add_to_out.0", "to_out.0")

    transformer = Flux2Transformer2DModel.from_pretrained(os.path.join(tiny_models, "flux2-klein", "transformer"),
                                                          num_single_layers=3)  # more than one index to match
    targets = models.lora_targets(None, flux2_klein.LORA_PRESETS)
    models.check_lora_targets_in(transformer, targets)
    block_layers = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)
                    and name.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    models.add_lora(transformer, 4, 4, targets)
    adapted = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    assert adapted == block_layers
    assert {f"single_transformer_blocks.{i}.attn.to_out" for i in range(3)} <= adapted


def test_the_qwen_tokenizer_drops_exactly_the_template_head(pipes):
    """QwenImagePipeline drops the first 34 token states of its template: the tiny tokenizer's head is
    34 tokens, as Qwen2.5-VL's, so the prompt's own tokens are what remains."""
    pipe = pipes["qwen-image"]
    head = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(head, add_special_tokens=False).input_ids) == pipe.prompt_template_encode_start_idx == 34


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_rollout_and_decode_equal_the_pipeline(pipes, name, guidance):
    """Our sampler (flux.sample with the family's velocity and noise, diffusers' dynamic schedule for this
    image size with the family's shift) and decode against the pipeline's own images, same seed (and
    Qwen-Image's latents, which it returns packed); guidance 3 is classifier-free (Qwen-Image's against " ",
    rescaled; FLUX.2's against "")."""
    from flux_rl import flux

    family, max_length = FAMILIES[name]
    pipe = pipes[name]
    assert families.family_of(pipe) is family
    height, width, steps = 32, 48, 3
    cond = family.prompt_encoder(pipe, int(max_length), "cpu", 64, False)(PROMPTS)
    noise = family.initial_noise(2, pipe.transformer.config.in_channels, height, width, pipe.vae_scale_factor,
                                 torch.Generator().manual_seed(0))
    image_seq_len = (height // (pipe.vae_scale_factor * 2)) * (width // (pipe.vae_scale_factor * 2))
    sigmas = schedules.rollout_sigmas(steps, image_seq_len, pipe.scheduler.config, None, family.dynamic_mu)
    positions = family.positions(height, width, pipe.vae_scale_factor, "cpu")
    ours = flux.sample(pipe.transformer, noise, sigmas, guidance, cond, positions, velocity=family.velocity)
    assert not torch.allclose(ours, noise)
    # The sigmas the FLUX-like pipelines use by default; SD3's would start from its scheduler's own range otherwise.
    call = dict(prompt=list(PROMPTS), height=height, width=width, num_inference_steps=steps, max_sequence_length=int(max_length),
                sigmas=list(np.linspace(1.0, 1 / steps, steps)), **family.pipeline_guidance(guidance, 2))
    if name != "flux2-klein":  # FLUX.2's "latent" output is already unpacked and denormalised: the images say it
        reference = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").images
        call["prompt"] = list(PROMPTS)  # ZImagePipeline writes its chat template into the caller's prompt list
        assert torch.allclose(ours, reference, atol=1e-5)
    if name == "qwen-image":
        assert cond.mask is not None and cond.mask.sum(1).tolist()[0] < cond.mask.shape[1]  # prompts of two lengths
    images = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose(family.decode(pipe.vae, ours, height, width, pipe.vae_scale_factor), images, atol=1e-5)


def test_qwen_encode_uses_the_latent_mean_and_std(pipes):
    """Offline SRPO's encode for Qwen-Image: one frame of the video VAE, normalised with the VAE's latent mean
    and std (not 0 / 1 in the tiny VAE), packed."""
    pipe = pipes["qwen-image"]
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    raw = pipe.vae.encode((image * 2 - 1)[:, :, None]).latent_dist.mode()[:, :, 0]
    mean, std = (torch.tensor(pipe.vae.config[key]).view(1, 4, 1, 1) for key in ("latents_mean", "latents_std"))
    assert torch.allclose(qwen_image.encode(pipe.vae, image), latents.pack((raw - mean) / std), atol=1e-6)


def test_klein_encode_uses_the_batch_norm_statistics(pipes):
    """FLUX.2's latents are patchified, then normalised by the VAE's BatchNorm running statistics (not 0 / 1
    in the tiny VAE) and packed channel-last."""
    pipe = pipes["flux2-klein"]
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    raw = pipe._patchify_latents(pipe.vae.encode(images * 2 - 1).latent_dist.mode())
    bn = pipe.vae.bn
    expected = (raw - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    assert torch.allclose(flux2_klein.encode(pipe.vae, images), expected.flatten(2).permute(0, 2, 1), atol=1e-6)


TRAINERS = [
    ("train_srpo_flux", ("--reward", "toy_colour:1.0", "--wanted_controls", "red", "--unwanted_controls", "blue")),
    ("train_direct_align", ("--reward", "hpsv2:1.0", "--rollout_guidance", "2.0")),  # classifier-free guidance in the rollout
    ("train_refl_baseline", BRIGHTNESS),
    ("train_draft_baseline", (*BRIGHTNESS, "--draft_lv")),
]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_4bit_base_keeps_the_velocity_and_trains_the_adapters(pipes, name):
    """--quantize_base nf4 on the family: each of its blocks' linear layers in NF4 (tests/test_quantize_base.py for
    FLUX.1) dequantizes to within NF4's rounding (about 9% relative for these uniformly initialised weights), the
    velocity moves by what that much weight noise gives (10% for the tiny Z-Image, 1-4% for the others), and the
    gradient of a LoRA on top reaches the adapters it reaches on the full-precision model."""
    import copy

    import bitsandbytes as bnb

    from flux_rl import models, quantization

    family, max_length = FAMILIES[name]
    pipe = pipes[name]
    cond = family.prompt_encoder(pipe, int(max_length), "cpu", 64, False)(PROMPTS[:1])
    x = family.initial_noise(1, pipe.transformer.config.in_channels, 32, 32, pipe.vae_scale_factor, torch.Generator().manual_seed(0))
    positions = family.positions(32, 32, pipe.vae_scale_factor, "cpu")
    transformer = copy.deepcopy(pipe.transformer)
    assert quantization.quantize_blocks_nf4(transformer, "cpu", torch.float32) > 0
    pairs = [(a, b) for a, b in zip(pipe.transformer.modules(), transformer.modules()) if isinstance(b, bnb.nn.Linear4bit)]
    for original, layer in pairs:
        restored = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert (restored - original.weight).norm() / original.weight.norm() < 0.12
    with torch.no_grad():
        reference = family.velocity(pipe.transformer, x, 0.6, 1.0, cond, positions)
        quantized = family.velocity(transformer, x, 0.6, 1.0, cond, positions)
    assert 0 < (quantized - reference).norm() / reference.norm() < 0.15
    models.add_lora(transformer, 4, 4, models.lora_targets(None, family.LORA_PRESETS))
    with torch.no_grad():
        for parameter_name, parameter in transformer.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.01)
    family.velocity(transformer, x, 0.6, 1.0, cond, positions).square().mean().backward()
    # (the last block's text-stream outputs of SD3 and Qwen-Image feed nothing: their adapters get no gradient either way)
    plain = models.add_lora(copy.deepcopy(pipe.transformer), 4, 4, models.lora_targets(None, family.LORA_PRESETS))
    plain.load_state_dict({k: v for k, v in transformer.state_dict().items() if ".lora_" in k}, strict=False)  # same adapters
    family.velocity(plain, x, 0.6, 1.0, cond, positions).square().mean().backward()

    def reached(model):
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]

    assert reached(transformer) == reached(plain) and len(reached(plain)) > 0.8 * len(models.trainable_parameters(plain))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_trainer_runs_on_the_family(tiny_models, tmp_path, name):
    """The four trainers, 2 steps each, in this process one after another."""
    pipeline_class = FAMILIES[name][0].PIPELINE
    for script, flags in TRAINERS:
        output_dir = train(LearningRun(script, family_flags(tiny_models, name, *flags), "brightness", 1), tiny_models,
                           str(tmp_path / script), steps=2)
        assert os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors")), script
        assert f"pipe = {pipeline_class}.from_pretrained(" in open(os.path.join(output_dir, "README.md")).read(), script


@pytest.fixture(scope="module", params=list(FAMILIES))
def lora_run(request, tiny_models, tmp_path_factory):
    """(family name, output folder) of a 3-step Direct-Align LoRA run with validation images, made once per session
    (shared by pytest-xdist's workers)."""
    name = request.param
    flags = family_flags(tiny_models, name, *BRIGHTNESS, *LORA, "--validation_prompt", "a photo of a cat", "--validation_guidance", "1.0")
    return name, made_once(tmp_path_factory, f"family-lora-{name}",
                           lambda folder: train(LearningRun("train_direct_align", flags, "brightness", 1), tiny_models, folder, steps=3))


def test_the_lora_loads_in_the_pipeline_and_renders_the_trainers_images(pipes, lora_run):
    """The family's pipeline's load_lora_weights reads the trainer's file; the same seed then renders the
    final validation image the trainer saved (to its PNG's uint8 rounding)."""
    name, output_dir = lora_run
    family, max_length = FAMILIES[name]
    pipe = pipes[name]
    saved = sorted(os.listdir(os.path.join(output_dir, "validation")))[-1]
    expected = torch.from_numpy(np.array(Image.open(os.path.join(output_dir, "validation", saved)))).permute(2, 0, 1) / 255.0

    def render():
        encoder = family.prompt_encoder(pipe, int(max_length), "cpu", 64, False)
        return validation.render(pipe.transformer, pipe.vae, encoder, ["a photo of a cat"], 0, 64, 64,
                                 schedules.fixed_shift_sigmas(3, 3.0), 1.0, pipe.vae_scale_factor, "cpu", torch.float32, family=family)

    base = render()
    pipe.load_lora_weights(output_dir)
    try:
        trained = render()
    finally:
        pipe.unload_lora_weights()
    # The grid's tile carries its score as a caption in the top-left corner: compare below it.
    assert (trained[0, :, 16:] - expected[:, 16:64]).abs().max() <= 2 / 255
    assert (base[0, :, 16:] - expected[:, 16:64]).abs().max() > 2 / 255  # the LoRA changed the image


def test_the_flux1_export_refuses_another_familys_lora(lora_run, capsys):
    """The final file names its base's pipeline; `python -m flux_rl.lora_export` (FLUX.1's layout) refuses in one line."""
    from safetensors import safe_open

    from flux_rl import lora_export, models

    name, output_dir = lora_run
    with safe_open(os.path.join(output_dir, models.LORA_WEIGHTS_NAME), "pt") as f:
        assert f.metadata()[models.PIPELINE_KEY] == FAMILIES[name][0].PIPELINE
    with pytest.raises(SystemExit) as end:
        lora_export.main([output_dir])
    lines = capsys.readouterr().err.strip().splitlines()
    assert end.value.code == 2 and len(lines) == 1 and "the export writes FLUX.1's layout" in lines[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_full_fine_tune_saves_a_transformer_the_pipeline_loads(tiny_models, pipes, tmp_path, name):
    pipe = pipes[name]
    output_dir = train(LearningRun("train_direct_align", family_flags(tiny_models, name, *BRIGHTNESS, "--full_finetune",
                                                                       "--learning_rate", "1e-3"), "brightness", 1),
                       tiny_models, str(tmp_path / "full"), steps=1)
    transformer = type(pipe.transformer).from_pretrained(os.path.join(output_dir, "transformer"))
    loaded = type(pipe).from_pretrained(os.path.join(tiny_models, name), transformer=transformer)
    changed = [n for n, p in transformer.named_parameters() if not torch.equal(p, pipe.transformer.get_parameter(n))]
    assert changed and loaded.transformer is transformer


# How each family learns in the test: LoRA for Qwen-Image and FLUX.2; a full fine-tune for the tiny SD3, whose
# default adapters (attention and feed-forwards, as diffusers' SD3 LoRA script) feed a final LayerNorm that takes a
# uniform shift back out, and whose VAE divides the latents by 1.53 (SD3.5's scale): its LoRA moved brightness by
# 2 standard errors in 30 steps, its full fine-tune by 49. The tiny Z-Image's LoRA did not move it either; its full
# fine-tune did, without guidance (0: Z-Image's guidance is on above 0) in rollout and branch, by 12 to 18 standard
# errors with one or two threads; at lr 5e-2, or 2e-2 with two threads, it went by only 3 (the tiny model is unsteady).
LEARNING = {"qwen-image": LORA, "flux2-klein": LORA, "sd3": ("--full_finetune", "--learning_rate", "5e-2"),
            "zimage": ("--full_finetune", "--learning_rate", "1e-2", "--train_guidance", "0", "--rollout_guidance", "0")}


@pytest.mark.parametrize("name", FAMILIES)
def test_training_raises_the_heldout_reward(tiny_models, pipes, tmp_path, name):
    """Direct-Align on the brightness reward, 30 steps: held-out prompts and seeds, judged as the FLUX.1
    learning tests are (tests/test_learning.py), in standard errors of the paired difference."""
    pipe = pipes[name]
    flags = family_flags(tiny_models, name, *BRIGHTNESS, *LEARNING[name])
    output_dir = train(LearningRun("train_direct_align", flags, "brightness", 1), tiny_models, str(tmp_path / "learn"), steps=30)
    before, after = measure(heldout_images(pipe, None), "brightness"), measure(heldout_images(pipe, output_dir), "brightness")
    gain, standard_error, z = heldout.paired_gain(before, after)
    assert z >= 5, f"{name}: held-out brightness moved by {gain:+.5f} ({z:+.1f} standard errors)"


def test_evaluate_renders_through_the_familys_pipeline(tiny_models, lora_run, tmp_path):
    """evaluate_flux.py on the family's base and a LoRA of it: the pipeline's own call with classifier-free
    guidance 2.0, scored; the LoRA's images differ from the base's."""
    import evaluate_flux
    from flux_rl import evaluation

    name, lora_output = lora_run
    benchmark = tmp_path / "benchmark"
    benchmark.mkdir()
    for style in evaluation.HPDV2_STYLES:
        (benchmark / f"{style}.json").write_text(json.dumps([f"{style} of a cat"]))
    output_dir = str(tmp_path / "eval")
    flags = ["--pretrained_model_name_or_path", os.path.join(tiny_models, name), "--hpdv2_benchmark_dir", str(benchmark),
             "--prompts_per_style", "1", "--models", f"lora={lora_output}", "--output_dir", output_dir, "--resolution", "32",
             "--num_inference_steps", "2", "--guidance_scale", "2.0", "--metrics", "toy_brightness",
             "--max_sequence_length", FAMILIES[name][1]]
    try:
        evaluate_flux.main(evaluate_flux.parse_args(flags))
    finally:
        reset_accelerate()
    rows = list(csv.DictReader(open(os.path.join(output_dir, "scores.csv"))))
    assert len(rows) == 8 and {r["model"] for r in rows} == {"base", "lora"}
    by_model = {m: [float(r["toy_brightness"]) for r in rows if r["model"] == m] for m in ("base", "lora")}
    assert by_model["base"] != by_model["lora"]


def test_the_written_out_tables_name_every_family():
    """models.SUPPORTED_PIPELINES (read without importing the families) and the model card's classes."""
    from flux_rl import hub, models

    assert models.SUPPORTED_PIPELINES == families.SUPPORTED_PIPELINES
    assert set(hub.TRANSFORMER_CLASSES) == set(families.FAMILIES)
    assert {hub.TRANSFORMER_CLASSES[p][0] for p in families.FAMILIES} == set(families.TRANSFORMERS)
