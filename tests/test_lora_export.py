"""A trained LoRA loads alike everywhere FLUX users run it. The layout of Black Forest Labs' FLUX.1
checkpoint (what ComfyUI, Forge and Krita hold) is written out in flux_rl.lora_export and checked
against diffusers' own converter of that checkpoint; every key of a full-size LoRA maps onto it; the
trainers' file and the kohya/BFL export, merged as ComfyUI merges (strength 1.0 without an .alpha
tensor, alpha / rank with one), give the weights diffusers' fused LoRA gives, also with
--lora_alpha != --rank (the strength is folded into the file); diffusers' kohya converter reads the
export back to the same adapters."""

import copy
import os

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from flux_rl import lora_export, models
from flux_rl.lora_export import SWAPPED, bfl_rows, export, to_bfl
from flux_rl.tiny_models import FLUX_DEV_TRANSFORMER


def meta_flux(**overrides):
    with torch.device("meta"):
        return FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, **overrides})


def test_the_bfl_layout_is_the_checkpoint_diffusers_converts():
    """to_bfl(diffusers' state) is FLUX.1's own checkpoint: diffusers' single-file converter (its code, not ours)
    turns it back into exactly the diffusers state. FLUX.1-dev's widths (the converter assumes them), two blocks of
    each kind, one input column per weight so that the values stay small and every row is told apart."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn((value.shape[0], 1) if value.ndim == 2 else tuple(value.shape), generator=generator)
             for key, value in meta_flux(num_layers=2, num_single_layers=2).state_dict().items()}
    checkpoint = to_bfl(state)
    assert checkpoint["double_blocks.1.img_attn.qkv.weight"].shape == (3 * 3072, 1)
    assert checkpoint["single_blocks.1.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 1)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert converted.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("preset, keys", [("attention", 532), ("default", 838), ("all-linear", 1008)])
def test_every_key_of_a_full_size_lora_maps_onto_flux_dev(preset, keys):
    """FLUX.1-dev with the preset's adapters at rank 64, on the meta device: each of the file's keys names a row
    range of one BFL weight, the parts of a fused weight tile it exactly, and the export has one LoRA per BFL layer
    of that weight's shape."""
    model = models.add_lora(meta_flux(), 64, 32, models.lora_targets(preset))
    lora = {f"transformer.{key}": value for key, value in models.lora_state_dict(model).items()}
    assert len(lora) == keys
    checkpoint = {key: value.shape for key, value in to_bfl(meta_flux().state_dict()).items()}  # FLUX.1-dev's, in BFL's layout
    modules = {key.removeprefix("transformer.").removesuffix(".lora_B.weight"): value.shape[0] for key, value in lora.items()
               if key.endswith(".lora_B.weight")}
    rows = {}
    for module in modules:
        layer, start, count = bfl_rows(module, modules)
        assert f"{layer}.weight" in checkpoint, module
        rows.setdefault(layer, []).append((start, count))
    for layer, ranges in rows.items():
        covered = sorted(ranges)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(covered, covered[1:])), layer  # no row adapted twice
        assert covered[-1][0] + covered[-1][1] <= checkpoint[f"{layer}.weight"][0], layer
        if preset != "attention":  # every part of every fused layer adapted: the parts tile the BFL weight
            assert covered[0][0] == 0 and sum(count for _, count in covered) == checkpoint[f"{layer}.weight"][0], layer
    exported = export(lora, 32, "kohya")
    assert len(exported) == 3 * len(rows)
    for layer, ranges in rows.items():
        name = "lora_unet_" + layer.replace(".", "_")
        down, up = exported[f"{name}.lora_down.weight"], exported[f"{name}.lora_up.weight"]
        assert (up.shape[0], down.shape[1]) == tuple(checkpoint[f"{layer}.weight"]), layer
        assert up.shape[1] == down.shape[0] == 64 * len(ranges), layer  # the adapted parts' ranks, side by side


@pytest.mark.parametrize("preset", ["all-linear", "attention"])
def test_diffusers_reads_the_kohya_export_as_the_same_adapters(preset):
    """diffusers' converter of kohya's FLUX LoRAs (its own code, FLUX.1-dev's widths) reads the export back: each
    diffusers module's delta, applied to random inputs, is the original adapter's, alpha / rank included; a fused
    part the run did not adapt (the attention preset's proj_mlp) reads as zero."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    rank, alpha = 2, 3.0
    model = models.add_lora(meta_flux(num_layers=1, num_single_layers=1), rank, alpha, models.lora_targets(preset))
    generator = torch.Generator().manual_seed(1)
    lora = {f"transformer.{key}": torch.randn(tuple(value.shape), generator=generator) * 0.1
            for key, value in models.lora_state_dict(model).items()}
    # diffusers names the embedders' and the final layer's adapters without the "transformer." the others carry.
    converted = {key if key.startswith("transformer.") else f"transformer.{key}": value
                 for key, value in _convert_kohya_flux_lora_to_diffusers(export(lora, alpha, "kohya")).items()}
    originals = {key.removesuffix(".lora_A.weight") for key in lora if key.endswith(".lora_A.weight")}
    for module in {key.removesuffix(".lora_A.weight") for key in converted if key.endswith(".lora_A.weight")}:
        down, up = converted[f"{module}.lora_A.weight"], converted[f"{module}.lora_B.weight"]
        probe = torch.randn(down.shape[1], 3, generator=generator)
        if module in originals:
            expected = alpha / rank * lora[f"{module}.lora_B.weight"] @ (lora[f"{module}.lora_A.weight"] @ probe)
        else:
            assert module.endswith("proj_mlp") and preset == "attention", module
            expected = torch.zeros(up.shape[0], 3)
        assert torch.allclose(up @ (down @ probe), expected, atol=1e-5), module
        originals.discard(module)
    assert not originals, f"not read back: {sorted(originals)[:3]}"


def comfyui_merge(base: dict, lora: dict) -> dict:
    """What ComfyUI does with a LoRA file on FLUX.1's checkpoint (written from its documented behaviour, not its
    code): every layer's delta up @ down times alpha / rank when the file has the layer's .alpha tensor, else 1.0;
    diffusers-layout keys land on their row range of the fused BFL weight, the final modulation's halves swapped."""
    merged = {key: value.clone() for key, value in base.items()}
    out_features = {key.removeprefix("transformer.").removesuffix(".lora_B.weight"): value.shape[0] for key, value in lora.items()
                    if key.startswith("transformer.") and key.endswith(".lora_B.weight")}
    for key in lora:
        if key.endswith((".lora_A.weight", ".lora_down.weight")):
            stem = key.rsplit(".", 2)[0]
            down = lora[key].float()
            up = lora[f"{stem}.lora_B.weight" if key.endswith(".lora_A.weight") else f"{stem}.lora_up.weight"].float()
            strength = lora[f"{stem}.alpha"].item() / down.shape[0] if f"{stem}.alpha" in lora else 1.0
            delta = strength * up @ down
            if stem.startswith("transformer."):
                layer, start, count = bfl_rows(stem.removeprefix("transformer."), out_features)
                if layer == SWAPPED:
                    delta = torch.cat(delta.chunk(2)[::-1])
                else:
                    padded = torch.zeros(merged[f"{layer}.weight"].shape[0], delta.shape[1])
                    padded[start : start + count] = delta
                    delta = padded
            elif stem.startswith("lora_unet_"):
                layer = next(name[:-7] for name in merged if name.endswith(".weight") and
                             "lora_unet_" + name[:-7].replace(".", "_") == stem)
            else:
                layer = stem.removeprefix("diffusion_model.")
            merged[f"{layer}.weight"] = merged[f"{layer}.weight"] + delta
    return merged


@pytest.mark.parametrize("preset, alpha", [("default", 8.0), ("all-linear", 8.0), ("default", 4.0)])
def test_merged_in_comfyui_as_in_diffusers(preset, alpha, tiny_flux, tmp_path):
    """The tiny FLUX with trained-looking adapters (rank 4, lora_alpha 8 or 4): the final file fused by diffusers
    (load_lora_weights + fuse_lora) gives the trainer's own merged weights, and ComfyUI's arithmetic on that file
    and on both exports gives the same weights in BFL's layout."""
    base = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    trained = models.add_lora(copy.deepcopy(base), 4, alpha, models.lora_targets(preset))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    models.save_lora(str(tmp_path), trained, fold_alpha=True)
    path = os.path.join(tmp_path, models.LORA_WEIGHTS_NAME)
    ours = merged_by_peft(trained)  # the trainer's adapters merged by peft, at the trained alpha / rank

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(str(tmp_path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    for key, value in ours.items():
        assert torch.allclose(fused[key], value, atol=1e-5), key  # the folded strength is diffusers' alpha / rank

    expected = to_bfl(fused)
    base_bfl = to_bfl(base.state_dict())
    lora = load_file(path)
    assert not any(key.endswith(".alpha") for key in lora)  # ComfyUI applies it at 1.0: the strength is in the weights
    for source in (lora, export(lora, 4.0, "kohya"), export(lora, 4.0, "bfl")):
        merged = comfyui_merge(base_bfl, source)
        for key, value in expected.items():
            assert torch.allclose(merged[key], value, atol=1e-5), key
    if alpha != 4.0:  # without the fold, a reader of the tensors alone merges at rank / alpha of the strength
        unfolded = {f"transformer.{k}": v for k, v in models.lora_state_dict(trained).items()}
        merged = comfyui_merge(base_bfl, unfolded)
        assert not all(torch.allclose(merged[key], value, atol=1e-5) for key, value in expected.items())


def merged_by_peft(trained):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(trained)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return {key.replace(".base_layer", ""): value for key, value in model.state_dict().items() if "lora_" not in key}


def test_the_export_command(tiny_flux, tmp_path, capsys):
    base = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    trained = models.add_lora(base, 4, 8.0, models.lora_targets("default"))
    models.save_lora(str(tmp_path), trained, fold_alpha=True)
    lora_export.main([str(tmp_path)])
    written = tmp_path / "pytorch_lora_weights_kohya.safetensors"
    assert capsys.readouterr().out.strip() == f"wrote {written}"
    with safe_open(str(written), "pt") as f:
        assert all(key.startswith("lora_unet_") for key in f.keys())
    lora_export.main([str(tmp_path), "--format", "bfl"])
    with safe_open(str(tmp_path / "pytorch_lora_weights_bfl.safetensors"), "pt") as f:
        assert all(key.startswith("diffusion_model.") for key in f.keys())
    with pytest.raises(SystemExit) as end:
        lora_export.main([str(tmp_path / "nothing-here")])
    assert end.value.code == 2 and capsys.readouterr().err.startswith("error: ")
