"""HPSv2.1 and CLIP score: both are open_clip ViT-H-14 models.

HPSv2.1 is loaded into plain open_clip, not through the `hpsv2` package: its wheel lacks its own
tokenizer vocabulary, pins pytest and protobuf to old releases, and asks the Hub for the CLIP
weights it then overwrites. open_clip's ViT-H-14 has the same parameter names and shapes as the
fork inside hpsv2, so `HPS_v2.1_compressed.pt`'s state dict loads as it is.
"""

import logging
import os

import torch

from .base import RewardModel, host_to_device
from .preprocess import clip_preprocess, hps_preprocess

HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
CLIP_H14_HUB = "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class OpenClipReward(RewardModel):
    def __init__(self, model, tokenizer, name):
        super().__init__()
        import open_clip

        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        self.image_size = size if isinstance(size, int) else size[0]
        # open_clip's own defaults (OpenAI CLIP's) where a model carries no preprocess config.
        self.mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        self.std = cfg.get("std", open_clip.OPENAI_DATASET_STD)

    def preprocess(self, images):
        # HPSv2.1 as its package scores (longest side + zero padding); CLIP-H as open_clip's transform (crop).
        preprocess = hps_preprocess if self.name == "hpsv2" else clip_preprocess
        return preprocess(images, self.image_size, self.mean, self.std)

    def image_tower(self):
        return self.model.visual

    def _image_features(self, pixels):
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(pixels.to(dtype))

    def _text_features(self, prompts):
        device = next(self.model.parameters()).device
        return self.model.encode_text(host_to_device(self.tokenizer(prompts), device))


def _architecture(source, default_arch):
    """A folder with open_clip_config.json names its own architecture (the tiny test models do)."""
    if source and os.path.isdir(source) and os.path.exists(os.path.join(source, "open_clip_config.json")):
        return "local-dir:" + source
    return default_arch


def load_hpsv2(source=None, device="cpu", dtype=torch.float32):
    """HPSv2.1. `source`: a folder holding HPS_v2.1_compressed.pt, the .pt file itself, or None
    to download it from the Hub (xswu/HPSv2)."""
    import open_clip

    if source is None:
        from huggingface_hub import hf_hub_download

        checkpoint_path = hf_hub_download(HPS_REPO, HPS_FILE)
    elif os.path.isdir(source):
        checkpoint_path = os.path.join(source, HPS_FILE)
    else:
        checkpoint_path = source
    if not os.path.exists(checkpoint_path):
        raise FileNotFoundError(f"HPSv2.1 weights not found at {checkpoint_path}; download {HPS_FILE} from {HPS_REPO}")
    arch = _architecture(source, "ViT-H-14")
    # open_clip warns that the architecture came without weights: they come from the HPS file below.
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(arch, pretrained=None, load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    tokenizer = open_clip.get_tokenizer(arch)
    return OpenClipReward(model.to(device=device, dtype=dtype), tokenizer, "hpsv2")


def load_clip_score(source=None, device="cpu", dtype=torch.float32):
    """CLIP ViT-H-14 (laion2B-s32B-b79K) cosine similarity. `source`: an open_clip folder
    (open_clip_config.json + weights) or None for the Hub."""
    import open_clip

    name = "local-dir:" + source if source else CLIP_H14_HUB
    model = open_clip.create_model(name)
    tokenizer = open_clip.get_tokenizer(name)
    return OpenClipReward(model.to(device=device, dtype=dtype), tokenizer, "clip")
