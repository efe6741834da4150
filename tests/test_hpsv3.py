"""HPSv3 loads from its release layout into transformers' Qwen2-VL modules and scores as the hpsv3
package does: transformers' own Qwen2-VL processor (chat template, image processor) and model
(image tokens scattered into the text) give the same mu at the <|Reward|> token."""

import os

import pytest
import torch
from safetensors.torch import load_file

import rewards
from rewards.hpsv3 import INSTRUCTION, RATING_REQUEST, REWARD_TOKEN, original_to_transformers, smart_resize

# Names as they stand in the released HPSv3.safetensors (Qwen2VLRewardModelBT under transformers 4.45).
ORIGINAL_KEYS = [
    "visual.patch_embed.proj.weight", "visual.blocks.0.norm1.weight", "visual.blocks.0.attn.qkv.weight",
    "visual.blocks.0.attn.proj.bias", "visual.blocks.1.mlp.fc2.weight", "visual.merger.ln_q.weight",
    "visual.merger.mlp.0.weight", "visual.merger.mlp.2.bias", "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
    "lm_head.weight", "rm_head.0.weight", "rm_head.3.bias", "rm_head.5.weight", "rm_head.5.bias",
]
PROMPTS = ["a photo of a cat", "a red car on a long, empty road at dusk"]


@pytest.fixture(scope="module")
def hpsv3(tiny_rewards):
    return rewards.load_reward_model("hpsv3", tiny_rewards)


def test_checkpoint_has_the_release_layout_and_every_weight_is_used(tiny_rewards, hpsv3):
    state = load_file(os.path.join(tiny_rewards, "hpsv3", "HPSv3.safetensors"))
    assert set(ORIGINAL_KEYS) <= set(state)
    vision, text, head = original_to_transformers(state)
    assert len(vision) + len(text) + len(head) == len(state) - 1  # only lm_head is not used for scoring
    assert set(vision) == set(hpsv3.visual.state_dict()) and set(text) == set(hpsv3.language_model.state_dict())
    assert torch.equal(hpsv3.visual.state_dict()["merger.mlp.0.weight"], state["visual.merger.mlp.0.weight"])
    assert torch.equal(hpsv3.head.state_dict()["5.bias"], state["rm_head.5.bias"])
    # <|Reward|> is added to Qwen2-VL's tokenizer, one token, the last id: the release resized the embeddings to it.
    assert hpsv3.tokenizer.convert_tokens_to_ids(REWARD_TOKEN) == len(hpsv3.tokenizer) - 1
    assert state["model.embed_tokens.weight"].shape[0] == len(hpsv3.tokenizer)


def reference_scores(model, images, prompts):
    """The hpsv3 package's scoring, through transformers' own Qwen2-VL processor and model: the
    chat template rendered, <|image_pad|> expanded by the processor, the image processor on uint8
    pixels, the whole sequence (END and the assistant turn included) right-padded with its mask,
    the image features scattered in by Qwen2VLModel, plain sequential positions (the package calls
    the inner text model without position ids), mu read at <|Reward|>."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLModel, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = model.image_pixels
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
                                 tokenizer=model.tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=model.tokenizer.chat_template)
    messages = [[{"role": "user", "content": [{"type": "image", "image": None},
                                              {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + RATING_REQUEST}]}]
                for p in prompts]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    uint8 = [(image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for image in images]
    model.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=uint8, padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == len(prompts) and not batch.attention_mask.all()  # padded: prompts differ in length
    config = model.language_model.config
    full = Qwen2VLModel(Qwen2VLConfig(text_config=config.to_dict(), vision_config=model.visual.config.to_dict(),
                                      image_token_id=model.image_token_id)).eval()
    full.visual.load_state_dict(model.visual.state_dict())
    full.language_model.load_state_dict(model.language_model.state_dict())
    positions = torch.arange(batch.input_ids.shape[1]).view(1, 1, -1).expand(3, len(prompts), -1)
    hidden = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw, position_ids=positions).last_hidden_state
    at_reward = batch.input_ids == model.reward_token_id
    assert at_reward.sum(1).tolist() == [1] * len(prompts)
    return model.head(hidden[at_reward])[:, 0]


def test_scores_by_its_formula(hpsv3):
    """Images already at the model's size and in uint8 steps, so the processor's PIL-free path and
    ours see the same pixels; the score is mu of the head at <|Reward|>."""
    size = smart_resize(112, 112, hpsv3.image_pixels)
    assert size == (112, 112)
    images = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(0)) / 255.0
    with torch.no_grad():
        expected = reference_scores(hpsv3, images, PROMPTS)
        got = hpsv3(images, PROMPTS)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert not torch.allclose(got[0], got[1])
    # The same scores one image at a time (no padding) and with the prompts swapped over the images.
    assert torch.allclose(torch.cat([hpsv3(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(2)]), got, atol=1e-5)
    assert not torch.allclose(hpsv3(images, PROMPTS[::-1]), got)


def test_smart_resize_matches_qwen2vl():
    """The release's image sizes (min = max = 256 * 28 * 28 pixels): 448 x 448 for a square, and
    non-square sizes as qwen-vl-utils rounds them."""
    release = 256 * 28 * 28
    assert smart_resize(720, 720, release) == (448, 448)
    assert smart_resize(1024, 1024, release) == (448, 448)
    assert smart_resize(720, 1280, release) == (336, 588)  # floor(720 / 2.1429 / 28) = 12, floor(1280 / 2.1429 / 28) = 21
    assert smart_resize(64, 64, 112 * 112) == (112, 112)  # upsampled: ceil


def test_resized_images_score_like_the_processor(hpsv3):
    """A 64 x 64 image: resized to 112 x 112 by antialiased bicubic (the package's tensor path);
    the same as scoring that resized image directly."""
    import torch.nn.functional as F

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    resized = F.interpolate(images, size=(112, 112), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.allclose(hpsv3(images, PROMPTS), hpsv3(resized, PROMPTS), atol=1e-6)


def test_one_vision_pass_for_many_texts_and_a_gradient(hpsv3):
    """image_encoding is reused across texts (a relative reward, SRPO's branches), with the score of
    a full forward per text, and the gradient reaches the pixels; the model's weights stay frozen."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    calls = []
    hook = hpsv3.visual.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        got = rewards.semantic_relative_reward(hpsv3, images, PROMPTS, "Real", "Anime", form="release", k=0.2)
    finally:
        hook.remove()
    assert len(calls) == 1
    expected = 1.2 * hpsv3(images, ["Real. " + p for p in PROMPTS]) - hpsv3(images, ["Anime. " + p for p in PROMPTS])
    assert torch.allclose(got, expected, atol=1e-5)
    got.sum().backward()
    assert images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in hpsv3.parameters())


def test_a_checkpoint_of_another_vocabulary_is_one_line(tiny_rewards, tmp_path):
    import shutil

    folder = tmp_path / "hpsv3"
    shutil.copytree(os.path.join(tiny_rewards, "hpsv3"), folder)
    state = load_file(folder / "HPSv3.safetensors")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-1].contiguous()  # without <|Reward|>
    from safetensors.torch import save_file

    save_file(state, folder / "HPSv3.safetensors")
    with pytest.raises(ValueError, match="token embeddings, HPSv3's tokenizer"):
        rewards.load_reward_model("hpsv3", str(tmp_path))


def test_compile_keeps_hpsv3_eager_and_compile_reward_says_why(tiny_rewards):
    reward = rewards.load_combined_reward("hpsv3:1.0,toy_brightness:1.0", tiny_rewards)
    reward.compile_image_towers("eager", required=False)  # --compile: HPSv3 stays as it is
    assert reward.models["hpsv3"].visual._compiled_call_impl is None
    with pytest.raises(ValueError, match="drop --compile_reward"):
        reward.compile_image_towers("eager", required=True)
