"""README's quick start, step 2, as a newcomer runs it (tiny models, SRPO on the analytic toy_colour
reward, `python train_srpo_flux.py ...`): the validation images must visibly change and the validation
reward rise, as README says they do, and the run ends with the line naming what it wrote."""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.launch import LAUNCH_TIMEOUT
from tests.tensorboard_logs import scalar_tags


def quick_start_flags() -> list[str]:
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    line = next(line for line in quick_start.splitlines() if "train_srpo_flux.py" in line)
    tokens = shlex.split(line.split("&&")[-1])
    return tokens[tokens.index("train_srpo_flux.py") + 1 :]


def test_readme_quick_start_changes_the_images(tiny_models, tmp_path):
    flags = quick_start_flags()
    # The fixture's tiny models and a temporary folder in place of the README's relative paths.
    paths = {"--pretrained_model_name_or_path": os.path.join(tiny_models, "flux"),
             "--reward_models_dir": os.path.join(tiny_models, "rewards"), "--output_dir": str(tmp_path / "srpo-smoke")}
    flags = [paths.get(previous, flag) for previous, flag in zip([None] + flags, flags)]
    result = subprocess.run([sys.executable, "train_srpo_flux.py", *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT), timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    output_dir = paths["--output_dir"]
    assert result.stdout.strip().splitlines()[-1] == (
        f"saved LoRA weights to {output_dir}/pytorch_lora_weights.safetensors, the model card to {output_dir}/README.md, logs to "
        f"{output_dir}/logs (tensorboard --logdir {output_dir}/logs), validation images to {output_dir}/validation")
    steps = int(flags[flags.index("--max_train_steps") + 1])
    before, after = (np.asarray(Image.open(os.path.join(output_dir, "validation", f"step-{step:06d}.png"))).astype(float)
                     for step in (0, steps))
    assert np.abs(after - before).mean() > 10, "the validation images should visibly change (mean difference in uint8 levels)"
    rewards = scalar_tags(output_dir)["validation/reward"]
    assert rewards[-1] > rewards[0] + 0.05, f"the validation reward should rise: {rewards}"
    # Readable as any new file here (safetensors writes 0600, which another account serving the LoRA could not read).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(output_dir, "pytorch_lora_weights.safetensors")).st_mode & 0o777 == 0o666 & ~umask
