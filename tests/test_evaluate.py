"""evaluate_flux.py on the tiny models: base + a LoRA output + a full fine-tune output."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image

import evaluate_flux
from flux_rl import evaluation, models
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def trained_outputs(tiny_flux, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    lora = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    models.add_lora(lora, rank=4, alpha=4, target_modules=models.DEFAULT_LORA_TARGETS)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)
    models.save_lora(str(root / "lora"), lora)
    full = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    for parameter in full.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    full.save_pretrained(str(root / "full" / "transformer"))
    return str(root / "lora"), str(root / "full")


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    for style in evaluation.HPDV2_STYLES:
        with open(root / f"{style}.json", "w") as f:
            json.dump([f"{style} of a cat", f"{style} of a red car", f"{style} of a lighthouse"], f)
    return str(root)


def test_evaluation_report(tiny_models, tiny_flux, trained_outputs, benchmark_dir, tmp_path):
    output_dir = str(tmp_path / "eval")
    lora_dir, full_dir = trained_outputs
    command = [sys.executable, "evaluate_flux.py", "--pretrained_model_name_or_path", tiny_flux,
               "--models", f"srpo={lora_dir}", f"full={full_dir}", "--hpdv2_benchmark_dir", benchmark_dir,
               "--prompts_per_style", "2", "--reward_models_dir", os.path.join(tiny_models, "rewards"),
               "--output_dir", output_dir, "--resolution", "64", "--num_inference_steps", "2",
               "--max_sequence_length", "32", "--batch_size", "3", "--num_grid_prompts", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]

    rows = list(csv.DictReader(open(os.path.join(output_dir, "scores.csv"))))
    assert len(rows) == 3 * 4 * 2
    assert {r["model"] for r in rows} == {"base", "srpo", "full"}
    table = open(os.path.join(output_dir, "table.md")).read()
    for style in ("all prompts", *evaluation.HPDV2_STYLES):
        assert f"### {style}" in table
    for model in ("base", "srpo", "full"):
        lines = [line for line in table.splitlines() if line.startswith(f"| {model} |")]
        assert len(lines) == 5
        for line in lines:
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == 2 + len(evaluation.METRICS) and "nan" not in cells
    header = next(line for line in table.splitlines() if line.startswith("| model |"))
    assert all(metric in header for metric in evaluation.METRICS)
    # Same seed, different weights: the trained outputs' images differ from the base's.
    base = Image.open(os.path.join(output_dir, "images", "base", "photo", "00000.png"))
    srpo = Image.open(os.path.join(output_dir, "images", "srpo", "photo", "00000.png"))
    assert base.tobytes() != srpo.tobytes()
    grid = Image.open(os.path.join(output_dir, "grids", "photo.png"))
    assert grid.size == (3 * 64, 2 * 64)
    assert os.path.getsize(os.path.join(output_dir, "distributions.png")) > 1000

    # Resumable: a second run keeps every image that exists.
    mtimes = {p: os.path.getmtime(p) for p in _images(output_dir)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert mtimes == {p: os.path.getmtime(p) for p in _images(output_dir)}


def _images(output_dir):
    return [os.path.join(d, f) for d, _, files in os.walk(os.path.join(output_dir, "images")) for f in files]


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of"),
        (["--prompt_file", "p.txt", "--metrics", "hpsv2,fid"], "unknown metric 'fid'"),
        (["--prompt_file", "p.txt", "--models", "x=/does/not/exist"], "is not a folder"),
        (["--prompt_file", "p.txt", "--batch_size", "0"], "--batch_size must be at least 1"),
        (["--prompt_file", "p.txt", "--guidance_scale", "-1"], "--guidance_scale must be non-negative"),
    ],
)
def test_bad_evaluation_flags(extra, message):
    with pytest.raises(ValueError, match=message):
        evaluate_flux.parse_args(["--pretrained_model_name_or_path", "x"] + extra)
