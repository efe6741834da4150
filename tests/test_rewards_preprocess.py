"""The differentiable tensor preprocessing equals each model's official PIL preprocessing on
square images, up to the uint8 rounding PIL applies."""

import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor, SiglipImageProcessor

import rewards


def smooth_square_image(size, seed=0):
    """Textured colour fields stored as uint8 like a real PNG. The texture is fine enough that
    resizing without antialiasing (the release's F.interpolate) misses by 0.2, not 0.015."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 60, 60, generator=g)
    image = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    uint8 = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(uint8.permute(1, 2, 0).numpy()), uint8.float().div(255).unsqueeze(0)


@pytest.mark.parametrize("size", [720, 512, 224])
def test_open_clip_preprocess_matches_official(tiny_rewards, size):
    for name in ("hpsv2", "clip"):
        model = rewards.load_reward_model(name, tiny_rewards)
        official = open_clip.image_transform(224, is_train=False, mean=model.mean, std=model.std)
        pil, tensor = smooth_square_image(size)
        expected = official(pil).unsqueeze(0)
        ours = model.preprocess(tensor)
        assert ours.shape == expected.shape
        # 1/255 of rounding, divided by the smallest std (0.26): about 0.015 at most.
        assert (ours - expected).abs().max() < 0.02
        with torch.no_grad():
            official_features = model.model.encode_image(expected)
            official_features = official_features / official_features.norm(dim=-1, keepdim=True)
            assert torch.allclose(model.encode_image(tensor), official_features, atol=2e-3)


@pytest.mark.parametrize("size", [720, 256])
def test_pickscore_preprocess_matches_official(tiny_rewards, size):
    model = rewards.load_reward_model("pickscore", tiny_rewards)
    official = CLIPImageProcessor.from_pretrained(os.path.join(tiny_rewards, "pickscore"))
    pil, tensor = smooth_square_image(size)
    expected = official(images=pil, return_tensors="pt")["pixel_values"]
    assert (model.preprocess(tensor) - expected).abs().max() < 0.02


@pytest.mark.parametrize("size", [720, 384, 256])
def test_siglip_preprocess_matches_official(tiny_rewards, size):
    model = rewards.load_reward_model("aesthetic", tiny_rewards)
    official = SiglipImageProcessor.from_pretrained(os.path.join(tiny_rewards, "aesthetic", "siglip"))
    pil, tensor = smooth_square_image(size)
    expected = official(images=pil, return_tensors="pt")["pixel_values"]
    # mean = std = 0.5: one uint8 step is 2/255 = 0.008 after normalisation.
    assert (model.preprocess(tensor) - expected).abs().max() < 0.02
