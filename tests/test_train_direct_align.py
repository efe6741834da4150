"""train_direct_align.py end to end through `accelerate launch` on the tiny models."""

import glob
import os

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from flux_rl import models
from tests.launch import launch, tiny_args

SCRIPT = "train_direct_align.py"


def test_checkpoint_rotation_keeps_newest(lora_run):
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(lora_run, "checkpoint-*")))
    assert names == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    # The final step's checkpoint (a run continues from it with a higher --max_train_steps) holds the final weights:
    # the adapters as trained there; in the final file lora_B carries alpha / rank (8 / 4, lora_run's), so that readers
    # of the tensors alone (ComfyUI) apply the LoRA at the strength diffusers does.
    final, checkpoint = (load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))
                         for folder in (lora_run, os.path.join(lora_run, "checkpoint-5")))
    assert final.keys() == checkpoint.keys()
    assert all(torch.equal(final[k], checkpoint[k] * (2 if ".lora_B." in k else 1)) for k in final)


def test_run_artifacts(lora_run):
    assert os.path.exists(os.path.join(lora_run, "pytorch_lora_weights.safetensors"))
    assert sorted(os.listdir(os.path.join(lora_run, "validation"))) == ["step-000000.png", "step-000002.png", "step-000004.png", "step-000005.png"]
    events = glob.glob(os.path.join(lora_run, "logs", "**", "events.out.tfevents.*"), recursive=True)
    assert events and not [path for path in events if path.endswith("earlier-run")]  # the earlier run's log is gone
    assert not os.path.exists(os.path.join(lora_run, "transformer"))  # so is its full fine-tune, beside this LoRA
    assert os.path.exists(os.path.join(lora_run, "notes.txt"))  # the user's own file stays
    card = open(os.path.join(lora_run, "README.md")).read()
    assert 'load_lora_weights("tiny-org/direct-align-lora")' in card and "direct-align" in card  # where it will be uploaded
    assert "url: validation/step-000005.png" in card and "![before](validation/step-000000.png)" in card


def test_lora_loads_into_pipeline_and_changes_output(lora_run, tiny_flux):
    state = load_file(os.path.join(lora_run, "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.") for k in state)
    assert any(v.shape[0] == 4 for k, v in state.items() if "lora_A" in k)  # rank survives
    pipe = FluxPipeline.from_pretrained(tiny_flux)

    def generate():
        return pipe("a cat", height=64, width=64, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0), max_sequence_length=32).images

    before = generate()
    pipe.load_lora_weights(lora_run)
    after = generate()
    assert (after - before).abs().max() > 1e-4
    # ...and means there what it meant in training: the run's rank 4 with alpha 8 scales the update by 2,
    # which load_lora_weights reads from the file's metadata (without it, it assumed alpha = rank: half the update).
    trained = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    models.add_lora(trained, rank=4, alpha=8, target_modules=models.DEFAULT_LORA_TARGETS)
    models.load_lora_into(trained, lora_run)  # the adapters exactly as the trainer held them (its resume path)
    pipe.unload_lora_weights()
    pipe.transformer = trained
    assert torch.allclose(generate(), after, atol=1e-6)


def test_full_finetune_run(tiny_models, tiny_flux, tmp_path):
    output_dir = str(tmp_path / "full")
    launch(SCRIPT, tiny_args(tiny_models, output_dir, "--max_train_steps", "2", "--full_finetune", "--learning_rate", "1e-2"))
    trained = FluxTransformer2DModel.from_pretrained(os.path.join(output_dir, "transformer"))
    original = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert changed, "full fine-tune left every weight unchanged"
    assert not os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
