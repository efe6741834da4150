"""Reward construction of paper section 3.2 (SGP, SRP, CFG form) and appendix S1.

All text-image forms are linear in the text embedding, so each is one combined text direction
C that the image features are scored against: reward = logit_scale * f_img(x)^T C.
C1 is the embedding of "<wanted control>. <prompt>", C2 that of "<unwanted control>. <prompt>".
"""

import torch

# The authors' release lists (shared/notes/reference-implementation.md): realism / texture words
# wanted, CG / oily-look words unwanted.
DEFAULT_WANTED_CONTROLS = ("Natural-lighting", "Detail", "Detailed", "Real")
DEFAULT_UNWANTED_CONTROLS = ("Concept art", "Painting", "Anime", "Flat", "Oil")

REWARD_FORMS = ("srp", "cfg", "release", "sgp")


def with_control(control: str, prompt: str) -> str:
    """The paper's `<control> . <prompt>` augmentation, written as the release does."""
    return f"{control}. {prompt}"


def _per_sample(k, reference: torch.Tensor) -> torch.Tensor:
    k = torch.as_tensor(k, dtype=reference.dtype, device=reference.device)
    return k.view(-1, 1) if k.ndim else k


def relative_text_direction(c_wanted: torch.Tensor, c_unwanted: torch.Tensor | None, form: str, k=0.0) -> torch.Tensor:
    """The text direction C of each reward form; `k` is a scalar or a per-sample (B,) tensor."""
    if form == "sgp":
        return c_wanted  # Eq. 8: C_(p_c, p)
    if form == "srp":
        return c_wanted - c_unwanted  # Eq. 9-10: r1 - r2 = f_img^T (C1 - C2)
    k = _per_sample(k, c_wanted)
    if form == "cfg":
        return (1 - k) * c_unwanted + k * c_wanted  # Eq. 11
    if form == "release":
        # The authors' release: (1 + k) C1 - C2, an SRP difference plus k times the SGP reward.
        return (1 + k) * c_wanted - c_unwanted
    raise ValueError(f"unknown reward form '{form}'; choose from {', '.join(REWARD_FORMS)}")


def control_embedding(model, prompts, controls) -> torch.Tensor:
    """Text embedding C of "<control>. <prompt>" per prompt. `controls`: one phrase for the batch,
    or a list of phrases whose embeddings are averaged: every form is linear in C, so this equals
    the average of the rewards over those phrases."""
    controls = [controls] if isinstance(controls, str) else list(controls)
    embeddings = [model.encode_text([with_control(c, p) for p in prompts]) for c in controls]
    return torch.stack(embeddings).mean(0)


def semantic_relative_reward(model, images, prompts, wanted, unwanted=None, form="release", k=0.0, image_features=None):
    """Score each image against its prompt with control phrases prepended (Eq. 8-11).

    `wanted` / `unwanted`: a phrase or a list of phrases to average over (see control_embedding).
    Pass `image_features` (from `model.encode_image`) to reuse one image encoding."""
    if image_features is None:
        image_features = model.encode_image(images)
    if form != "sgp" and unwanted is None:
        raise ValueError(f"reward form '{form}' needs an unwanted control phrase; pass one or use form 'sgp'")
    c_wanted = control_embedding(model, prompts, wanted)
    c_unwanted = control_embedding(model, prompts, unwanted) if form != "sgp" else None
    return model.score_features(image_features, relative_text_direction(c_wanted, c_unwanted, form, k))


def noised_relative_reward(model, images, prompts=None, noise_std=0.05, generator=None):
    """Appendix S1, for image-only scorers: R(x) - R(x + small noise).

    Both terms carry gradient: the clean image's score pulls towards the reward, the noised copy's
    score pushes against the reward model's general bias (what it likes in any image)."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    noised = (images + noise_std * noise).clamp(0, 1)
    return model(images, prompts) - model(noised, prompts)
