"""--init_lora_weights from a LoRA in kohya's format (sd-scripts / ComfyUI community files: lora_down,
lora_up and a per-module alpha, FLUX's original module names): converted as
FluxPipeline.load_lora_weights converts it, so the trainer starts from the very model the pipeline
would render with that file."""

import copy

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

import train_srpo_flux
from flux_rl import models, training
from flux_rl.args import ConfigurationError
from flux_rl.tiny_models import TINY_TRANSFORMER

RANK, ALPHA = 2, 1.0  # alpha != rank: the conversion scales the weights by alpha / rank
INNER = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
# diffusers' kohya converter splits a single block's fused linear1 at FLUX.1's full sizes, so the
# tiny FLUX here has double blocks only (kohya's single blocks have only fused layers).
DOUBLE_ONLY = dict(TINY_TRANSFORMER, num_single_layers=0)


def kohya_lora(path, ranks=None):
    """A kohya-format LoRA of the double block: both attentions (fused qkv, as FLUX's original
    modules) and the image MLP's first layer."""
    generator = torch.Generator().manual_seed(0)
    layers = {"double_blocks_0_img_attn_qkv": (3 * INNER, INNER), "double_blocks_0_img_attn_proj": (INNER, INNER),
              "double_blocks_0_txt_attn_qkv": (3 * INNER, INNER), "double_blocks_0_txt_attn_proj": (INNER, INNER),
              "double_blocks_0_img_mlp_0": (4 * INNER, INNER)}
    state = {}
    for i, (name, (out_features, in_features)) in enumerate(layers.items()):
        rank = (ranks or {}).get(i, RANK)
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator)
        state[f"lora_unet_{name}.alpha"] = torch.tensor(ALPHA)
    save_file(state, path)
    return str(path)


def test_kohya_lora_starts_the_adapters_as_the_pipeline_loads_it(tiny_flux, tmp_path):
    lora = kohya_lora(tmp_path / "style.safetensors")
    flags = ["--pretrained_model_name_or_path", tiny_flux, "--output_dir", str(tmp_path / "out"), "--init_lora_weights", lora,
             "--rank", str(RANK)]
    # Its alphas are applied to the weights when it is read: it acts as alpha = rank.
    with pytest.raises(ValueError, match=f"was trained with lora_alpha {float(RANK)}; pass --lora_alpha {RANK}"):
        train_srpo_flux.parse_args(flags)
    args = train_srpo_flux.parse_args(flags + ["--lora_alpha", str(RANK), "--lora_layers", "attention"])

    torch.manual_seed(0)
    base = FluxTransformer2DModel(**DOUBLE_ONLY)
    trained = models.prepare_for_training(copy.deepcopy(base), args)
    # The attention preset lacks the MLP layer it adapts too.
    layers = "attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,attn.to_q,attn.to_v,ff.net.0.proj"
    with pytest.raises(ConfigurationError, match=f"has layers this model's adapters lack.*pass its layers, --lora_layers {layers}$"):
        training.init_lora(trained, args)

    args = train_srpo_flux.parse_args(flags + ["--lora_alpha", str(RANK), "--lora_layers", layers])
    trained = models.prepare_for_training(copy.deepcopy(base), args)
    training.init_lora(trained, args)

    reference = FluxPipeline.from_pretrained(tiny_flux)
    reference.transformer = copy.deepcopy(base)
    reference.load_lora_weights(lora)
    inputs = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        (expected,), (got,), (untouched,) = (model(**inputs) for model in (reference.transformer, trained, base))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - untouched).abs().max() > 1e-3  # the LoRA changes the model


def test_a_lora_of_several_ranks_is_refused_before_loading(tmp_path):
    lora = kohya_lora(tmp_path / "mixed.safetensors", ranks={0: 2, 1: 4})
    with pytest.raises(ValueError, match=r"its adapters have ranks \[2, 4\]; a run trains adapters of one --rank"):
        train_srpo_flux.parse_args(["--pretrained_model_name_or_path", "x", "--init_lora_weights", lora, "--rank", "2"])
