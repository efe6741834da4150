import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


def made_once(tmp_path_factory, name: str, make) -> str:
    """A folder that `make(folder)` fills once per test session, shared by pytest-xdist's workers
    (each worker has its own session; the folder sits beside their base folders, behind a lock)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".complete").exists():
            folder.mkdir(exist_ok=True)
            make(str(folder))
            (folder / ".complete").touch()
    return str(folder)


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under pytest-xdist each worker is one of the box's cores: torch's own threads would
    only compete with the other worker's."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny FLUX pipeline and reward folders, written once per test session."""
    from flux_rl.tiny_models import write_all

    return made_once(tmp_path_factory, "tiny-models", write_all)


@pytest.fixture(scope="session")
def tiny_flux(tiny_models):
    return os.path.join(tiny_models, "flux")


@pytest.fixture(scope="session")
def tiny_rewards(tiny_models):
    return os.path.join(tiny_models, "rewards")


@pytest.fixture(scope="session")
def lora_run(tiny_models, tmp_path_factory):
    """A 5-step Direct-Align LoRA run through `accelerate launch`, checkpointing every step; its
    checkpoints and final weights are what the resume tests (and the preemption test) must reach.
    It starts with --overwrite_output_dir in a folder holding an earlier (full fine-tune) run's
    outputs, which must go (test_run_artifacts; rotation would keep checkpoint-999:
    test_checkpoint_rotation_keeps_newest), and a file of the user's, which must stay."""
    from tests.launch import launch, tiny_args

    def train(output_dir):
        for folder in ("checkpoint-999", "transformer", "validation", os.path.join("logs", "direct-align")):
            os.makedirs(os.path.join(output_dir, folder))
        for name in (os.path.join("transformer", "config.json"), os.path.join("validation", "step-000999.png"),
                     os.path.join("logs", "direct-align", "events.out.tfevents.1.earlier-run"), "README.md", "notes.txt"):
            open(os.path.join(output_dir, name), "w").close()
        launch("train_direct_align.py", tiny_args(
            tiny_models, output_dir, "--max_train_steps", "5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "3",
            "--validation_prompt", "a cat", "a dog", "--validation_steps", "2", "--num_injections", "2",
            "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--rank", "4", "--lora_alpha", "8",
            "--overwrite_output_dir", "--hub_model_id", "tiny-org/direct-align-lora",  # named in the card, not pushed
        ))

    return made_once(tmp_path_factory, "direct-align-lora", train)
