"""PickScore (Kirstain et al. 2023): a fine-tuned CLIP-H/14 in transformers format.

Score = exp(logit_scale) * cos(image, text), about 20-23 on good images. The authors' SRPO
release divides it by 20 to bring it to HPS's scale; here that is the combination weight's job
(`--reward pickscore:0.05`), so the reported value stays PickScore's own.
"""

import os

import torch

from .base import RewardModel, host_to_device
from .preprocess import clip_preprocess

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(RewardModel):
    name = "pickscore"

    def __init__(self, model, processor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self.image_size = image_processor.crop_size["height"]
        self.mean, self.std = image_processor.image_mean, image_processor.image_std
        self.logit_scale = float(model.logit_scale.exp())

    def preprocess(self, images):  # as CLIPImageProcessor: its centre crop floors the offset
        return clip_preprocess(images, self.image_size, self.mean, self.std, crop_offset="floor")

    def image_tower(self):
        return self.model.vision_model

    def _image_features(self, pixels):
        dtype = next(self.model.parameters()).dtype
        return _as_tensor(self.model.get_image_features(pixel_values=pixels.to(dtype)))

    def _text_features(self, prompts):
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        # No attention mask: under CLIP's causal mask the pooled (first end-of-text) token never
        # sees the padding after it, so the features are the same; transformers checks a given
        # padding mask with a read back from the GPU (`fast_all`), once per new text.
        return _as_tensor(self.model.get_text_features(input_ids=host_to_device(tokens.input_ids, device)))


def _as_tensor(output):
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_pickscore(source=None, device="cpu", dtype=torch.float32):
    """`source`: a folder with the CLIPModel and its processor, or None for the Hub."""
    from transformers import AutoProcessor, CLIPModel

    model_path = source or PICKSCORE_MODEL
    has_processor = source and any(
        os.path.exists(os.path.join(source, f)) for f in ("processor_config.json", "preprocessor_config.json")
    )
    # PickScore_v1 ships no processor of its own; its authors use the laion CLIP-H one.
    processor_path = source if has_processor else PICKSCORE_PROCESSOR
    model = CLIPModel.from_pretrained(model_path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(processor_path)
    return PickScoreReward(model, processor).to(device)  # logit_scale read on the CPU, before the move
