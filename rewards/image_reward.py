"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 image encoder, a BERT text encoder that
cross-attends to the image, and an MLP on the [CLS] state; score (r - 0.16717) / 1.03334.

Loaded into transformers' BLIP modules (BlipVisionModel, BlipTextModel) from the original
`ImageReward.pt`, not through the `image-reward` package: that pins timm 0.6.13 and fairscale and
imports a helper current transformers removed. The original BLIP ViT names map onto
transformers' as in transformers' own BLIP conversion script (`VISION_RENAMES`); the text encoder
is BLIP's BERT "med" model, whose names transformers kept. The mapping is tested on a tiny model
written in the original layout, and against the `image-reward` package's own model at full size
(`tools/check_rewards_against_packages.py`: same random weights saved as ImageReward.pt, same
score). The released weights themselves cannot be downloaded here.
"""

import json
import logging
import os
import re

import torch
from torch import nn

from .base import RewardModel, host_to_device
from .preprocess import clip_preprocess

IMAGE_REWARD_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE, MED_CONFIG_FILE, VISION_CONFIG_FILE = "ImageReward.pt", "med_config.json", "vision_config.json"
logger = logging.getLogger(__name__)
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP "large": ViT-L/16 at 224 with timm's LayerNorm eps.
VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=16, layer_norm_eps=1e-6)

# original BLIP ViT (timm layout) -> transformers BlipVisionModel, applied in order
VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^norm\.", "post_layernorm."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
]


class ImageRewardHead(nn.Module):
    """ImageReward's MLP: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts inactive in eval)."""

    def __init__(self, hidden_size=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(hidden_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def _vision_key(original: str) -> str:
    for pattern, replacement in VISION_RENAMES:
        if re.search(pattern, original):
            return re.sub(pattern, replacement, original)
    raise KeyError(f"unexpected BLIP vision weight '{original}'")


def split_original_state_dict(state: dict) -> tuple[dict, dict, dict]:
    """ImageReward.pt's flat state dict -> (vision, text, head) state dicts in transformers names.
    Weights ImageReward does not use for scoring (projections, position_ids buffers) are dropped."""
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            vision[_vision_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
    return vision, text, head


def vision_config_from(source):
    from transformers import BlipVisionConfig

    path = os.path.join(source, VISION_CONFIG_FILE) if source else None
    values = json.load(open(path)) if path and os.path.exists(path) else VIT_LARGE
    return BlipVisionConfig(**values)


def text_config_from(med_config: dict, vision_width: int):
    """BLIP's BERT config from med_config.json. Its cross-attention reads the ViT's states, so its
    width is the ViT's, as BLIP_Pretrain sets it (`encoder_config.encoder_width = vision_width`):
    the med_config.json that ImageReward ships says 768, its ViT-L gives 1024."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"], num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"], encoder_hidden_size=vision_width,
        max_position_embeddings=med_config["max_position_embeddings"], layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_act=med_config.get("hidden_act", "gelu"), pad_token_id=med_config.get("pad_token_id", 0),
        # BLIP's [DEC] and [SEP] ids in its 30524-token vocabulary (not stored in med_config.json).
        bos_token_id=med_config.get("bos_token_id", 30522), sep_token_id=med_config.get("sep_token_id", 102),
    )


def _load_part(module, state, checkpoint_path):
    """Every weight the model needs must come from the checkpoint; extra ones are ignored with a
    warning (the package itself loads with strict=False: a checkpoint written by another
    transformers version may carry buffers such as position_ids)."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"{checkpoint_path} lacks {len(result.missing_keys)} weights of ImageReward's "
                         f"{type(module).__name__}, e.g. {result.missing_keys[0]}: is it THUDM/ImageReward's ImageReward.pt?")
    if result.unexpected_keys:
        logger.warning(f"ImageReward: {len(result.unexpected_keys)} checkpoint entries not used, e.g. {result.unexpected_keys[0]}")


class ImageRewardModel(RewardModel):
    name = "imagereward"
    scores_by_embedding = False  # the text cross-attends to the image: no separate text embedding

    def __init__(self, vision_model, text_model, head, tokenizer):
        super().__init__()
        self.vision_model = vision_model.eval().requires_grad_(False)
        self.text_model = text_model.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = vision_model.config.image_size

    def image_tower(self):
        return self.vision_model

    def preprocess(self, images):
        return clip_preprocess(images, self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def _tokens(self, prompts, device):
        # ImageReward: BERT tokens, padded / truncated to 35.
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        return host_to_device(tokens.input_ids, device), host_to_device(tokens.attention_mask, device)

    def image_encoding(self, images):
        """The ViT's token states (B x 257 x width), which the text cross-attends to: computed once
        for all the texts the same images are scored against."""
        dtype = next(self.vision_model.parameters()).dtype
        with torch.profiler.record_function(f"reward_image_features_{self.name}"):  # a named range in profiles
            return self.vision_model(pixel_values=self.preprocess(images).to(dtype)).last_hidden_state

    def score_encoding(self, image_embeds, prompts):
        dtype = image_embeds.dtype
        input_ids, attention_mask = self._tokens(prompts, image_embeds.device)
        # The padding mask goes in already expanded (additive, B x 1 x 1 x L, as BLIP's text
        # attention adds it): from a 2D mask transformers first checks `mask.all()`, a read back
        # from the GPU on every reward call. Every image token is attended to: no cross mask.
        additive_mask = torch.where(attention_mask.bool()[:, None, None, :], 0.0, torch.finfo(dtype).min).to(dtype)
        text = self.text_model(
            input_ids=input_ids, attention_mask=additive_mask, encoder_hidden_states=image_embeds,
        ).last_hidden_state
        reward = self.head(text[:, 0]).squeeze(-1).float()
        return (reward - SCORE_MEAN) / SCORE_STD


def load_image_reward(source=None, device="cpu", dtype=torch.float32):
    """`source`: a folder with ImageReward.pt and med_config.json (and, for a non-standard model,
    vision_config.json and tokenizer files), or None to download them from THUDM/ImageReward."""
    from transformers import AutoTokenizer, BertTokenizer, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    if source:
        checkpoint_path, med_config_path = os.path.join(source, CHECKPOINT_FILE), os.path.join(source, MED_CONFIG_FILE)
    else:
        from huggingface_hub import hf_hub_download

        checkpoint_path = hf_hub_download(IMAGE_REWARD_REPO, CHECKPOINT_FILE)
        med_config_path = hf_hub_download(IMAGE_REWARD_REPO, MED_CONFIG_FILE)
    with open(med_config_path) as f:
        med_config = json.load(f)
    vision_state, text_state, head_state = split_original_state_dict(
        torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    )
    vision_model = BlipVisionModel(vision_config_from(source))
    text_model = BlipTextModel(text_config_from(med_config, vision_model.config.hidden_size), add_pooling_layer=False)
    head = ImageRewardHead(med_config["hidden_size"])
    for part, state in ((vision_model, vision_state), (text_model, text_state), (head, head_state)):
        _load_part(part, state, checkpoint_path)
    if source and os.path.exists(os.path.join(source, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        # BLIP's tokenizer: bert-base-uncased plus [DEC] (bos) and [ENC]: 30524 ids.
        tokenizer = BertTokenizer.from_pretrained("bert-base-uncased")
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != med_config["vocab_size"]:
        # transformers 5 returns a 5-token tokenizer, not an error, for a bert-base-uncased it cannot fetch:
        # every prompt would become [UNK]s and the reward would ignore the text.
        raise ValueError(f"ImageReward's tokenizer has {len(tokenizer)} tokens, its text encoder {med_config['vocab_size']}: "
                         f"save BLIP's tokenizer (bert-base-uncased plus [DEC] and [ENC]) into {source or 'the ImageReward folder'} "
                         "or allow downloads from the Hub")
    model = ImageRewardModel(vision_model, text_model, head, tokenizer)
    return model.to(device=device, dtype=dtype)
