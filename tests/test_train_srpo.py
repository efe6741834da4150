"""train_srpo_flux.py end to end through `accelerate launch` on the tiny models."""

import json
import math
import os
import shutil

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image

from tests.launch import launch, tiny_args
from tests.tensorboard_logs import scalar_tags

SCRIPT = "train_srpo_flux.py"


def test_online_lora_batch_two(tiny_models, tiny_flux, tmp_path):
    output_dir = str(tmp_path / "srpo")
    launch(SCRIPT, tiny_args(tiny_models, output_dir, "--max_train_steps", "3", "--train_batch_size", "2",
                             "--validation_prompt", "a cat", "a red car", "--num_validation_images", "3", "--rank", "4"))
    tags = scalar_tags(output_dir)
    for tag in ["loss", "grad_norm", "lr", "step_time", "denoise/score", "inversion/score", "denoise/k", "inversion/k",
                "denoise/hpsv2/wanted", "denoise/hpsv2/unwanted", "inversion/hpsv2/wanted", "drift/saturation",
                "drift/brightness", "drift/high_frequency", "validation/reward"]:
        assert tag in tags, f"{tag} not logged; got {sorted(tags)}"
        assert all(math.isfinite(v) for v in tags[tag]), tag
    assert len(tags["loss"]) == 3
    # The inversion branch's k follows 0.3 -> 0.01, the denoise branch's 0.1 -> 0.25.
    assert all(0.01 <= k <= 0.3 for k in tags["inversion/k"]) and all(0.1 <= k <= 0.25 for k in tags["denoise/k"])
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(output_dir)
    grid = Image.open(os.path.join(output_dir, "validation", "step-000003.png"))
    assert grid.size == (3 * 64, 2 * 64)  # a row per prompt, a column per seed
    # Below each tile's caption (its reward): validation_seed + i gives three different images of "a cat".
    tiles = [grid.crop((64 * column, 16, 64 * (column + 1), 64)).tobytes() for column in range(3)]
    assert len(set(tiles)) == 3


def test_lora_starts_from_a_trained_one(lora_run, tiny_models, tmp_path):
    """--init_lora_weights: the untrained run's step-0 validation images are those the LoRA it
    starts from rendered at its end (lora_run: Direct-Align, rank 4, alpha 8, same prompts and
    seeds); a rank or alpha other than the file's is refused before loading."""
    import numpy as np
    import pytest

    import train_srpo_flux

    output_dir = str(tmp_path / "continued")
    launch(SCRIPT, tiny_args(tiny_models, output_dir, "--max_train_steps", "1", "--rank", "4", "--lora_alpha", "8",
                             "--init_lora_weights", lora_run, "--validation_prompt", "a cat", "a dog"))
    started, earlier = (np.asarray(Image.open(os.path.join(folder, "validation", name)))
                        for folder, name in ((output_dir, "step-000000.png"), (lora_run, "step-000005.png")))
    assert np.array_equal(started, earlier)
    base = ["--pretrained_model_name_or_path", "x", "--init_lora_weights", lora_run]
    with pytest.raises(ValueError, match="has rank 4; pass --rank 4"):
        train_srpo_flux.parse_args(base)
    with pytest.raises(ValueError, match="was trained with lora_alpha 8.0; pass --lora_alpha 8"):
        train_srpo_flux.parse_args(base + ["--rank", "4"])
    with pytest.raises(ValueError, match="no such file or folder"):
        train_srpo_flux.parse_args(["--pretrained_model_name_or_path", "x", "--init_lora_weights", "./no/such/lora"])


def test_full_finetune(tiny_models, tiny_flux, tmp_path):
    """As the release: fp32 master weights under bf16 autocast; the final model is saved in bf16
    (half the bytes; the checkpoints keep fp32) and loads as diffusers' own."""
    from safetensors.torch import load_file

    output_dir = str(tmp_path / "srpo-full")
    launch(SCRIPT, tiny_args(tiny_models, output_dir, "--max_train_steps", "2", "--full_finetune", "--learning_rate", "1e-2",
                             "--reward_form", "srp", "--control_mode", "average", "--mixed_precision", "bf16"))
    saved = load_file(os.path.join(output_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    trained = FluxTransformer2DModel.from_pretrained(os.path.join(output_dir, "transformer")).state_dict()
    original = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer")).state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in trained)


def test_offline_srpo_on_pngs(tiny_models, tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    with open(image_dir / "metadata.jsonl", "w") as f:
        for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            Image.new("RGB", (80, 96), colour).save(image_dir / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "prompt": f"a plain colour field number {i}"}) + "\n")
    # FLUX by hub id from a --cache_dir laid out as huggingface_hub caches a download (offline)
    cache_dir = tmp_path / "hf-cache"
    commit = "0" * 40
    (cache_dir / "models--tiny-org--flux" / "refs").mkdir(parents=True)
    (cache_dir / "models--tiny-org--flux" / "refs" / "main").write_text(commit)
    shutil.copytree(os.path.join(tiny_models, "flux"), cache_dir / "models--tiny-org--flux" / "snapshots" / commit)
    output_dir = str(tmp_path / "offline")
    launch(SCRIPT, tiny_args(tiny_models, output_dir, "--max_train_steps", "2", "--train_data_dir", str(image_dir),
                             "--train_batch_size", "2", "--rank", "4",
                             "--pretrained_model_name_or_path", "tiny-org/flux", "--cache_dir", str(cache_dir),
                             "--offload_text_encoders"))  # prompts read ahead from the image dataset's column
    tags = scalar_tags(output_dir)
    assert len(tags["loss"]) == 2 and "inversion/score" in tags
    assert os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    assert os.listdir(cache_dir / "imagefolder"), "datasets' cache of the image folder belongs in --cache_dir too"


def test_aesthetic_relative_form(tiny_models, tmp_path):
    output_dir = str(tmp_path / "aesthetic")
    launch(SCRIPT, tiny_args(tiny_models, output_dir, "--max_train_steps", "2", "--reward", "aesthetic:1.0",
                             "--loss_type", "neg", "--rank", "4"))
    tags = scalar_tags(output_dir)
    assert "denoise/aesthetic" in tags and "inversion/aesthetic" in tags
    assert "denoise/aesthetic/wanted" not in tags  # image-only: the S1 form, no control phrases
