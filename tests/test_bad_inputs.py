"""Bad input ends in one line that says what to change, exit status 2, before FLUX loads, with
nothing in --output_dir changed. Parse-time mistakes through parse_args; the ones found while the
run starts (prompts, image folder, reward weights) through `python train_srpo_flux.py` as a user runs it."""

import os
import subprocess
import sys
import time

import pytest

import train_srpo_flux
from tests.conftest import REPO_ROOT
from tests.launch import LAUNCH_TIMEOUT, tiny_args


def write(path, data: bytes = b""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


PARSE_TIME = [
    ("nan learning rate", lambda tmp: ["--learning_rate", "nan"], "--learning_rate nan: give a finite number"),
    ("infinite guidance", lambda tmp: ["--rollout_guidance", "inf"], "--rollout_guidance inf: give a finite number"),
    ("FLUX folder without model_index.json", lambda tmp: ["--pretrained_model_name_or_path", os.path.dirname(write(f"{tmp}/flux/x"))],
     "no model_index.json in it; name a FluxPipeline folder"),
    ("output dir is a file", lambda tmp: ["--output_dir", write(f"{tmp}/out.txt")], "is a file; name a folder"),
    ("output dir under a file", lambda tmp: ["--output_dir", write(f"{tmp}/file") + "/run"], "is a file, so no folder can be made under it"),
    ("garbage LoRA to start from", lambda tmp: ["--init_lora_weights", write(f"{tmp}/lora.safetensors", b"\x00" * 64)],
     "not a LoRA file that FluxPipeline.load_lora_weights reads"),
]


@pytest.mark.parametrize("name, flags, message", PARSE_TIME, ids=[row[0] for row in PARSE_TIME])
def test_parse_time_mistakes(name, flags, message, tiny_flux, tmp_path):
    extra = flags(str(tmp_path))
    base = ["--pretrained_model_name_or_path", tiny_flux, "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError) as error:
        train_srpo_flux.parse_args(base + extra)
    assert message in str(error.value) and "\n" not in str(error.value)


def corrupt_hps(tiny_models, tmp):
    """A copy of the tiny reward folders whose HPSv2.1 file is cut short, as a failed download leaves it."""
    import shutil

    folder = f"{tmp}/rewards"
    shutil.copytree(os.path.join(tiny_models, "rewards", "hpsv2"), f"{folder}/hpsv2")
    path = f"{folder}/hpsv2/HPS_v2.1_compressed.pt"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return ["--reward_models_dir", folder, "--reward", "hpsv2:1.0"]


STARTUP = [
    ("empty prompt file", lambda models, tmp: ["--dataset_name", write(f"{tmp}/prompts.txt")], "prompts.txt: the file is empty"),
    ("corrupt json prompts", lambda models, tmp: ["--dataset_name", write(f"{tmp}/prompts.json", b'{"prompt": "a cat"')],
     "prompts.json: not a readable json file"),
    ("empty image folder", lambda models, tmp: ["--train_data_dir", os.path.dirname(write(f"{tmp}/images/.keep"))],
     "not an image folder datasets reads"),
    ("damaged reward weights", corrupt_hps, "reward 'hpsv2': its weights in"),
    ("a reward loader returning None", lambda models, tmp: [
        "--reward_module", write(f"{tmp}/mine.py", b"from rewards import register_reward\nregister_reward('nothing', lambda source, device, dtype: None)\n"),
        "--reward", "nothing:1.0"], "reward 'nothing': its loader returned NoneType, not a rewards.RewardModel"),
]


@pytest.mark.parametrize("name, flags, message", STARTUP, ids=[row[0] for row in STARTUP])
def test_mistakes_found_at_start_are_one_line(name, flags, message, tiny_models, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    command = [sys.executable, "train_srpo_flux.py", *tiny_args(tiny_models, str(output_dir), "--report_to", "none"),
               *flags(tiny_models, str(tmp_path))]
    started = time.time()
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT),
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    seconds = time.time() - started
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(output_dir)) == ["notes.txt"], "nothing may be written before the input is known good"
    print(f"{name}: {seconds:.1f} s to the line")
