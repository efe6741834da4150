"""The differentiable tensor preprocessing equals each reward's official scoring path at any size
and aspect ratio (square, portrait, landscape, odd sizes, smaller than the reward's input), up to
the uint8 rounding a PIL path applies: hpsv2's transform for HPSv2.1, open_clip's for CLIP-H,
torchvision's for ImageReward, transformers' processors for PickScore and SigLIP."""

import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms
from transformers import CLIPImageProcessor, SiglipImageProcessor

import rewards
from rewards.image_reward import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# (height, width): square, the aspect ratios of FLUX's buckets and of photos, odd sizes, 4:3 sizes whose
# proportional side has a fraction >= .5 (600x800, 1024x768: round() and int() differ there), smaller than 224.
SIZES = [(720, 720), (512, 768), (768, 512), (600, 800), (768, 1360), (1024, 768), (333, 517), (225, 301), (150, 200)]


def textured_image(height, width, seed=0):
    """Textured colour fields stored as uint8 like a real PNG: (the PIL image, the same pixels as a
    1 x 3 x H x W tensor in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 60, 60, generator=g)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    uint8 = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(uint8.permute(1, 2, 0).numpy()), uint8.float().div(255).unsqueeze(0)


def hpsv2_official(pil, size, mean, std):
    """hpsv2 1.2.0's scoring transform (create_model_and_transforms(..., light_augmentation=True) in
    img_score.py): ToTensor, its open_clip fork's ResizeMaxSize (longest side to `size`, new sizes
    rounded, torchvision's resize on the tensor, then F.pad with 0: [w // 2, h // 2, w - w // 2,
    h - h // 2]), Normalize. Written out here from that arithmetic: the package does not install
    beside current libraries (tools/check_rewards_against_packages.py runs it separately)."""
    tensor = TF.to_tensor(pil)
    height, width = tensor.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        tensor = TF.resize(tensor, new_size, transforms.InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        tensor = TF.pad(tensor, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(tensor, mean, std).unsqueeze(0)


@pytest.mark.parametrize("height, width", SIZES)
def test_hpsv2_preprocess_is_hpsv2s_own(tiny_rewards, height, width):
    """Longest side + zero padding, on the float tensor: the same arithmetic, so equal to float precision."""
    model = rewards.load_reward_model("hpsv2", tiny_rewards)
    pil, tensor = textured_image(height, width)
    expected = hpsv2_official(pil, 224, model.mean, model.std)
    ours = model.preprocess(tensor)
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    assert (ours - expected).abs().max() < 1e-4
    with torch.no_grad():
        official_features = model.model.encode_image(expected)
        official_features = official_features / official_features.norm(dim=-1, keepdim=True)
        assert torch.allclose(model.encode_image(tensor), official_features, atol=1e-4)


@pytest.mark.parametrize("height, width", SIZES)
def test_clip_preprocess_matches_open_clip(tiny_rewards, height, width):
    model = rewards.load_reward_model("clip", tiny_rewards)
    official = open_clip.image_transform(224, is_train=False, mean=model.mean, std=model.std)
    pil, tensor = textured_image(height, width)
    expected = official(pil).unsqueeze(0)
    ours = model.preprocess(tensor)
    assert ours.shape == expected.shape
    # 1/255 of rounding, divided by the smallest std (0.26): about 0.015 at most.
    assert (ours - expected).abs().max() < 0.02


@pytest.mark.parametrize("height, width", SIZES)
def test_image_reward_preprocess_matches_torchvision(tiny_rewards, height, width):
    """ImageReward's own transform: torchvision Resize(224, BICUBIC), CenterCrop(224), ToTensor, Normalize."""
    model = rewards.load_reward_model("imagereward", tiny_rewards)
    official = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        transforms.ToTensor(), transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])
    pil, tensor = textured_image(height, width)
    assert (model.preprocess(tensor) - official(pil).unsqueeze(0)).abs().max() < 0.02


@pytest.mark.parametrize("height, width", SIZES)
def test_pickscore_preprocess_matches_its_processor(tiny_rewards, height, width):
    model = rewards.load_reward_model("pickscore", tiny_rewards)
    official = CLIPImageProcessor.from_pretrained(os.path.join(tiny_rewards, "pickscore"))
    pil, tensor = textured_image(height, width)
    expected = official(images=pil, return_tensors="pt")["pixel_values"]
    assert (model.preprocess(tensor) - expected).abs().max() < 0.02


@pytest.mark.parametrize("height, width", SIZES)
def test_siglip_preprocess_matches_its_processor(tiny_rewards, height, width):
    model = rewards.load_reward_model("aesthetic", tiny_rewards)
    official = SiglipImageProcessor.from_pretrained(os.path.join(tiny_rewards, "aesthetic", "siglip"))
    pil, tensor = textured_image(height, width)
    expected = official(images=pil, return_tensors="pt")["pixel_values"]
    # mean = std = 0.5: one uint8 step is 2/255 = 0.008 after normalisation.
    assert (model.preprocess(tensor) - expected).abs().max() < 0.02


def test_size_arithmetic_of_the_official_paths():
    """Where the earlier preprocessing was a pixel off or took another crop: the proportional side is
    truncated (600x800 -> 224x298, not 299), PickScore's crop offset floors, HPSv2.1 pads."""
    from rewards.preprocess import center_crop, resize_longest_side_and_pad, resize_shortest_side

    assert resize_shortest_side(torch.rand(1, 3, 600, 800), 224).shape[-2:] == (224, 298)
    assert resize_shortest_side(torch.rand(1, 3, 768, 1360), 224).shape[-2:] == (224, 396)
    image = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 5, 5)
    assert center_crop(image, 2, "round")[0, 0, 0].tolist() == [2.0, 3.0]  # round(1.5) = 2
    assert center_crop(image, 2, "floor")[0, 0, 0].tolist() == [1.0, 2.0]  # 3 // 2 = 1
    padded = resize_longest_side_and_pad(torch.ones(1, 3, 150, 200), 224)
    assert padded.shape[-2:] == (224, 224) and padded[..., :28, :].abs().max() == 0 and padded[..., 28:196, :].min() > 0.99 and padded[..., 196:, :].abs().max() == 0
