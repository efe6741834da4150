"""Reward models by name, and the `--reward` spec string that weights and combines them.

    --reward "hpsv2:1.0,pickscore:0.05"

Each loader imports its heavy dependencies only when called. A model is read from
`<reward_models_dir>/<name>/` when that folder exists (the tiny test models, or real weights
downloaded beforehand), else from its public source. Rewards of your own: a module that calls
`register_reward` when imported, passed as `--reward_module` (README, "Your own reward").
"""

import contextlib
import importlib
import pickle
import importlib.util
import os
import re
import sys
import traceback

import torch

from .aesthetic import load_aesthetic
from .analytic import load_toy_brightness, load_toy_colour
from .base import RewardModel
from .hpsv3 import load_hpsv3
from .image_reward import load_image_reward
from .open_clip_rewards import load_clip_score, load_hpsv2
from .pickscore import load_pickscore

REWARD_LOADERS = {
    "hpsv2": load_hpsv2,
    "pickscore": load_pickscore,
    "clip": load_clip_score,
    "aesthetic": load_aesthetic,
    "imagereward": load_image_reward,
    "hpsv3": load_hpsv3,
    # Formulas of known optimum, no weights (rewards/analytic.py): the learning tests and the tiny quick start.
    "toy_brightness": load_toy_brightness,
    "toy_colour": load_toy_colour,
}
BUILT_IN_REWARDS = tuple(REWARD_LOADERS)


class RewardLoadError(ValueError):
    """A reward that does not load from its local files, or a loader of one's own that returns no RewardModel:
    the trainers show it in one line (training.setup turns it into a ConfigurationError)."""


def register_reward(name: str, loader) -> None:
    """`--reward name` loads with `loader(source, device=..., dtype=...)`, which returns a
    RewardModel; `source` is `<reward_models_dir>/<name>` when that folder exists, else None.
    Registering a name again replaces it (a module imported twice); built-in names are kept."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise ValueError(f"reward name {name!r}: use lowercase letters, digits and _ (it is written in --reward 'name:weight')")
    if name in BUILT_IN_REWARDS:
        raise ValueError(f"reward name '{name}' is built in; register yours under another name")
    REWARD_LOADERS[name] = loader


def import_reward_modules(modules) -> None:
    """--reward_module: each a Python file (my_rewards.py) or an importable module
    (my_package.rewards) whose import registers its rewards with `register_reward`."""
    for module in modules or []:
        try:
            if module.endswith(".py") or os.path.sep in module:
                if not os.path.isfile(module):
                    raise ValueError("no such file")
                module_name = f"reward_module_{re.sub(r'[^0-9a-zA-Z_]', '_', os.path.abspath(module))}"
                spec = importlib.util.spec_from_file_location(module_name, module)
                loaded = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = loaded  # classes defined in it pickle and show their module
                spec.loader.exec_module(loaded)
            else:
                importlib.import_module(module)
        except Exception as error:  # whatever the user's module raised: one line naming the module and the line
            frames = traceback.extract_tb(error.__traceback__)
            where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if len(frames) > 1 else ""
            raise ValueError(f"--reward_module {module}: {type(error).__name__}: {error}{where}".replace("\n", " ")) from None


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'hpsv2:1.0,pickscore:0.5' -> [('hpsv2', 1.0), ('pickscore', 0.5)]; a bare name weighs 1."""
    if not spec or not spec.strip():
        raise ValueError("empty --reward spec; give e.g. --reward hpsv2:1.0")
    components = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        name = name.strip().lower()
        if "=" in name and ":" not in part:
            raise ValueError(f"--reward '{spec}': write each reward as name:weight, e.g. {name.replace('=', ':')}")
        if name not in REWARD_LOADERS:
            raise ValueError(f"unknown reward '{name}' in --reward '{spec}'; choose from {', '.join(REWARD_LOADERS)} "
                             "(or register your own with --reward_module)")
        try:
            weight = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight '{weight}' of reward '{name}' is not a number; write e.g. {name}:0.5") from None
        if any(name == seen for seen, _ in components):
            raise ValueError(f"reward '{name}' appears twice in --reward '{spec}'; give each reward once")
        components.append((name, weight))
    return components


def load_reward_model(name: str, reward_models_dir: str | None = None, device="cpu", dtype=torch.float32):
    if name not in REWARD_LOADERS:
        raise ValueError(f"unknown reward '{name}'; choose from {', '.join(REWARD_LOADERS)}")
    source = None
    if reward_models_dir:
        candidate = os.path.join(reward_models_dir, name)
        source = candidate if os.path.exists(candidate) else None
    try:
        model = REWARD_LOADERS[name](source, device=device, dtype=dtype)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        if source is None:  # from the Hub: the trainers' loading context says what to do about a failed download
            raise
        # Damaged or half-downloaded weights in --reward_models_dir: torch.load, safetensors or transformers fail deep inside.
        raise RewardLoadError(f"reward '{name}': its weights in {source} do not load ({type(error).__name__}: "
                              f"{(str(error).splitlines() or [''])[0][:200]}); fetch them again with python -m rewards.download "
                              f"--names {name}") from None
    if not isinstance(model, RewardModel):
        raise RewardLoadError(f"reward '{name}': its loader returned {type(model).__name__}, not a rewards.RewardModel")
    return model.eval().requires_grad_(False)  # a reward is never trained (a module of one's own may forget it)


class CombinedReward(torch.nn.Module):
    """sum_i w_i * reward_i(images, prompts); each component is also returned under its name."""

    def __init__(self, models: dict, weights: dict):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)
        self.weights = dict(weights)

    def compile_image_towers(self, backend: str = "inductor", mode: str | None = None, required: bool = True) -> None:
        """`required=False`: models that name no image_tower() (rewards of one's own need not) stay eager."""
        for model in self.models.values():
            if required or model.image_tower() is not None:
                model.compile_image_tower(backend, mode)

    def forward(self, images, prompts):
        components = {name: model(images, prompts) for name, model in self.models.items()}
        total = sum(self.weights[name] * value for name, value in components.items())
        return total, components


def load_combined_reward(spec: str, reward_models_dir=None, device="cpu", dtype=torch.float32, loading=None) -> CombinedReward:
    """`loading(name)`: a context manager around each model's load (the trainers turn a failed
    download into a one-line error naming the reward)."""
    components = parse_reward_spec(spec)
    models = {}
    for name, _ in components:
        with loading(name) if loading else contextlib.nullcontext():
            models[name] = load_reward_model(name, reward_models_dir, device, dtype)
    return CombinedReward(models, dict(components))
