"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): Qwen2-VL-7B-Instruct
reading the image and an instruction that ends in a special token <|Reward|>; a small MLP (the
"ranknet" head, 3584 -> 1024 -> 16 -> 2) on that token's last hidden state gives (mu, sigma) of
the uncertainty-aware preference loss it was trained with. The score is mu, as the authors'
`HPSv3RewardInferencer` reports it (about 1 to 15 on generated images).

Loaded into transformers' own Qwen2-VL modules (Qwen2VisionTransformerPretrainedModel,
Qwen2VLTextModel) from the released `HPSv3.safetensors`, not through the `hpsv3` package: that pins
transformers 4.45.2 and trl, deepspeed and qwen-vl-utils. What its scoring does, and this file does
the same, differentiably in the image:
- the image resized (antialiased bicubic, as the package's tensor path) to Qwen2-VL's `smart_resize`
  with min = max = 256 * 28 * 28 pixels (448 x 448 for a square), CLIP mean/std, cut into 14-pixel
  patches over 2 identical frames; 256 image tokens after the 2 x 2 merge for a square;
- Qwen2-VL's chat template around the image and INSTRUCTION + "Please provide the overall ratings of
  this image: <|Reward|>", the token added to the tokenizer and the embeddings resized to it;
- the language model run with plain sequential positions on all three M-RoPE axes: the package calls
  the inner text model directly, which (without `position_ids`) does not use Qwen2-VL's image-aware
  rope indices. Its scores were trained that way, so they are computed that way here.
The text after <|Reward|> ("END", the assistant turn) cannot change that token's state under causal
attention, so the sequence stops there; rows are right-padded and need no mask for the same reason.

Checked against the `hpsv3` package's own model on random weights (`tools/check_rewards_against_packages.py
--hpsv3`: its Qwen2VLRewardModelBT under transformers 4.45.2, Qwen2-VL-7B's widths with fewer layers,
the same file, the same scores). The released weights themselves cannot be downloaded here.
"""

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .base import RewardModel, host_to_device
from .preprocess import _clamped, normalize

HPSV3_REPO, CHECKPOINT_FILE = "MizzenAI/HPSv3", "HPSv3.safetensors"
BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
# A folder's own settings (the tiny test model's smaller image): {"image_pixels": N}.
SETTINGS_FILE = "hpsv3_config.json"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PIXELS = 256 * 28 * 28  # the package's min_pixels = max_pixels
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# hpsv3/dataset/data_collator_qwen.py, INSTRUCTION and prompt_with_special_token, verbatim (the two
# trailing spaces after "best." and "Quality:**" / "Alignment:**" included).
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
RATING_REQUEST = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
# Qwen2-VL-Instruct's chat template for one user turn holding an image then text, up to the image.
CHAT_BEFORE_IMAGE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"


class RankNetHead(nn.Sequential):
    """The release's rm_head ("ranknet", no rm_head_kwargs): indices 0, 3, 5 hold the weights, as in
    HPSv3.safetensors. Kept in float32, as the package does."""

    def __init__(self, hidden_size: int, output_dim: int = 2):
        super().__init__(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, output_dim))


def smart_resize(height: int, width: int, pixels: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's size rule (qwen-vl-utils' smart_resize, as the hpsv3 package copies it) with
    min_pixels = max_pixels = `pixels`: sides multiples of `factor`, about `pixels` in all, the
    aspect ratio kept. The same float arithmetic, so the same rounding."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > pixels:
        beta = math.sqrt((height * width) / pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < pixels:
        beta = math.sqrt(pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def original_to_transformers(state: dict) -> tuple[dict, dict, dict]:
    """HPSv3.safetensors (Qwen2VLRewardModelBT's state dict under transformers 4.45: visual.*,
    model.*, lm_head.*, rm_head.*) -> (vision, language model, head) state dicts. A file written
    under transformers >= 4.52 (model.visual.*, model.language_model.*) is read too. lm_head is
    not used for scoring and dropped."""
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        for prefix, part in (("model.visual.", vision), ("visual.", vision), ("model.language_model.", text),
                             ("model.", text), ("rm_head.", head)):
            if key.startswith(prefix):
                part[key.removeprefix(prefix)] = value
                break
    return vision, text, head


def _load_part(module, state, checkpoint_path):
    missing = module.load_state_dict(state, strict=False, assign=True).missing_keys
    if missing:
        raise ValueError(f"{checkpoint_path} lacks {len(missing)} weights of HPSv3's {type(module).__name__}, "
                         f"e.g. {missing[0]}: is it MizzenAI/HPSv3's {CHECKPOINT_FILE}?")


class HPSv3Model(RewardModel):
    name = "hpsv3"
    scores_by_embedding = False  # the image and the prompt meet inside the language model

    def __init__(self, visual, language_model, head, tokenizer, config, image_pixels=IMAGE_PIXELS):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        self.language_model = language_model.eval().requires_grad_(False)
        self.head = head.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_pixels = image_pixels
        vision = config.vision_config
        self.patch_size, self.merge_size, self.frames = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.image_token_id = config.image_token_id
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._token_cache: dict[str, list[int]] = {}
        self._layouts: dict[tuple, tuple] = {}

    def image_tower(self):
        """None: --compile leaves HPSv3 eager. Its vision tower splits the patches per image with
        Python lists (`.tolist()` on the bounds in every block), which breaks a graph per block, and
        the 7B language model after it dominates the reward's time anyway."""
        return None

    def compile_image_tower(self, backend="inductor", mode=None):
        raise ValueError("--compile_reward: HPSv3's vision tower does not compile as one graph (it splits patches per "
                         "image in Python) and its language model dominates its time; drop --compile_reward "
                         "(--compile keeps HPSv3 eager by itself)")

    def preprocess(self, images):
        """B x 3 x H x W in [0, 1] -> (patches (B * h * w) x (3 * frames * 14 * 14), grid (h, w) in
        patches), the layout Qwen2VLImageProcessor gives one image: the frame repeated, patches
        ordered by 2 x 2 merge groups."""
        height, width = smart_resize(*images.shape[-2:], self.image_pixels, self.patch_size * self.merge_size)
        if (height, width) != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        images = normalize(_clamped(images), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        batch, channels = images.shape[:2]
        p, m, t = self.patch_size, self.merge_size, self.frames
        grid_h, grid_w = height // p, width // p
        frames = images[:, None].expand(batch, t, channels, height, width)
        patches = frames.reshape(batch, t, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # b, h/m, w/m, m, m, c, t, p, p
        return patches.reshape(batch * grid_h * grid_w, channels * t * p * p), (grid_h, grid_w)

    def image_encoding(self, images):
        """The vision tower's merged image tokens, B x N x hidden: computed once for every text the
        same images are scored against (control phrases, SRPO's branches)."""
        patches, (grid_h, grid_w) = self.preprocess(images)
        grid, positions, bounds = self._vision_layout(images.shape[0], grid_h, grid_w, images.device)
        with torch.profiler.record_function(f"reward_image_features_{self.name}"):  # a named range in profiles
            tokens = self.visual(patches.to(self.visual.get_dtype()), grid_thw=grid, position_ids=positions,
                                 cu_seqlens=bounds).pooler_output
        return tokens.view(images.shape[0], -1, tokens.shape[-1])

    def _vision_layout(self, batch, grid_h, grid_w, device):
        """The vision tower's per-image bookkeeping, made on the host once per shape: patch
        positions for its 2-D rope (queued to the device), and the images' bounds kept on the host,
        since its attention splits the patches by them with `.tolist()` (a wait for the GPU per
        block if they lived there)."""
        key = (batch, grid_h, grid_w, str(device))
        if key not in self._layouts:
            from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

            grid = torch.tensor([[1, grid_h, grid_w]] * batch)
            positions = host_to_device(get_vision_position_ids(grid, self.merge_size), device)
            self._layouts[key] = (grid, positions, get_vision_cu_seqlens(grid))
        return self._layouts[key]

    def _text_ids(self, prompt: str) -> list[int]:
        """Token ids after the image placeholders, up to and including <|Reward|>, per prompt."""
        if prompt not in self._token_cache:
            text = "<|vision_end|>" + INSTRUCTION.format(text_prompt=prompt) + RATING_REQUEST
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if self.reward_token_id not in ids:
                raise ValueError(f"HPSv3's tokenizer does not keep {REWARD_TOKEN} as one token; add it as a special token")
            self._token_cache[prompt] = ids[: ids.index(self.reward_token_id) + 1]
        return self._token_cache[prompt]

    def _sequences(self, prompts, image_tokens: int):
        if "head" not in self._token_cache:
            self._token_cache["head"] = self.tokenizer(CHAT_BEFORE_IMAGE, add_special_tokens=False).input_ids
        head = self._token_cache["head"] + [self.image_token_id] * image_tokens
        rows = [head + self._text_ids(p) for p in prompts]
        length = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_token_id] * (length - len(r)) for r in rows])
        return ids, torch.tensor([len(r) - 1 for r in rows])

    def score_encoding(self, image_tokens, prompts):
        batch, count = image_tokens.shape[:2]
        input_ids, reward_at = self._sequences(prompts, count)
        input_ids = host_to_device(input_ids, image_tokens.device)
        embeds = self.language_model.embed_tokens(input_ids)
        # The image placeholders take the image tokens, in order (Qwen2-VL's masked_scatter).
        start = len(self._token_cache["head"])
        embeds = torch.cat([embeds[:, :start], image_tokens.to(embeds.dtype), embeds[:, start + count :]], dim=1)
        positions = torch.arange(embeds.shape[1], device=embeds.device).view(1, 1, -1).expand(3, batch, -1)
        hidden = self.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        rows = torch.arange(batch, device=hidden.device)
        reward_states = hidden[rows, host_to_device(reward_at, hidden.device)]
        mu_sigma = self.head(reward_states.to(self.head[0].weight.dtype))  # float32 in the release
        return mu_sigma[:, 0]


def qwen2vl_config(source):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source if source and os.path.exists(os.path.join(source, "config.json")) else BASE_MODEL)


def load_hpsv3(source=None, device="cpu", dtype=torch.float32):
    """`source`: a folder with HPSv3.safetensors, Qwen2-VL's config.json and tokenizer files
    (`python -m rewards.download --names hpsv3` writes it), or None to fetch HPSv3.safetensors from
    MizzenAI/HPSv3 and the rest from Qwen/Qwen2-VL-7B-Instruct."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, Qwen2VLTextModel

    if source and os.path.exists(os.path.join(source, CHECKPOINT_FILE)):
        checkpoint_path = os.path.join(source, CHECKPOINT_FILE)
    else:
        from huggingface_hub import hf_hub_download

        checkpoint_path = hf_hub_download(HPSV3_REPO, CHECKPOINT_FILE)
    has_tokenizer = source and os.path.exists(os.path.join(source, "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(source if has_tokenizer else BASE_MODEL)
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    config = qwen2vl_config(source)
    settings = {}
    if source and os.path.exists(os.path.join(source, SETTINGS_FILE)):
        with open(os.path.join(source, SETTINGS_FILE)) as f:
            settings = json.load(f)
    vision_state, text_state, head_state = original_to_transformers(load_file(checkpoint_path))
    vocab = text_state.get("embed_tokens.weight", torch.empty(0)).shape[0]
    if vocab != len(tokenizer):
        # The release resized the embeddings to the tokenizer with <|Reward|> (151658 rows, not Qwen2-VL's 152064).
        raise ValueError(f"{checkpoint_path} has {vocab} token embeddings, HPSv3's tokenizer {len(tokenizer)} tokens: "
                         f"use Qwen2-VL-7B-Instruct's tokenizer (plus {REWARD_TOKEN}) with MizzenAI/HPSv3's {CHECKPOINT_FILE}")
    text_config = config.get_text_config()
    text_config.vocab_size = vocab
    text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    # Parameters on the meta device (no 8B random initialisation), then the checkpoint's tensors
    # assigned in; buffers (rotary frequencies, not in the file) are built from the configs.
    with init_empty_weights():
        visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
        language_model = Qwen2VLTextModel._from_config(text_config)
    head = RankNetHead(text_config.hidden_size, head_state["5.weight"].shape[0] if "5.weight" in head_state else 2)
    for part, state in ((visual, vision_state), (language_model, text_state), (head, head_state)):
        _load_part(part, state, checkpoint_path)
    model = HPSv3Model(visual, language_model, head, tokenizer, config, settings.get("image_pixels", IMAGE_PIXELS))
    model.visual.to(device=device, dtype=dtype)
    model.language_model.to(device=device, dtype=dtype)
    model.head.to(device=device)  # float32, as in the release
    return model
