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
