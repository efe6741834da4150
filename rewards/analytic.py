"""Analytic rewards whose optimum is known, to prove that a trainer learns (tests, the learning-curve
benchmark and the README's tiny quick start). No weights: a formula of the pixels and, for the
text-image one, of a few words.

`toy_brightness` (image only, like `aesthetic`): the mean pixel value, in [0, 1]. Optimum: a
white image. SRPO scores it in the appendix S1 form, as any image-only reward.

`toy_colour` (text-image, CLIP-like, like `hpsv2`): score = <f_img(x), f_txt(p)> (paper Eq. 7) with
    f_img(x) = normalise(mean R - 1/2, mean G - 1/2, mean B - 1/2, IMAGE_BIAS)
    f_txt(p) = normalise(count("red"), count("green"), count("blue"), TEXT_BIAS)
so a prompt that names a colour is best answered by an image of that colour, and the control
phrases of SRP move the image along a known direction: wanted "red" against unwanted "blue" raises
(mean R - mean B) (Eq. 10: f_img^T (C_red - C_blue)), the swapped pair lowers it.
"""

import re

import torch

from .base import RewardModel

COLOUR_WORDS = ("red", "green", "blue")
# The fourth feature: what every image and every text share. It keeps f_img defined for a grey
# image and gives a prompt without colour words a text direction (the reward's "general bias").
IMAGE_BIAS = 0.1
TEXT_BIAS = 1.0


class ToyBrightness(RewardModel):
    """Mean pixel value of images in [0, 1]; image only."""

    name = "toy_brightness"
    uses_text = False
    scores_by_embedding = False

    def preprocess(self, images):
        return images

    def forward(self, images, prompts=None):
        return images.float().mean(dim=(1, 2, 3))


class ToyColour(RewardModel):
    """Cosine of the images' mean colour (about grey) with the colour words of the prompts."""

    name = "toy_colour"

    def preprocess(self, images):
        return images

    def _image_features(self, pixels):
        colour = pixels.float().mean(dim=(2, 3)) - 0.5
        return torch.cat([colour, torch.full_like(colour[:, :1], IMAGE_BIAS)], dim=1)

    def _text_features(self, prompts):
        rows = []
        for prompt in prompts:
            words = re.findall(r"[a-z]+", prompt.lower())
            rows.append([float(words.count(colour)) for colour in COLOUR_WORDS] + [TEXT_BIAS])
        return torch.tensor(rows)


def load_toy_brightness(source=None, device="cpu", dtype=torch.float32):
    return ToyBrightness().to(device)


def load_toy_colour(source=None, device="cpu", dtype=torch.float32):
    return ToyColour().to(device)


def colour_margin(images: torch.Tensor, first: str = "red", second: str = "blue") -> torch.Tensor:
    """mean(first channel) - mean(second channel) per image: what SRP with wanted `first` and
    unwanted `second` raises on toy_colour (the held-out measure of the learning tests)."""
    index = {colour: i for i, colour in enumerate(COLOUR_WORDS)}
    means = images.float().mean(dim=(2, 3))
    return means[:, index[first]] - means[:, index[second]]
