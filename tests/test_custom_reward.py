"""A reward of one's own (--reward_module): README's example file, registered by name, trains
SRPO through `accelerate launch`, scores as its formula says, and serves as an evaluation metric."""

import os
import re

import pytest
import torch

import evaluate_flux
import rewards
from flux_rl import evaluation
from rewards.registry import REWARD_LOADERS
from tests.conftest import REPO_ROOT
from tests.launch import launch, tiny_args
from tests.tensorboard_logs import scalar_tags


@pytest.fixture(autouse=True)
def registry_as_before():
    """Registering is global to the process (pytest's worker): undo it after each test."""
    before = dict(REWARD_LOADERS)
    yield
    REWARD_LOADERS.clear()
    REWARD_LOADERS.update(before)


@pytest.fixture
def readme_reward(tmp_path, tiny_rewards):
    """README's my_rewards.py, and a --reward_models_dir whose clip_l/ is a (tiny) transformers CLIP
    with its processor: the tiny PickScore folder, whose score is exp(logit_scale) times that cosine."""
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    (code,) = re.findall(r"```python\n(# my_rewards\.py.*?)```", readme, re.S)
    module = tmp_path / "my_rewards.py"
    module.write_text(code)
    models_dir = tmp_path / "rewards"
    models_dir.mkdir()
    os.symlink(os.path.join(tiny_rewards, "pickscore"), models_dir / "clip_l")
    os.symlink(os.path.join(tiny_rewards, "hpsv2"), models_dir / "hpsv2")
    return str(module), str(models_dir)


def test_readme_reward_scores_as_its_formula(readme_reward, tiny_rewards):
    module, models_dir = readme_reward
    rewards.import_reward_modules([module])
    clip_l = rewards.load_reward_model("clip_l", models_dir)
    pickscore = rewards.load_reward_model("pickscore", tiny_rewards)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    prompts = ["a photo of a cat", "a red car on a long empty road at dawn"]  # different lengths: padding
    score = clip_l(images, prompts)
    torch.testing.assert_close(score * pickscore.logit_scale, pickscore(images, prompts), rtol=1e-5, atol=1e-5)
    assert -1 <= score.min() and score.max() <= 1  # a cosine
    score.sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable in the images
    assert not any(p.requires_grad for p in clip_l.parameters())  # frozen by load_reward_model
    assert rewards.semantic_relative_reward(clip_l, images, prompts, "Real", "Painting").shape == (2,)  # Eq. 9-11 forms


def test_srpo_trains_on_readme_reward(readme_reward, tiny_models, tmp_path):
    module, models_dir = readme_reward
    output_dir = str(tmp_path / "run")
    launch("train_srpo_flux.py", tiny_args(
        tiny_models, output_dir, "--reward_models_dir", models_dir, "--reward_module", module,
        "--reward", "clip_l:1.0,hpsv2:0.5", "--max_train_steps", "2", "--rank", "4",
        "--validation_prompt", "a cat", "--validation_steps", "2",
    ))
    logged = scalar_tags(output_dir)
    for branch in ("denoise", "inversion"):  # each model's score against the wanted and the unwanted phrase
        for name in ("clip_l", "hpsv2"):
            assert len(logged[f"{branch}/{name}/wanted"]) == 2 and len(logged[f"{branch}/{name}/unwanted"]) == 2
        assert logged[f"{branch}/clip_l/wanted"] != logged[f"{branch}/hpsv2/wanted"]
        assert all(-1 <= value <= 1 for value in logged[f"{branch}/clip_l/wanted"])  # cosines
    assert os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    assert "reward_module" in open(os.path.join(output_dir, "README.md")).read()  # the model card records it


def test_readme_reward_is_an_evaluation_metric(readme_reward, tmp_path):
    module, models_dir = readme_reward
    (tmp_path / "p.txt").write_text("a cat\n")
    args = evaluate_flux.parse_args(["--pretrained_model_name_or_path", "x", "--prompt_file", str(tmp_path / "p.txt"),
                                     "--reward_module", module, "--metrics", "clip_l,hpsv2", "--reward_models_dir", models_dir])
    metric_models = evaluate_flux.load_metric_models(args, "cpu", torch.float32)
    scores = evaluation.score_images(metric_models, torch.rand(2, 3, 64, 64), ["a cat", "a dog"])
    assert set(scores) == {"clip_l", "hpsv2"} and len(scores["clip_l"]) == 2
    rows = [{"model": "base", "style": "prompts", "clip_l": value, "hpsv2": 0.2} for value in scores["clip_l"]]
    assert "- `clip_l`: a reward of your own (--reward_module)" in evaluation.summary_table(rows, ["clip_l", "hpsv2"], ["base"])


class _ImageOnly(rewards.RewardModel):
    name = "brightness"
    uses_text = False

    def forward(self, images, prompts=None):
        return images.mean((1, 2, 3))


class _WithTower(_ImageOnly):
    name = "towered"

    def __init__(self):
        super().__init__()
        self.tower = torch.nn.Linear(3, 1)

    def image_tower(self):
        return self.tower


def test_an_image_only_reward_takes_the_appendix_form():
    rewards.register_reward("brightness", lambda source, device, dtype: _ImageOnly())
    model = rewards.load_reward_model("brightness")
    images = torch.full((1, 3, 8, 8), 0.5)
    noise_std, generator = 0.1, torch.Generator().manual_seed(3)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    expected = 0.5 - (images + noise_std * noise).clamp(0, 1).mean()  # R(x) - R(x + noise), appendix S1
    torch.testing.assert_close(rewards.noised_relative_reward(model, images, None, noise_std, generator), expected.reshape(1))
    with pytest.raises(ValueError, match="--compile_reward: reward 'brightness' names no image_tower"):
        rewards.CombinedReward({"brightness": model}, {"brightness": 1.0}).compile_image_towers("aot_eager")
    # Under --compile alone (--compile_reward not given) such a reward stays eager beside the compiled ones.
    towered = _WithTower()
    rewards.CombinedReward({"brightness": model, "towered": towered}, {"brightness": 1.0, "towered": 1.0}).compile_image_towers(
        "aot_eager", required=False)
    assert towered.tower._compiled_call_impl is not None  # what nn.Module.compile sets
    torch.testing.assert_close(model(images, None), torch.tensor([0.5]))


@pytest.mark.parametrize("module_text, spec, message", [
    (None, "hpsv2", r"--reward_module .*missing\.py: ValueError: no such file"),
    ("import torch\nraise ImportError('needs somepackage')", "hpsv2", r"--reward_module .*: ImportError: needs somepackage \(at mine.py:2\)"),
    ("from rewards import register_reward\nregister_reward('hpsv2', print)", "hpsv2", "reward name 'hpsv2' is built in"),
    ("from rewards import register_reward\nregister_reward('My-Reward', print)", "hpsv2", "reward name 'My-Reward': use lowercase"),
    ("", "sharpness:1.0", r"unknown reward 'sharpness' .*\(or register your own with --reward_module\)"),
])
def test_bad_reward_modules_fail_at_parse_time(module_text, spec, message, tmp_path, tiny_rewards):
    import train_direct_align

    module = tmp_path / ("missing.py" if module_text is None else "mine.py")
    if module_text is not None:
        module.write_text(module_text)
    with pytest.raises(ValueError, match=message):
        train_direct_align.parse_args(["--pretrained_model_name_or_path", "x", "--reward_models_dir", tiny_rewards,
                                       "--output_dir", str(tmp_path / "out"), "--reward_module", str(module), "--reward", spec])


def test_a_loader_must_return_a_reward_model():
    rewards.register_reward("plain", lambda source, device, dtype: torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="reward 'plain': its loader returned Linear, not a rewards.RewardModel"):
        rewards.load_reward_model("plain")
