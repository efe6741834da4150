"""Every reward construction against a hand computation from the raw encoders (paper Eq. 7-11, S1)."""

import pytest
import torch

import rewards
from rewards.relative import with_control

PROMPTS = ["a cat on a sofa", "a red car"]


@pytest.fixture(scope="module")
def hps(tiny_rewards):
    return rewards.load_reward_model("hpsv2", tiny_rewards)


@pytest.fixture(scope="module")
def pickscore(tiny_rewards):
    return rewards.load_reward_model("pickscore", tiny_rewards)


def raw_cosine(model, images, prompts):
    """Eq. 7 by hand, straight from open_clip's own encoders and tokenizer."""
    image = model.model.encode_image(model.preprocess(images))
    text = model.model.encode_text(model.tokenizer(prompts))
    return (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)


def test_hps_score_is_cosine(hps):
    images = torch.rand(2, 3, 64, 64)
    assert torch.allclose(hps(images, PROMPTS), raw_cosine(hps, images, PROMPTS), atol=1e-6)


def test_pickscore_is_scaled_cosine(pickscore):
    images = torch.rand(2, 3, 64, 64)
    model = pickscore.model
    # transformers 5 returns the projected embedding as pooler_output.
    image = model.get_image_features(pixel_values=pickscore.preprocess(images)).pooler_output
    tokens = pickscore.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    assert not tokens.attention_mask.all()  # padded: the reference passes the mask, the reward does not need it
    text = model.get_text_features(**tokens).pooler_output
    expected = model.logit_scale.exp() * torch.cosine_similarity(image, text, dim=-1)
    assert torch.allclose(pickscore(images, PROMPTS), expected, atol=1e-4)


def test_control_phrase_format():
    assert with_control("Real", "a cat") == "Real. a cat"


@pytest.mark.parametrize("k", [0.3, torch.tensor([0.1, 0.25])])
def test_relative_forms_match_hand_computation(hps, k):
    images = torch.rand(2, 3, 64, 64)
    r1 = hps(images, [with_control("Real", p) for p in PROMPTS])  # wanted
    r2 = hps(images, [with_control("Painting", p) for p in PROMPTS])  # unwanted
    kk = torch.as_tensor(k)

    def form(name, **kw):
        return rewards.semantic_relative_reward(hps, images, PROMPTS, "Real", "Painting", form=name, k=k, **kw)

    assert torch.allclose(form("sgp"), r1, atol=1e-6)  # Eq. 8
    assert torch.allclose(form("srp"), r1 - r2, atol=1e-6)  # Eq. 9-10
    assert torch.allclose(form("cfg"), (1 - kk) * r2 + kk * r1, atol=1e-6)  # Eq. 11
    assert torch.allclose(form("release"), (1 + kk) * r1 - r2, atol=1e-6)


@pytest.mark.parametrize("form", ["sgp", "srp", "cfg", "release"])
def test_text_direction_form_equals_score_form(hps, form):
    """Eq. 10-11 (one combined text direction) equal Eq. 9 (combining scores) for CLIP-like models."""
    images = torch.rand(2, 3, 64, 64)
    k = torch.tensor([0.1, 0.3])
    features = hps.encode_image(images)
    c1 = rewards.control_embedding(hps, PROMPTS, "Real")
    c2 = rewards.control_embedding(hps, PROMPTS, "Flat")
    by_direction = hps.score_features(features, rewards.relative_text_direction(c1, c2, form, k))
    by_scores = rewards.combine_scores(hps.score_features(features, c1), hps.score_features(features, c2), form, k)
    assert torch.allclose(by_direction, by_scores, atol=1e-6)


def test_phrase_lists_average_the_rewards(hps):
    images = torch.rand(2, 3, 64, 64)
    got = rewards.semantic_relative_reward(hps, images, PROMPTS, ["Real", "Detail"], ["Anime", "Oil", "Flat"], form="release", k=0.2)
    r1 = sum(hps(images, [with_control(c, p) for p in PROMPTS]) for c in ["Real", "Detail"]) / 2
    r2 = sum(hps(images, [with_control(c, p) for p in PROMPTS]) for c in ["Anime", "Oil", "Flat"]) / 3
    assert torch.allclose(got, 1.2 * r1 - r2, atol=1e-6)


def test_relative_reward_scales_with_logit_scale(pickscore):
    images = torch.rand(2, 3, 64, 64)
    r1 = pickscore(images, [with_control("Real", p) for p in PROMPTS])
    r2 = pickscore(images, [with_control("Anime", p) for p in PROMPTS])
    srp = rewards.semantic_relative_reward(pickscore, images, PROMPTS, "Real", "Anime", form="srp")
    assert torch.allclose(srp, r1 - r2, atol=1e-4)


def test_noised_relative_reward_appendix_s1(tiny_rewards):
    model = rewards.load_reward_model("aesthetic", tiny_rewards)
    images = torch.rand(2, 3, 64, 64)
    calls = []
    hook = model.image_tower().register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    got = rewards.noised_relative_reward(model, images, noise_std=0.1, generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert len(calls) == 1  # clean and noised images in one batch
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    expected = model(images) - model((images + 0.1 * noise).clamp(0, 1))
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, torch.zeros_like(got))


@pytest.mark.parametrize("name", ["hpsv2", "pickscore", "clip", "aesthetic", "imagereward", "hpsv3"])
def test_gradient_reaches_the_image(tiny_rewards, name):
    model = rewards.load_reward_model(name, tiny_rewards)
    images = torch.rand(2, 3, 720, 720, requires_grad=True)
    model(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_relative_gradient_reaches_the_image(hps):
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    rewards.semantic_relative_reward(hps, images, PROMPTS, "Real", "Oil", form="release", k=0.2).sum().backward()
    assert images.grad.abs().sum() > 0


def test_text_embeddings_are_cached(hps, monkeypatch):
    calls = []
    original = hps._text_features
    monkeypatch.setattr(hps, "_text_features", lambda prompts: calls.append(list(prompts)) or original(prompts))
    first = hps.encode_text(["cache me", "and me"])
    second = hps.encode_text(["and me", "cache me", "cache me"])
    assert calls == [["cache me", "and me"]]
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])


def test_image_only_reward_has_no_text_encoder(tiny_rewards):
    model = rewards.load_reward_model("aesthetic", tiny_rewards)
    with pytest.raises(ValueError, match="images only"):
        model.encode_text(["a cat"])


def test_reward_spec_parsing():
    assert rewards.parse_reward_spec("hpsv2:1.0, pickscore:0.5") == [("hpsv2", 1.0), ("pickscore", 0.5)]
    assert rewards.parse_reward_spec("HPSv2") == [("hpsv2", 1.0)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hpsv4:1", "unknown reward 'hpsv4'"),
        ("hpsv2:abc", "not a number"),
        ("hpsv2:1,hpsv2:2", "appears twice"),
        ("", "empty --reward"),
        ("imagereward:1,clip:x", "not a number"),
    ],
)
def test_bad_reward_specs_fail_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        rewards.parse_reward_spec(spec)
    assert "\n" not in str(error.value)


def test_unknown_relative_form_fails():
    with pytest.raises(ValueError, match="unknown reward form 'foo'"):
        rewards.relative_text_direction(torch.ones(1, 4), torch.ones(1, 4), "foo")


def test_prompt_count_mismatch_fails(hps):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        hps(torch.rand(2, 3, 32, 32), ["only one"])


def test_combined_reward_weights_and_names(tiny_rewards):
    combined = rewards.load_combined_reward("hpsv2:1.0,pickscore:0.5", tiny_rewards)
    images = torch.rand(2, 3, 64, 64)
    total, components = combined(images, PROMPTS)
    assert set(components) == {"hpsv2", "pickscore"}
    assert torch.allclose(total, components["hpsv2"] + 0.5 * components["pickscore"])
