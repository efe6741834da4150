import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny FLUX pipeline and reward folders, written once per test session."""
    from flux_rl.tiny_models import write_all

    return write_all(str(tmp_path_factory.mktemp("tiny-models")))


@pytest.fixture(scope="session")
def tiny_flux(tiny_models):
    return os.path.join(tiny_models, "flux")


@pytest.fixture(scope="session")
def tiny_rewards(tiny_models):
    return os.path.join(tiny_models, "rewards")


@pytest.fixture(scope="session")
def lora_run(tiny_models, tmp_path_factory):
    """A 5-step Direct-Align LoRA run through `accelerate launch`, checkpointing every step; its
    checkpoints and final weights are what the resume tests (and the preemption test) must reach."""
    from tests.launch import launch, tiny_args

    output_dir = str(tmp_path_factory.mktemp("direct-align-lora"))
    launch("train_direct_align.py", tiny_args(
        tiny_models, output_dir, "--max_train_steps", "5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
        "--validation_prompt", "a cat", "a dog", "--validation_steps", "2", "--num_injections", "2",
        "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--rank", "4", "--lora_alpha", "8",
    ))
    return output_dir
