"""Final weights: the LoRA file and the full-model folder hold exactly the state they are given
(under FSDP that is the gathered state, not what the sharded module would report)."""

import os

import torch
from diffusers import FluxTransformer2DModel
from peft.utils import get_peft_model_state_dict

from flux_rl import models


def test_lora_state_dict_matches_peft(tiny_flux):
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    models.add_lora(transformer, 4, 4, models.DEFAULT_LORA_TARGETS)
    ours, peft = models.lora_state_dict(transformer), get_peft_model_state_dict(transformer)
    assert ours.keys() == peft.keys() and len(ours) > 0
    for key in ours:
        assert torch.equal(ours[key], peft[key]), key


def test_lora_on_diffusers_flux_layer_list_loads_into_the_pipeline(tiny_flux, tmp_path):
    """--lora_layers as diffusers' FLUX LoRA example lists them (feed-forward and the single blocks'
    MLP and output too, plus the top-level proj_out): every adapted layer comes back, with its
    weights, through FluxPipeline.load_lora_weights."""
    from diffusers import FluxPipeline

    layers = ("attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
              "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2,proj_mlp,proj_out")
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    models.add_lora(transformer, 4, 4, models.lora_targets(layers))
    torch.manual_seed(0)
    for name, parameter in transformer.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    models.save_lora(str(tmp_path), transformer)
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(str(tmp_path))
    trained = {name.replace(".default", ""): p for name, p in transformer.named_parameters() if "lora_" in name}
    loaded = {name.replace(".default_0", ""): p for name, p in pipe.transformer.named_parameters() if "lora_" in name}
    assert trained.keys() == loaded.keys()
    assert {name.split(".lora_")[0] for name in trained} >= {"proj_out", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp"}
    for name in trained:
        assert torch.equal(trained[name], loaded[name]), name


def test_save_full_model_writes_the_given_state(tiny_flux, tmp_path):
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    state["proj_out.bias"] = torch.full_like(state["proj_out.bias"], 0.25)  # differs from the module's own state
    models.save_full_model(str(tmp_path / "transformer"), transformer, state_dict=state)
    reloaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "transformer")).state_dict()
    assert reloaded.keys() == state.keys()
    for key in state:
        assert torch.equal(reloaded[key], state[key]), key


def test_save_full_model_shards_load_back(tiny_flux, tmp_path):
    """A 12B model is written in several shards with an index; from_pretrained reads them back."""
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    models.save_full_model(str(tmp_path), transformer, max_shard_size="50KB")
    shards = [name for name in os.listdir(tmp_path) if name.endswith(".safetensors")]
    assert len(shards) > 1 and "diffusion_pytorch_model.safetensors.index.json" in os.listdir(tmp_path)
    reloaded = FluxTransformer2DModel.from_pretrained(str(tmp_path)).state_dict()
    for key, value in transformer.state_dict().items():
        assert torch.equal(reloaded[key], value), key


def test_publish_replaces_whole_or_not_at_all(tmp_path):
    """The final weights go in by a rename: a write that dies halfway leaves the previous copy as it
    was (a file, or a folder of shards), and a finished one replaces it whole."""
    import pytest

    from flux_rl.checkpoints import publish

    (tmp_path / "weights.safetensors").write_text("previous")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "shard-1").write_text("previous")

    def dies_halfway(name):
        def write(folder):
            target = os.path.join(folder, name)
            if name == "transformer":
                os.makedirs(target)
                target = os.path.join(target, "shard-1")
            with open(target, "w") as f:
                f.write("half")
            raise OSError("No space left on device")
        return write

    for name in ("weights.safetensors", "transformer"):
        with pytest.raises(OSError):
            publish(str(tmp_path), name, dies_halfway(name))
    assert (tmp_path / "weights.safetensors").read_text() == "previous"
    assert (tmp_path / "transformer" / "shard-1").read_text() == "previous"

    publish(str(tmp_path), "weights.safetensors", lambda folder: open(os.path.join(folder, "weights.safetensors"), "w").write("new"))
    publish(str(tmp_path), "transformer", lambda folder: os.makedirs(os.path.join(folder, "transformer", "shard-2")))
    assert (tmp_path / "weights.safetensors").read_text() == "new"
    assert os.listdir(tmp_path / "transformer") == ["shard-2"]  # the old shards do not linger
    assert sorted(os.listdir(tmp_path)) == ["transformer", "weights.safetensors"]  # no staging or .old left


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A disk that fills up during a run (the free-space check at start cannot foresee other writers):
    torch's 'unexpected pos' becomes a line that names the disk and the checkpoint to resume from, and
    the half-written folder is removed."""
    import shutil
    from types import SimpleNamespace

    import pytest

    from flux_rl import checkpoints
    from flux_rl.errors import ConfigurationError

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "training_state.json").write_text('{"global_step": 2}')

    def save_state(folder):
        os.makedirs(folder)
        open(os.path.join(folder, "optimizer.bin"), "wb").write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 248512 vs 248400")

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(ConfigurationError) as error:
        checkpoints.save_checkpoint(accelerator, str(tmp_path), 4, None, {})
    assert str(error.value) == (f"checkpoint-4 could not be written: the disk of --output_dir {tmp_path} is full (0.00 GB free); "
                                f"{tmp_path}/checkpoint-2 is intact: free some space and rerun with --resume_from_checkpoint latest")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)  # the same words with room on the disk: not ours to explain
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoints.save_checkpoint(accelerator, str(tmp_path), 4, None, {})
