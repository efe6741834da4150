"""Reward construction of paper section 3.2 (SGP, SRP, CFG form) and appendix S1.

r1 is the score of an image against "<wanted control>. <prompt>", r2 against
"<unwanted control>. <prompt>". Every form is a linear combination a * r1 + b * r2. For CLIP-like
models the score is linear in the text embedding C (Eq. 7), so the same form is one combined
text direction a * C1 + b * C2 that the image features are scored against (Eq. 10-11); for
cross-attention scorers (ImageReward) the scores themselves are combined.
"""

import torch

from .base import host_to_device

# The authors' release lists (shared/notes/reference-implementation.md): realism / texture words
# wanted, CG / oily-look words unwanted.
DEFAULT_WANTED_CONTROLS = ("Natural-lighting", "Detail", "Detailed", "Real")
DEFAULT_UNWANTED_CONTROLS = ("Concept art", "Painting", "Anime", "Flat", "Oil")

REWARD_FORMS = ("srp", "cfg", "release", "sgp")


def with_control(control: str, prompt: str) -> str:
    """The paper's `<control> . <prompt>` augmentation, written as the release does."""
    return f"{control}. {prompt}"


def form_coefficients(form: str, k=0.0):
    """(a, b) with reward = a * r1 + b * r2; `k` a scalar or a per-sample (B,) tensor: the release
    form's k (the SRPO trainer's branch weight, 0.01-0.6), or Eq. 11's k, a guidance scale above 1
    (the trainer's --cfg_scale): (1 - k) C2 + k C1 = C2 + k (C1 - C2)."""
    if form == "sgp":
        return 1.0, 0.0  # Eq. 8: the wanted-phrase score alone
    if form == "srp":
        return 1.0, -1.0  # Eq. 9-10: r1 - r2
    if form == "cfg":
        return k, 1 - k  # Eq. 11: k C1 + (1 - k) C2, k > 1 as in classifier-free guidance
    if form == "release":
        return 1 + k, -1.0  # the authors' release: (1 + k) C1 - C2, an SRP difference plus k times SGP
    raise ValueError(f"unknown reward form '{form}'; choose from {', '.join(REWARD_FORMS)}")


def _as_column(value, reference: torch.Tensor):
    """A per-sample coefficient broadcast over the feature dimension."""
    if isinstance(value, torch.Tensor) and value.ndim:
        return value.to(reference).view(-1, *([1] * (reference.ndim - 1)))
    return value


def relative_text_direction(c_wanted: torch.Tensor, c_unwanted: torch.Tensor | None, form: str, k=0.0) -> torch.Tensor:
    """The text direction C = a * C1 + b * C2 of each form (Eq. 8, 10, 11), for CLIP-like models."""
    a, b = form_coefficients(form, k)
    direction = _as_column(a, c_wanted) * c_wanted
    if form != "sgp":
        direction = direction + _as_column(b, c_unwanted) * c_unwanted
    return direction


def combine_scores(r_wanted: torch.Tensor, r_unwanted: torch.Tensor | None, form: str, k=0.0) -> torch.Tensor:
    """The same forms on scores: a * r1 + b * r2."""
    a, b = form_coefficients(form, k)
    return a * r_wanted if form == "sgp" else a * r_wanted + b * r_unwanted


def control_embedding(model, prompts, controls) -> torch.Tensor:
    """Text embedding C of "<control>. <prompt>" per prompt. `controls`: one phrase for the batch,
    or a list of phrases whose embeddings are averaged: every form is linear in C, so this equals
    the average of the rewards over those phrases."""
    controls = [controls] if isinstance(controls, str) else list(controls)
    embeddings = [model.encode_text([with_control(c, p) for p in prompts]) for c in controls]
    return torch.stack(embeddings).mean(0)


def control_scores(model, images, prompts, controls, image_encoding=None) -> torch.Tensor:
    """Score of each image against "<control>. <prompt>", averaged over a list of phrases. The
    images are encoded once (pass `image_encoding`, from model.image_encoding, to reuse it across
    calls); a CLIP-like model then scores them against the phrases' mean text embedding, a
    cross-attention scorer (ImageReward) runs its text side once per phrase."""
    if image_encoding is None:
        image_encoding = model.image_encoding(images)
    if model.scores_by_embedding:
        return model.score_features(image_encoding, control_embedding(model, prompts, controls))
    controls = [controls] if isinstance(controls, str) else list(controls)
    return torch.stack([model.score_encoding(image_encoding, [with_control(c, p) for p in prompts]) for c in controls]).mean(0)


def semantic_relative_reward(model, images, prompts, wanted, unwanted=None, form="release", k=0.0):
    """Score each image against its prompt with control phrases prepended (Eq. 8-11).
    `wanted` / `unwanted`: a phrase, or a list of phrases to average over."""
    return relative_terms(model, images, prompts, wanted, unwanted, form, k)[0]


def relative_terms(model, images, prompts, wanted, unwanted=None, form="release", k=0.0, image_encoding=None):
    """(reward, r_wanted, r_unwanted) of semantic_relative_reward, the two scores kept for logging
    (r_unwanted None for sgp). The images are encoded once for both phrases; pass `image_encoding`
    to reuse one computed for a larger batch."""
    if form != "sgp" and unwanted is None:
        raise ValueError(f"reward form '{form}' needs an unwanted control phrase; pass one or use form 'sgp'")
    if image_encoding is None:
        image_encoding = model.image_encoding(images)
    r_wanted = control_scores(model, images, prompts, wanted, image_encoding)
    r_unwanted = control_scores(model, images, prompts, unwanted, image_encoding) if form != "sgp" else None
    return combine_scores(r_wanted, r_unwanted, form, k), r_wanted, r_unwanted  # Eq. 8 / 9-10 / 11 / release form


def noised_relative_reward(model, images, prompts=None, noise_std=0.05, generator=None):
    """Appendix S1, for image-only scorers: R(x) - R(x + small noise).

    Both terms carry gradient: the clean image's score pulls towards the reward, the noised copy's
    score pushes against the reward model's general bias (what it likes in any image)."""
    clean_score, noised_score = noised_pair(model, images, prompts, noise_std, generator)
    return clean_score - noised_score


def noised_pair(model, images, prompts=None, noise_std=0.05, generator=None):
    """(R(x), R(x + small noise)): appendix S1's two scores, the clean image in the place of the wanted
    phrase and its noised copy in that of the unwanted one, so that every form (Eq. 8-11, release)
    combines them as it combines r1 and r2."""
    # Drawn where the generator lives (the trainers' step generator is a CPU one: the same noise on
    # any device), then queued to the images' device.
    noise = host_to_device(torch.randn(images.shape, generator=generator, dtype=images.dtype,
                                       device=generator.device if generator is not None else images.device), images.device)
    noised = (images + noise_std * noise).clamp(0, 1)
    # One batch of clean and noised images: one pass of the image tower, forward and backward.
    return model(torch.cat([images, noised]), None if prompts is None else list(prompts) * 2).chunk(2)
