"""Aesthetic Predictor v2.5: a SigLIP so400m-patch14-384 vision tower and an MLP head on its
L2-normalised pooled output; scores about 1-10 (5.5 and above is "great"). Image only.

Loaded with transformers plus the head's state dict, not through the `aesthetic-predictor-v2-5`
package (AGPL-3.0, needs numpy < 2, fetches the head at run time).
"""

import os
import re

import torch
from torch import nn

from .base import RewardModel
from .preprocess import squash_preprocess

SIGLIP_MODEL = "google/siglip-so400m-patch14-384"
HEAD_FILE = "aesthetic_predictor_v2_5.pth"
HEAD_URL = "https://github.com/discus0434/aesthetic-predictor-v2-5/raw/main/models/aesthetic_predictor_v2_5.pth"


class AestheticHead(nn.Module):
    """The v2.5 head: 1152 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts are inactive in eval)."""

    def __init__(self, hidden_size=1152):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(hidden_size, 1024), nn.Dropout(0.5),
            nn.Linear(1024, 128), nn.Dropout(0.5),
            nn.Linear(128, 64), nn.Dropout(0.5),
            nn.Linear(64, 16), nn.Dropout(0.2),
            nn.Linear(16, 1),
        )

    def forward(self, embeds):
        return self.layers(embeds)


def _head_state_dict(state):
    # The head's Sequential is stored as "layers.N.*" (or "scoring_head.N.*" in some copies).
    state = state.get("state_dict", state)
    return {re.sub(r"^.*?(\d+\.(weight|bias))$", r"layers.\1", key): value for key, value in state.items()}


class AestheticReward(RewardModel):
    name = "aesthetic"
    uses_text = False
    scores_by_embedding = False

    def __init__(self, vision_model, head, image_size, mean, std):
        super().__init__()
        self.vision_model = vision_model.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.image_size, self.mean, self.std = image_size, mean, std

    def preprocess(self, images):
        return squash_preprocess(images, self.image_size, self.mean, self.std)

    def image_tower(self):
        return self.vision_model

    def _image_features(self, pixels):
        dtype = next(self.vision_model.parameters()).dtype
        return self.vision_model(pixel_values=pixels.to(dtype)).pooler_output

    def forward(self, images, prompts=None):
        features = self.encode_image(images)  # L2-normalised pooled output, as the head expects
        return self.head(features.to(next(self.head.parameters()).dtype)).squeeze(-1).float()


def load_aesthetic(source=None, device="cpu", dtype=torch.float32):
    """`source`: a folder with siglip/ and aesthetic_predictor_v2_5.pth, or None to download
    the SigLIP tower from the Hub and the head from the predictor's GitHub release."""
    from transformers import SiglipImageProcessor, SiglipVisionModel

    siglip_path = os.path.join(source, "siglip") if source else SIGLIP_MODEL
    vision_model = SiglipVisionModel.from_pretrained(siglip_path, dtype=dtype)
    processor = SiglipImageProcessor.from_pretrained(siglip_path)
    if source:
        state = torch.load(os.path.join(source, HEAD_FILE), map_location="cpu", weights_only=True)
    else:
        state = torch.hub.load_state_dict_from_url(HEAD_URL, map_location="cpu")
    head = AestheticHead(vision_model.config.hidden_size)
    head.load_state_dict(_head_state_dict(state))
    size = processor.size["height"]
    return AestheticReward(vision_model.to(device), head.to(device=device, dtype=dtype), size, processor.image_mean, processor.image_std)
