"""`--report_to tensorboard,wandb`: TensorBoard and W&B (offline) receive the same losses, rewards and
validation images."""

import glob
import math
import os

from tests.launch import launch, tiny_args
from tests.tensorboard_logs import scalar_tags
from tests.wandb_records import history


def test_tensorboard_and_wandb_log_the_same_run(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: the run is written to WANDB_DIR
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    output_dir = str(tmp_path / "run")
    launch("train_direct_align.py", tiny_args(
        tiny_models, output_dir, "--max_train_steps", "2", "--rank", "4", "--report_to", "tensorboard,wandb",
        "--validation_prompt", "a cat", "--validation_steps", "1",
    ))
    (run_dir,) = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
    wandb_values, tensorboard_values = history(run_dir), scalar_tags(output_dir)

    for key in ("loss", "reward", "reward/hpsv2", "grad_norm", "lr"):
        assert len(wandb_values[key]) == 2, key
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8) for a, b in zip(wandb_values[key], tensorboard_values[key])), key
    assert wandb_values["_step"] == [0, 1, 2]  # step 0: the untrained model's validation image
    # One captioned validation image per validation step, stored with the run.
    assert wandb_values["validation/count"] == [1, 1, 1]
    assert all(caption[0].startswith("a cat | ") for caption in wandb_values["validation/captions"])
    for (filename,) in wandb_values["validation/filenames"]:
        assert os.path.getsize(os.path.join(run_dir, "files", filename)) > 0
