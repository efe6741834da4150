"""ImageReward loads from the original BLIP checkpoint layout into transformers' BLIP modules."""

import os

import pytest
import torch

import rewards
from rewards.image_reward import SCORE_MEAN, SCORE_STD, split_original_state_dict

# Names as they stand in the released ImageReward.pt (BLIP's vit.py and med.py, ImageReward's MLP).
ORIGINAL_KEYS = [
    "blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "blip.visual_encoder.patch_embed.proj.weight",
    "blip.visual_encoder.blocks.0.norm1.weight", "blip.visual_encoder.blocks.0.attn.qkv.weight",
    "blip.visual_encoder.blocks.0.attn.proj.weight", "blip.visual_encoder.blocks.0.norm2.bias",
    "blip.visual_encoder.blocks.0.mlp.fc1.weight", "blip.visual_encoder.blocks.0.mlp.fc2.bias",
    "blip.visual_encoder.norm.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
    "blip.text_encoder.encoder.layer.0.attention.self.query.weight",
    "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight",
    "blip.text_encoder.encoder.layer.0.output.LayerNorm.weight",
    "mlp.layers.0.weight", "mlp.layers.2.weight", "mlp.layers.4.weight", "mlp.layers.6.weight", "mlp.layers.7.bias",
]


@pytest.fixture(scope="module")
def image_reward(tiny_rewards):
    return rewards.load_reward_model("imagereward", tiny_rewards)


def test_checkpoint_has_the_original_layout_and_every_weight_is_used(tiny_rewards, image_reward):
    state = torch.load(os.path.join(tiny_rewards, "imagereward", "ImageReward.pt"), weights_only=True)
    assert set(ORIGINAL_KEYS) <= set(state)
    vision, text, head = split_original_state_dict(state)
    assert len(vision) + len(text) + len(head) == len(state) - 1  # only the unused vision_proj is dropped
    assert torch.equal(image_reward.vision_model.state_dict()["embeddings.class_embedding"], state["blip.visual_encoder.cls_token"])
    assert torch.equal(image_reward.vision_model.state_dict()["encoder.layers.0.self_attn.projection.weight"],
                       state["blip.visual_encoder.blocks.0.attn.proj.weight"])
    assert torch.equal(image_reward.head.state_dict()["layers.7.bias"], state["mlp.layers.7.bias"])


def test_score_formula(image_reward):
    images = torch.rand(2, 3, 96, 96)
    prompts = ["a photo of a cat", "a red car"]
    tokens = image_reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (2, 35) and not tokens.attention_mask.all()  # the reward pre-expands this mask
    image_embeds = image_reward.vision_model(pixel_values=image_reward.preprocess(images)).last_hidden_state
    cls = image_reward.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                  encoder_hidden_states=image_embeds).last_hidden_state[:, 0]
    expected = (image_reward.head(cls).squeeze(-1) - SCORE_MEAN) / SCORE_STD
    assert torch.allclose(image_reward(images, prompts), expected, atol=1e-6)


def test_relative_forms_by_scores(image_reward):
    images = torch.rand(2, 3, 64, 64)
    prompts = ["a cat", "a dog"]
    r1 = image_reward(images, ["Real. a cat", "Real. a dog"])
    r2 = image_reward(images, ["Anime. a cat", "Anime. a dog"])
    got = rewards.semantic_relative_reward(image_reward, images, prompts, "Real", "Anime", form="release", k=0.2)
    assert torch.allclose(got, 1.2 * r1 - r2, atol=1e-6)
    with pytest.raises(ValueError, match="no text encoder"):
        image_reward.encode_text(["a cat"])


def test_the_vit_runs_once_for_all_phrases_and_branches(image_reward):
    """A relative reward scores the same images against several texts: ImageReward's ViT encodes
    them once (its text side cross-attends to those states per text), with the scores and image
    gradients of one full forward per text."""
    import train_srpo_flux
    from rewards import CombinedReward

    calls = []
    hook = image_reward.vision_model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        branches = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)).requires_grad_(True) for i in range(2)]
        prompts = ["a cat", "a dog"]
        reward = CombinedReward({"imagereward": image_reward}, {"imagereward": 1.0})
        args = train_srpo_flux.parse_args(["--pretrained_model_name_or_path", "x"])
        records = [train_srpo_flux.Branch("denoise", 0.9, 0.8, 0.2, 1.0, "Real", "Anime", 1.0),
                   train_srpo_flux.Branch("inversion", 0.9, 0.8, 0.1, 1.0, "Anime", "Real", -1.0)]
        results = train_srpo_flux.branch_scores(reward, branches, prompts, records, args, None)
        assert len(calls) == 1  # one ViT pass for 2 branches x 2 phrases
        sum(score.sum() for score, _ in results).backward()
        for images, (wanted, unwanted), k, (score, _) in zip(branches, [("Real", "Anime"), ("Anime", "Real")], [0.2, 0.1], results):
            pixels = images.detach().clone().requires_grad_(True)
            expected = ((1 + k) * image_reward(pixels, [f"{wanted}. {p}" for p in prompts])
                        - image_reward(pixels, [f"{unwanted}. {p}" for p in prompts]))  # the release form, one forward per text
            expected.sum().backward()
            assert torch.allclose(score, expected, atol=1e-6)
            assert torch.allclose(images.grad, pixels.grad, atol=1e-6) and pixels.grad.abs().sum() > 0
    finally:
        hook.remove()


def test_cross_attention_takes_the_vit_width_not_med_config(tiny_rewards, image_reward):
    """The med_config.json ImageReward ships says encoder_width 768 while its ViT-L gives 1024;
    BLIP builds the cross-attention for the ViT's width (loading failed before this was so)."""
    import json

    med_config = json.load(open(os.path.join(tiny_rewards, "imagereward", "med_config.json")))
    vision_width = image_reward.vision_model.config.hidden_size
    assert med_config["encoder_width"] != vision_width
    assert image_reward.text_model.config.encoder_hidden_size == vision_width


def test_checkpoint_missing_a_weight_is_refused(tiny_rewards, tmp_path):
    import shutil

    source = os.path.join(tiny_rewards, "imagereward")
    shutil.copytree(source, tmp_path / "imagereward")
    state = torch.load(os.path.join(source, "ImageReward.pt"), weights_only=True)
    del state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # stale buffers are skipped
    torch.save(state, tmp_path / "imagereward" / "ImageReward.pt")
    with pytest.raises(ValueError, match="lacks 1 weights of ImageReward's BlipTextModel, e.g. encoder.layer.0.crossattention.self.key.weight"):
        rewards.load_reward_model("imagereward", str(tmp_path))


def test_a_tokenizer_that_does_not_fit_the_text_encoder_is_refused(tiny_rewards, tmp_path):
    """Offline, transformers 5 gives a 5-token BertTokenizer for bert-base-uncased instead of an
    error: every prompt would be [UNK]s. The loader compares the size with the text encoder's."""
    import shutil

    from transformers import BertTokenizer

    shutil.copytree(os.path.join(tiny_rewards, "imagereward"), tmp_path / "imagereward")
    tokenizer = BertTokenizer.from_pretrained(str(tmp_path / "imagereward"))
    tokenizer.add_tokens(["[EXTRA]"])
    tokenizer.save_pretrained(str(tmp_path / "imagereward"))
    with pytest.raises(ValueError, match="tokenizer has .* tokens, its text encoder"):
        rewards.load_reward_model("imagereward", str(tmp_path))
