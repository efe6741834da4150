"""Differentiable reward models for FLUX preference fine-tuning, and the reward constructions of
SRPO (paper section 3.2 and appendix S1). See README.md for the table of models."""

from .base import RewardModel
from .preprocess import clip_preprocess, squash_preprocess
from .registry import (
    REWARD_LOADERS,
    CombinedReward,
    import_reward_modules,
    load_combined_reward,
    load_reward_model,
    parse_reward_spec,
    register_reward,
)
from .relative import (
    DEFAULT_UNWANTED_CONTROLS,
    DEFAULT_WANTED_CONTROLS,
    REWARD_FORMS,
    combine_scores,
    control_embedding,
    control_scores,
    form_coefficients,
    noised_pair,
    noised_relative_reward,
    relative_terms,
    relative_text_direction,
    semantic_relative_reward,
    with_control,
)

__all__ = [
    "RewardModel", "clip_preprocess", "squash_preprocess", "REWARD_LOADERS", "CombinedReward",
    "load_combined_reward", "load_reward_model", "parse_reward_spec", "register_reward", "import_reward_modules", "DEFAULT_UNWANTED_CONTROLS",
    "DEFAULT_WANTED_CONTROLS", "REWARD_FORMS", "combine_scores", "control_embedding", "control_scores", "form_coefficients", "noised_pair", "noised_relative_reward", "relative_terms", "relative_text_direction",
    "semantic_relative_reward", "with_control",
]
