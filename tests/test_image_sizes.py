"""Any size and aspect ratio (--resolution HEIGHT,WIDTH, --resolution_buckets): the rollout equals
FluxPipeline's at a non-square size, each batch trains at one bucket drawn reproducibly from (seed,
step), and the validation images come out at the size asked for."""

import os
import subprocess
import sys
from argparse import Namespace

from PIL import Image

from benchmarks.learning_curves import LearningRun, train
from flux_rl import data, latents
from tests.conftest import REPO_ROOT
from tests.launch import LAUNCH_TIMEOUT, tiny_args

BUCKETS = [(64, 64), (48, 80), (80, 48)]


def test_the_bucket_of_a_step_depends_on_seed_and_step_alone():
    args = Namespace(resolution=(64, 64), resolution_buckets=BUCKETS, seed=3)
    sizes = [data.image_size(args, step) for step in range(90)]
    assert sizes == [data.image_size(args, step) for step in range(90)]  # a resumed run draws the same
    assert all(sizes.count(bucket) >= 20 for bucket in BUCKETS)  # each about a third of the steps
    assert sizes != [data.image_size(Namespace(**{**vars(args), "seed": 4}), step) for step in range(90)]
    assert data.image_size(Namespace(resolution=(48, 80), resolution_buckets=None, seed=3), 5) == (48, 80)


def test_offline_images_are_cropped_to_the_size(tmp_path):
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    assert data.image_to_tensor(image, (48, 80)).shape == (3, 48, 80)
    assert data.image_to_tensor(image, (80, 48)).shape == (3, 80, 48)
    assert data.image_to_tensor(image, (64, 64)).shape == (3, 64, 64)


def test_a_non_square_run_end_to_end(tiny_models, tmp_path):
    """`python train_srpo_flux.py --resolution 48,80`: trains and renders its validation images 48 high, 80 wide
    (--validation_resolution: see the next test)."""
    for flags, size in ((["--resolution", "48,80"], (80, 48)),):
        output_dir = tmp_path / "run"
        command = [sys.executable, "train_srpo_flux.py", *tiny_args(tiny_models, str(output_dir), "--max_train_steps", "2",
                                                                     "--validation_prompt", "a photo of a cat", "--report_to", "none"),
                   *flags]
        result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT),
                                capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "rollout 3 steps at 48x80" in result.stderr
        for step in (0, 2):  # PIL sizes are (width, height)
            assert Image.open(output_dir / "validation" / f"step-{step:06d}.png").size == size
        assert (output_dir / "pytorch_lora_weights.safetensors").exists()


def test_each_step_trains_at_its_bucket(tiny_models, tmp_path, monkeypatch):
    """Direct-Align and offline SRPO over three buckets: every decode of a step (rollout image and training
    branch alike) is at the bucket data.image_size gives that step; validation at the size asked for."""
    decoded = []
    original_decode = latents.decode

    def recording_decode(vae, packed, height, width, vae_scale_factor):
        images = original_decode(vae, packed, height, width, vae_scale_factor)
        decoded.append(tuple(images.shape[-2:]))
        return images

    monkeypatch.setattr(latents, "decode", recording_decode)
    buckets = ["--resolution_buckets", *(f"{h},{w}" for h, w in BUCKETS), "--validation_resolution", "48,80",
               "--validation_prompt", "a cat"]
    for script, extra in (("train_direct_align", ["--reward", "toy_brightness:1.0"]),
                          ("train_srpo_flux", ["--reward", "toy_brightness:1.0", "--train_data_dir", "{offline_images}"])):
        decoded.clear()
        output_dir = str(tmp_path / script)
        train(LearningRun(script, (*extra, *buckets), "brightness", 1), tiny_models, output_dir, steps=6)
        args = Namespace(resolution=BUCKETS[0], resolution_buckets=BUCKETS, seed=7)
        expected = [data.image_size(args, step) for step in range(6)]
        assert len(set(expected)) > 1, expected  # the run does cover several sizes
        # validation renders 48 x 80 before the first step and after the last; every decode between is a step's (the
        # rollout's drift monitor and the training branches; how many per step varies): in the order of the steps.
        assert decoded[0] == decoded[-1] == (48, 80)
        assert runs(decoded[1:-1]) == runs(expected), (script, decoded)
        assert Image.open(os.path.join(output_dir, "validation", "step-000006.png")).size == (80, 48)


def runs(sizes):
    """The sizes with repeats in a row merged: [a, a, b, a] -> [a, b, a]."""
    return [size for i, size in enumerate(sizes) if i == 0 or sizes[i - 1] != size]
