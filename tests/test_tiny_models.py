"""The tiny-model factory writes folders the real loaders read unchanged."""

import os
import subprocess
import sys

import open_clip
import torch
from diffusers import FluxPipeline

import rewards
from tests.conftest import REPO_ROOT


def test_flux_pipeline_loads_and_generates(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.scaling_factor == 0.3611 and pipe.vae.config.shift_factor == 0.1159
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    images = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_clip_tokenizer_equals_open_clip(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in ["A photo of a cat, Natural-lighting.", "concept art of a dragon!! 4k", "Oil. painting"]:
        ids = pipe.tokenizer(text).input_ids
        assert ids == [49406] + reference.encode(text) + [49407]


def test_reward_folders_load_through_real_loaders(tiny_rewards):
    images = torch.rand(2, 3, 96, 96)
    for name in rewards.REWARD_LOADERS:
        model = rewards.load_reward_model(name, tiny_rewards)
        scores = model(images, ["a cat", "a dog"])
        assert scores.shape == (2,) and torch.isfinite(scores).all(), name


def test_factory_command_line(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "flux_rl.tiny_models", "--output_dir", str(out)], check=True, cwd=REPO_ROOT)
    assert os.path.exists(out / "flux" / "model_index.json")
    for name in ("hpsv2/HPS_v2.1_compressed.pt", "clip/open_clip_config.json", "pickscore/config.json",
                 "aesthetic/aesthetic_predictor_v2_5.pth", "imagereward/ImageReward.pt", "imagereward/med_config.json",
                 "hpsv3/HPSv3.safetensors", "hpsv3/config.json", "hpsv3/tokenizer.json"):
        assert os.path.exists(out / "rewards" / name), name
