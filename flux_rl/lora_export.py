"""A trained LoRA in the layout of Black Forest Labs' FLUX.1 checkpoints, for tools that read that
layout rather than diffusers': ComfyUI, Forge, Krita's AI plugin, kohya's sd-scripts.

    python -m flux_rl.lora_export output/srpo-hps-lora                 # writes pytorch_lora_weights_kohya.safetensors beside it
    python -m flux_rl.lora_export output/srpo-hps-lora --format bfl    # diffusion_model.* keys instead of lora_unet_*

diffusers splits FLUX's fused projections that BFL's checkpoint keeps whole: a double block's q, k
and v (img_attn.qkv, txt_attn.qkv), and a single block's q, k, v and MLP input (linear1). A LoRA of
each part (B_i A_i, rank r) becomes one LoRA of the fused layer, exactly: its down matrix stacks
the parts' A_i (rank k * r), its up matrix places each B_i in its part's rows and its own rank
columns (block-diagonal), so up @ down = the parts' deltas stacked. Parts the run did not adapt get
zero rows. The final layer's modulation is stored [shift, scale] by BFL and [scale, shift] by
diffusers: its up rows are swapped. The strength alpha / rank is folded into the up weights and
each layer's `.alpha` is its rank, so that every reader applies it at 1.0.

The trainers' own file (diffusers' layout) already loads in ComfyUI, which maps each diffusers key
onto a row range of the fused BFL weight (`bfl_rows` below is that mapping); `tests/test_lora_export.py`
checks both files against diffusers' fused LoRA.
"""

import argparse
import os
import sys

import torch

# diffusers module (within a block, or at the top) -> (BFL layer, parts of that layer in diffusers' names, in row order)
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    "attn.to_k": ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    "attn.to_v": ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    "attn.add_q_proj": ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    "attn.add_k_proj": ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    "attn.add_v_proj": ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
_LINEAR1 = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
_SINGLE = {
    **{part: ("linear1", _LINEAR1) for part in _LINEAR1},
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_TOP = {
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "proj_out": ("final_layer.linear", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", None),
}
SWAPPED = "final_layer.adaLN_modulation.1"  # [shift, scale] in BFL's weights, [scale, shift] in diffusers'
# The q/k RMSNorm scales: not linear (no LoRA), but part of the checkpoint's layout (to_bfl).
_NORMS_DOUBLE = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_NORMS_SINGLE = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def bfl_layer(module: str) -> tuple[str, list[str] | None]:
    """diffusers module name (transformer_blocks.3.attn.to_q) -> (BFL layer name, the diffusers modules
    fused into it in row order, each with the same block prefix; None when it is not fused)."""
    for prefix, block, table in (("transformer_blocks.", "double_blocks.", _DOUBLE), ("single_transformer_blocks.", "single_blocks.", _SINGLE)):
        if module.startswith(prefix):
            index, name = module[len(prefix):].split(".", 1)
            layer, parts = table[name]
            return f"{block}{index}.{layer}", parts and [f"{prefix}{index}.{part}" for part in parts]
    layer, parts = _TOP[module]
    return layer, parts


def bfl_rows(module: str, out_features: dict[str, int]) -> tuple[str, int, int]:
    """(BFL layer, first row, rows) that diffusers module `module` fills in BFL's weight: the way
    ComfyUI applies a diffusers-layout LoRA. `out_features`: each diffusers module's output size."""
    layer, parts = bfl_layer(module)
    if not parts:
        return layer, 0, out_features[module]
    start = sum(out_features[part] for part in parts[: parts.index(module)])
    return layer, start, out_features[module]


def to_bfl(state_dict: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict's linear weights and biases and q/k norm scales,
    in BFL's layout (fused layers concatenated, the final modulation's halves swapped): what ComfyUI
    holds when it loads FLUX.1's own checkpoint. tests/test_lora_export.py checks it against
    diffusers' converter of that checkpoint."""
    result = {}
    for key, value in state_dict.items():
        module, _, kind = key.rpartition(".")
        if module.endswith(tuple(_NORMS_DOUBLE)) or module.endswith(tuple(_NORMS_SINGLE)):
            prefix, block, table = (("single_transformer_blocks.", "single_blocks.", _NORMS_SINGLE) if module.startswith("single_")
                                    else ("transformer_blocks.", "double_blocks.", _NORMS_DOUBLE))
            index, name = module[len(prefix):].split(".", 1)
            result[f"{block}{index}.{table[name]}.scale"] = value
            continue
        try:
            layer, parts = bfl_layer(module)
        except KeyError:
            continue  # not a linear layer of FLUX.1
        if parts and module != parts[0]:
            continue  # the fused layer is made once, at its first part
        pieces = [state_dict[f"{part}.{kind}"] for part in parts] if parts else [value]
        fused = torch.cat(pieces, dim=0)
        result[f"{layer}.{kind}"] = _swap_halves(fused) if layer == SWAPPED else fused
    return result


def _swap_halves(tensor):
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def export(lora: dict, alpha: float, fmt: str = "kohya") -> dict:
    """Our LoRA file's tensors (diffusers' keys, transformer.<module>.lora_A/B.weight; `alpha`: its
    lora_alpha) -> the same LoRA per BFL layer: `kohya` keys (lora_unet_double_blocks_0_img_attn_qkv.
    lora_down.weight, .lora_up.weight, .alpha) or `bfl` keys (diffusion_model.double_blocks.0.
    img_attn.qkv.lora_A.weight, .lora_B.weight). Exact: up @ down of each layer is the parts' deltas."""
    down = {key.removeprefix("transformer.").removesuffix(".lora_A.weight"): value for key, value in lora.items() if key.endswith(".lora_A.weight")}
    up = {module: lora[f"transformer.{module}.lora_B.weight"] for module in down}
    rank = {value.shape[0] for value in down.values()}
    if len(rank) != 1:
        raise ValueError(f"a LoRA of one rank was expected, found ranks {sorted(rank)}")
    scale = alpha / rank.pop()
    layers = {}
    for module in down:
        try:
            layer, parts = bfl_layer(module)
        except KeyError:
            raise ValueError(f"'{module}' is not a layer of FLUX.1's transformer: the export writes FLUX.1's layout; "
                             "another family's LoRA loads as it is, in diffusers' layout") from None
        layers.setdefault(layer, parts or [module])
    result = {}
    for layer, parts in layers.items():
        adapted = [part for part in parts if part in down]
        layer_down = torch.cat([down[part] for part in adapted], dim=0)
        first = up[adapted[0]]
        rows = [up[part].shape[0] if part in down else _rows_of_unadapted(part, down[adapted[0]].shape[1]) for part in parts]
        layer_up = torch.zeros(sum(rows), layer_down.shape[0], dtype=first.dtype, device=first.device)
        row = column = 0
        for part, count in zip(parts, rows):  # a part the run did not adapt keeps zero rows (the attention preset's proj_mlp)
            if part in down:
                part_rank = down[part].shape[0]
                layer_up[row : row + count, column : column + part_rank] = up[part] * scale
                column += part_rank
            row += count
        if layer == SWAPPED:
            layer_up = _swap_halves(layer_up)
        if fmt == "kohya":
            name = "lora_unet_" + layer.replace(".", "_")
            result[f"{name}.lora_down.weight"] = layer_down.contiguous()
            result[f"{name}.lora_up.weight"] = layer_up
            result[f"{name}.alpha"] = torch.tensor(float(layer_down.shape[0]))  # alpha = rank: strength 1, it is folded in
        elif fmt == "bfl":
            result[f"diffusion_model.{layer}.lora_A.weight"] = layer_down.contiguous()
            result[f"diffusion_model.{layer}.lora_B.weight"] = layer_up
        else:
            raise ValueError(f"unknown format {fmt}; choose kohya or bfl")
    return result


def _rows_of_unadapted(part: str, hidden: int) -> int:
    """Output size of a fused part without an adapter, from the model width (the fused layer's input):
    FLUX.1's q, k and v are hidden wide, a single block's MLP input 4 x hidden (mlp_ratio 4)."""
    return 4 * hidden if part.endswith("proj_mlp") else hidden


def export_file(source: str, fmt: str = "kohya", output: str | None = None) -> str:
    """Reads a trainer's LoRA (its --output_dir, or the .safetensors file) and writes the export beside it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .models import FOLDED_ALPHA_KEY, LORA_WEIGHTS_NAME, PIPELINE_KEY, lora_file_config

    folder, name, rank, alpha = lora_file_config(source)
    path = os.path.join(folder, name)
    with safe_open(path, "pt") as f:
        lora = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata() or {}
    if metadata.get(PIPELINE_KEY, "FluxPipeline") != "FluxPipeline":
        raise ValueError(f"{path} was trained on a {metadata[PIPELINE_KEY]} model: the export writes FLUX.1's layout; "
                         "load the file as it is (its pipeline's load_lora_weights, ComfyUI's LoRA loader)")
    if FOLDED_ALPHA_KEY in metadata:
        alpha = rank  # the trainers' final file: alpha / rank is in its lora_B weights already
    output = output or os.path.join(folder, name.replace(".safetensors", f"_{fmt}.safetensors"))
    if os.path.abspath(output) == os.path.abspath(path) or os.path.basename(output) == LORA_WEIGHTS_NAME:
        raise ValueError(f"--output {output} would replace the diffusers-layout file; name another")
    tensors = export(lora, rank if alpha is None else alpha, fmt)
    temporary = output + ".tmp"
    save_file(tensors, temporary, metadata={"format": "pt", "exported_from": os.path.basename(path),
                                              "layout": "kohya sd-scripts FLUX.1" if fmt == "kohya" else "BFL FLUX.1 (diffusion_model.)"})
    os.replace(temporary, output)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="A trainer's --output_dir, or its pytorch_lora_weights.safetensors.")
    parser.add_argument("--format", choices=["kohya", "bfl"], default="kohya",
                        help="kohya: lora_unet_* keys with lora_down/lora_up/alpha; bfl: diffusion_model.* keys with lora_A/lora_B.")
    parser.add_argument("--output", default=None, help="Where to write (default: beside the source, _kohya or _bfl added).")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {export_file(args.source, args.format, args.output)}")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
