"""Loading FLUX for training: frozen parts, LoRA (peft) or full fine-tune, and the accelerate
save/load hooks that make `accelerator.save_state` write weights in diffusers' own formats."""

import contextlib
import os
import re

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what save_lora writes and load_lora_weights looks for
# Metadata of a final LoRA file whose lora_B weights carry alpha / rank (save_lora's fold_alpha): the alpha it was trained with.
FOLDED_ALPHA_KEY = "flux_rl.folded_lora_alpha"
PIPELINE_KEY = "flux_rl.pipeline"  # the final LoRA file's base: FluxPipeline, QwenImagePipeline, ...
# --lora_layers presets. peft adapts every module whose name is a target or ends in "." + target.
ATTENTION_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
LORA_LAYER_PRESETS = {
    # The attention projections: q, k, v of all 57 blocks, the double blocks' outputs. Leaves out the single
    # blocks' proj_out, where their attention output is fused with their MLP (the default until 2026-12-05).
    "attention": ATTENTION_LORA_TARGETS,
    # What diffusers' train_dreambooth_lora_flux.py adapts (attention + both feed-forwards of the double
    # blocks) plus the single blocks' proj_mlp and proj_out, the bulk of their weights; "proj_out" also
    # names the transformer's final output projection.
    "default": ATTENTION_LORA_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                         "proj_mlp", "proj_out"],
}
# Every linear layer: the above, the blocks' modulations (norm*.linear), the embedders and the output norm.
LORA_LAYER_PRESETS["all-linear"] = LORA_LAYER_PRESETS["default"] + [
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder",
    "linear_1", "linear_2"]
DEFAULT_LORA_TARGETS = LORA_LAYER_PRESETS["default"]


# The diffusers pipelines these trainers train, one adapter each in flux_rl/families (written out here so that
# checking a checkpoint's model_index.json imports nothing; tests/test_families.py holds it equal to FAMILIES).
SUPPORTED_PIPELINES = ("FluxPipeline", "Flux2KleinPipeline", "QwenImagePipeline", "StableDiffusion3Pipeline", "ZImagePipeline")


def check_pipeline_class(model_index_path: str, name: str) -> str:
    """The checkpoint's pipeline class (its family), from its model_index.json, before anything loads:
    a FLUX.2 or SD3 folder would otherwise fail deep inside diffusers."""
    import json

    from .errors import ConfigurationError

    try:
        with open(model_index_path) as f:
            pipeline_class = json.load(f).get("_class_name")
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"--pretrained_model_name_or_path {name}: its model_index.json does not read ({error})") from None
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise ConfigurationError(f"--pretrained_model_name_or_path {name} is a {pipeline_class} checkpoint; these trainers train "
                                 f"{', '.join(SUPPORTED_PIPELINES)} models (FLUX.1-dev, -schnell, -Krea-dev; FLUX.2 [klein]; "
                                 "Qwen-Image; SD3 / SD3.5; Z-Image) so far")
    return pipeline_class


def check_family_flags(pipeline_class: str, args):
    """Flags the checkpoint's family cannot honour, refused before anything loads (at parse time for a
    local folder, after the Hub's model_index.json for an id)."""
    from .errors import ConfigurationError

    if pipeline_class == "QwenImagePipeline" and getattr(args, "vae_gradient_checkpointing", False):
        raise ConfigurationError("--vae_gradient_checkpointing: Qwen-Image's video VAE (diffusers' AutoencoderKLQwenImage) does "
                                 "not support gradient checkpointing; drop the flag")


def load_pipeline(pretrained_model_name_or_path, revision=None, variant=None, dtype=torch.float32, cache_dir=None):
    """The checkpoint's own pipeline (the class its model_index.json names: FluxPipeline, QwenImagePipeline)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, revision=revision, variant=variant, dtype=dtype,
                                             cache_dir=cache_dir)


def lora_targets(flag_value: str | None, presets: dict | None = None) -> list[str]:
    """--lora_target_modules as a list: a preset's name (`presets`, a family's: LORA_LAYER_PRESETS for
    FLUX.1; None: "default") or comma-separated module names; peft adapts each module whose name is a
    target or ends in '.' + target."""
    presets = presets or LORA_LAYER_PRESETS
    if not flag_value:
        return presets["default"]
    if flag_value.strip() in presets:
        return presets[flag_value.strip()]
    return [name.strip() for name in flag_value.split(",") if name.strip()]


def names_target(module_name: str, target: str) -> bool:
    """Whether a --lora_target_modules entry names this module, as peft matches a list entry: the whole
    name or its end after a dot. A `*` stands for one part of the path (a block's index): FLUX.2's
    single blocks' `attn.to_out` is a Linear, its double blocks' a ModuleList, so only
    `single_transformer_blocks.*.attn.to_out` names the one apart from the other."""
    if "*" not in target:
        return module_name == target or module_name.endswith("." + target)
    return re.fullmatch(r"(.*\.)?" + re.escape(target).replace(r"\*", r"[^.]+"), module_name) is not None


def peft_target_modules(transformer, targets: list[str]) -> list[str]:
    """The list peft gets: each entry with a `*` replaced by the full names of the linear layers it names
    (peft matches list entries by suffix only)."""
    linear = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    return [name for target in targets for name in ([n for n in linear if names_target(n, target)] if "*" in target else [target])]


def check_lora_targets_in(transformer, targets: list[str]):
    """Each target names a linear layer of the loaded transformer (a family without a written-out
    table, FLUX_LINEAR_LAYERS, is checked once loaded, before adapters are added)."""
    from .errors import ConfigurationError

    modules = dict(transformer.named_modules())
    linear = [name for name, module in modules.items() if isinstance(module, torch.nn.Linear)]
    for target in targets:
        if not any(names_target(name, target) for name in linear):
            raise ConfigurationError(f"--lora_target_modules: '{target}' names no linear layer of the {type(transformer).__name__}; "
                                     f"its blocks' layers are e.g. {', '.join(sorted({n.split('.', 2)[-1] for n in linear})[:8])}")
        # peft adapts every module the name matches, and refuses the whole list at one it cannot adapt.
        other = [name for name, module in modules.items() if names_target(name, target)
                 and not isinstance(module, torch.nn.Linear) and not name.endswith(".base_layer")]
        if other:
            raise ConfigurationError(f"--lora_target_modules: '{target}' also names {other[0]} ({type(modules[other[0]]).__name__}), "
                                     "which LoRA cannot adapt; name the linear layers by a longer part of their path")


# Every linear layer of FLUX.1's transformer, named as in one double and one single block (the other blocks
# repeat these names with their own index): --lora_layers is checked against it without importing diffusers
# (3 s) or building the model. tests/test_args.py holds it equal to diffusers' FluxTransformer2DModel.
_DOUBLE = "transformer_blocks.0."
_SINGLE = "single_transformer_blocks.0."
FLUX_LINEAR_LAYERS = [
    *[f"time_text_embed.{embedder}.linear_{i}" for embedder in ("timestep_embedder", "guidance_embedder", "text_embedder")
      for i in (1, 2)],
    "context_embedder", "x_embedder",
    *[_DOUBLE + name for name in ("norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                  "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")],
    *[_SINGLE + name for name in ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")],
    "norm_out.linear", "proj_out",
]


def check_lora_targets(targets: list[str]):
    """Each target names at least one linear layer of FLUX's transformer (FLUX_LINEAR_LAYERS), before
    any weights load. peft itself refuses only a list where nothing matches: a typo beside a good name
    would train without that adapter and say nothing."""
    for target in targets:
        # The table names block 0 of each kind: a target naming another block (or any, with *) is checked as block 0's.
        # An index past the model's blocks is refused once the model is built (check_lora_targets_in).
        as_block_0 = re.sub(r"(^|\.)((?:single_)?transformer_blocks)\.(\d+|\*)\.", r"\1\2.0.", target)
        if not any(names_target(name, as_block_0) for name in FLUX_LINEAR_LAYERS):
            raise ValueError(f"--lora_target_modules: '{target}' names no linear layer of the FLUX transformer; "
                             "use a preset (default, attention, all-linear) or names such as to_q,to_k,to_v,proj_mlp,ff.net.2")


def check_lora_targets_of_folder(folder: str, pipeline_class: str, flag_value: str):
    """--lora_target_modules against a local checkpoint of another family than FLUX.1, before anything
    loads: its transformer is built from its config.json on the meta device (no weights, no memory)."""
    import diffusers
    from accelerate import init_empty_weights

    from .families import FAMILIES

    family = FAMILIES.get(pipeline_class)
    if family is None or not os.path.exists(os.path.join(folder, "transformer", "config.json")):
        return  # an unsupported class is reported by check_pipeline_class; a folder without config by the loader
    config_class = getattr(diffusers, diffusers.DiffusionPipeline.load_config(folder)["transformer"][1])
    with init_empty_weights():
        transformer = config_class.from_config(config_class.load_config(os.path.join(folder, "transformer")))
    check_lora_targets_in(transformer, lora_targets(flag_value, family.LORA_PRESETS))


def add_lora(transformer, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0):
    """Freeze the transformer and add LoRA adapters; LoRA parameters are kept in fp32 so that
    small updates survive with bf16 base weights."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=peft_target_modules(transformer, target_modules))
    transformer.add_adapter(config)
    _trainable_to_fp32(transformer)
    return transformer


@contextlib.contextmanager
def without_dropout(model):
    """No-grad sampling (rollout, validation) in eval mode, so --lora_dropout does not perturb the
    sampler; the model's mode is restored after it. A model in eval mode already passes through."""
    if not model.training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train()


@contextlib.contextmanager
def lora_merged(model):
    """For no-grad sampling: each LoRA adapter folded into its base weight, W + scale * B @ A
    (rounded once to the weight's dtype), so every adapted projection runs one matmul instead of
    that plus peft's extra kernels (input cast, down, up, scale, add). On exit every base weight is
    restored from a copy, bit for bit: peft's unmerge subtracts in bf16 and would let the frozen
    weights drift a little each step. The copies cost 2 bytes per adapted weight in bf16 (4.7 GiB
    for FLUX's attention projections). A model without merged-able adapters passes through."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged]
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                originals.append(layer.get_base_layer().weight.detach().clone())
                layer.merge()  # peft: weight += delta; the layer's forward then skips the adapter
        yield model
    finally:
        with torch.no_grad():
            for layer, original in zip(layers, originals):
                layer.get_base_layer().weight.copy_(original)
                layer.merged_adapters.clear()


@contextlib.contextmanager
def attention_backend_within(transformer, name: str | None):
    """Inside the block, the transformer's attention runs through diffusers' backend `name`; on
    exit each attention processor gets its own backend back. For the no-grad rollout: a kernel
    whose backward is not needed (or not trusted) serves the sampling only. None: no change.
    The processors' attribute is set directly: diffusers' set_attention_backend would also change
    the process-wide default and log a warning on every call."""
    if name is None:
        yield transformer
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    processors = [m.processor for m in transformer.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    previous = [processor._attention_backend for processor in processors]
    try:
        for processor in processors:
            processor._attention_backend = AttentionBackendName(name)
        yield transformer
    finally:
        for processor, backend in zip(processors, previous):
            processor._attention_backend = backend


def _trainable_to_fp32(model):
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def block_lists(transformer) -> list:
    """The transformer's stacks of blocks: FLUX's double and single blocks (FLUX.2's too), the
    transformer_blocks of Qwen-Image and SD3, Z-Image's noise and context refiners and main layers."""
    names = ("transformer_blocks", "single_transformer_blocks", "noise_refiner", "context_refiner", "layers")
    return [getattr(transformer, name) for name in names if isinstance(getattr(transformer, name, None), torch.nn.ModuleList)]


def compile_blocks(transformer, backend: str = "inductor", mode: str | None = None):
    """torch.compile each FLUX block on its own. The 19 double and 38 single blocks share two
    graphs, so compilation is short, and the Python loop between blocks (where gradient
    checkpointing and FSDP act) stays eager."""
    for blocks in block_lists(transformer):
        for block in blocks:
            block.compile(backend=backend, mode=mode, dynamic=False)
    return transformer


def compile_vae_decoder(vae, backend: str = "inductor", mode: str | None = None):
    """torch.compile the VAE decoder whole: one graph per batch size and grad mode, with its
    gradient checkpointing inside. Eager GroupNorm reduces each of its 32 groups in one CUDA thread
    block, 32 blocks on a 132-SM GPU: 0.85 ms per call at 720 px, 125 ms of a LoRA step on an H200
    (benchmarks/logs/2026-11-26-h200-session4/profile_*.txt). Inductor splits that reduction across
    the GPU and fuses the SiLU that follows. Not block by block, as the transformer: the four up
    blocks share one forward, and four shapes x two grad modes already fill dynamo's 8 graphs per
    function, so a validation batch of another size would have fallen back to eager."""
    import warnings

    # With checkpointing, the decoder and its middle block call diffusers' checkpointing helper, which
    # asks an lru_cache'd version check; dynamo warns that it traces through the cache (a pure function).
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    vae.decoder.compile(backend=backend, mode=mode, dynamic=False)
    return vae


class MathAttentionUnderAutograd:
    """The VAE's attention processor: under autograd, two matmuls and a float32 softmax (diffusers'
    AttnProcessor); without, torch's fused kernel (AttnProcessor2_0).

    The VAE attends with one head of 512 channels over every latent pixel (8100 tokens at 720 px).
    No flash kernel takes a head dim of 512, so torch's fused call falls to the generic
    memory-efficient kernel, whose backward took 16.5 ms per call at 720 px on an H200 (33 ms of
    the compiled LoRA step, `fmha_cutlassB_..._k65536` in
    benchmarks/logs/2026-11-26-h200-session4/profile_*.txt) for about 0.4 TFLOP of work, about 1 ms
    as matmuls. The matmuls' price is the N x N score matrix (float32 scores and probabilities, up to
    8 bytes per entry: 0.5 GB per image at 720 px, 2.1 GB at 1024, while the attention runs; without
    VAE checkpointing 6 bytes per entry stay until the backward). A decode without gradient
    (validation, drift monitors, offline SRPO's encode) needs no backward and may hold several
    images: it keeps the fused kernel and its small memory."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.math, self.fused = AttnProcessor(), AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        processor = self.math if torch.is_grad_enabled() else self.fused
        return processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, temb=temb)


def prepare_vae(vae, args):
    """The VAE as the trainer flags want it: frozen, its attention kernel, decoder checkpointing and
    compilation."""
    vae.requires_grad_(False).eval()
    if args.vae_attention == "math" and hasattr(vae, "set_attn_processor"):  # AutoencoderKL's; Qwen-Image's video VAE has its own
        vae.set_attn_processor(MathAttentionUnderAutograd())
    if args.vae_gradient_checkpointing:  # a VAE without it (Qwen-Image's) is refused before loading: check_family_flags
        vae.enable_gradient_checkpointing()
    if args.compile_vae:
        compile_vae_decoder(vae, args.compile_backend, args.compile_mode)
    return vae


def set_attention_backend(transformer, name: str):
    """The transformer's attention through diffusers' dispatcher backend `name`. diffusers' own
    set_attention_backend also makes it the process-wide default (its registry's active backend),
    which every model built later would take (another benchmark configuration, another test); that
    default is put back, the transformer's processors keep `name`."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    transformer.set_attention_backend(name)
    _AttentionBackendRegistry.set_active_backend(default)
    return transformer


def enable_block_checkpointing(transformer, ratio: float = 1.0):
    """Gradient checkpointing of a share `ratio` of the transformer's blocks, spread evenly over the
    double- and the single-stream blocks. A checkpointed block keeps only its input and runs its
    forward again in the backward pass; the others keep their activations: less recompute (a whole
    FLUX forward, 37 TFLOP at 720 px, at ratio 0), more memory. Which blocks does not change the
    peak, only how many: every block's saved tensors live until the backward reaches it.
    The choice is an attribute of the block, so it survives wrappers that forward attributes (FSDP)."""
    for blocks in block_lists(transformer):
        count = int(ratio * len(blocks) + 0.5)  # half rounds up (round() would take 0.5 to 0)
        chosen = {int(i * len(blocks) / count) for i in range(count)} if count else set()
        for index, block in enumerate(blocks):
            block._checkpoint_in_backward = index in chosen

    def checkpoint_chosen_blocks(block, *args):
        if getattr(block, "_checkpoint_in_backward", True):
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)  # diffusers' default
        return block(*args)

    transformer.enable_gradient_checkpointing(checkpoint_chosen_blocks)
    return transformer


def prepare_for_training(transformer, args, device=None):
    """What is trained and how, from the trainer flags: LoRA (bf16 or, with --quantize_base nf4, 4-bit
    base; fp32 adapters), full fine-tune with fp32 master weights, or full fine-tune with bf16 weights
    (--bf16_weights); then the attention backend, gradient checkpointing and per-block compilation.
    `device`: where a quantized base's layers go (each is quantized there as it moves); the rest of
    the transformer is moved by the caller."""
    # torch 2.11 picks cuDNN's attention first on Hopper, and its backward fails ("mha_graph.execute
    # ... is_good()", then an illegal memory access) on FLUX's strided q/k/v at 720 px (2537
    # tokens), seen on an H200. Flash attention takes the same inputs and trains fine.
    torch.backends.cuda.enable_cudnn_sdp(False)
    if args.full_finetune and args.bf16_weights:
        transformer.to(dtype=torch.bfloat16).requires_grad_(True)  # stochastic rounding keeps small updates
    elif args.full_finetune:
        transformer.float().requires_grad_(True)  # fp32 master weights under autocast
    else:
        from .families import family_of_model

        targets = lora_targets(args.lora_target_modules, family_of_model(transformer).LORA_PRESETS)
        check_lora_targets_in(transformer, targets)
        if getattr(args, "quantize_base", "none") == "nf4":
            from .quantization import quantize_blocks_nf4

            # the dtype the weights were loaded in (bf16 under --mixed_precision bf16) is the matmuls' compute dtype
            quantize_blocks_nf4(transformer, device or transformer.device, transformer.dtype)
        add_lora(transformer, args.rank, args.lora_alpha, targets, getattr(args, "lora_dropout", 0.0))
        if getattr(args, "lora_dropout", 0.0):
            # peft's dropout acts in training mode only. The whole step stays in it, so that a block that gradient
            # checkpointing recomputes in the backward draws the same mask (torch.utils.checkpoint replays the RNG);
            # rollouts and validation switch to eval mode (without_dropout).
            transformer.train()
    if args.attention_backend:
        set_attention_backend(transformer, args.attention_backend)
    if args.gradient_checkpointing:
        enable_block_checkpointing(transformer, args.gradient_checkpointing_ratio)
    if args.compile:
        compile_blocks(transformer, args.compile_backend, args.compile_mode)
    return transformer


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def in_dtype(state_dict: dict, dtype) -> dict:
    """The floating tensors of `state_dict` in `dtype` (None: as they are). A cast copy is made on
    the CPU, where the file is written from anyway: no extra GPU memory at the end of a run whose
    optimizer state still fills the GPU. Entries are replaced one by one, so a gathered (owned)
    fp32 state frees each tensor as its copy is made."""
    if dtype is None:
        return state_dict
    for key, value in state_dict.items():
        if value.is_floating_point() and value.dtype != dtype:
            state_dict[key] = value.detach().to("cpu", dtype)
    return state_dict


def save_lora(output_dir: str, transformer, state_dict=None, dtype=None, fold_alpha=False, pipeline_class=None):
    """Writes pytorch_lora_weights.safetensors, which FluxPipeline.load_lora_weights(output_dir) reads.
    `state_dict`: the full model state when it had to be gathered first (FSDP). `dtype`: see in_dtype.
    `fold_alpha` (the final weights): the strength alpha / rank multiplied into the lora_B weights and
    alpha = rank written, so that tools reading only the tensors (ComfyUI, Forge: strength 1.0 without
    an .alpha tensor) apply it as diffusers does. Checkpoints keep the adapters as trained."""
    from diffusers import FluxPipeline

    # The adapter's config (rank, alpha, targets) goes into the file's metadata, as diffusers' own trainers write it:
    # load_lora_weights reads alpha from there, and without it takes alpha = rank, a different scale when they differ.
    config = transformer.peft_config["default"].to_dict()
    layers = lora_state_dict(transformer, state_dict)
    trained_alpha = config["lora_alpha"]
    fold = fold_alpha and trained_alpha != config["r"]
    if fold:
        scale = trained_alpha / config["r"]
        layers = {key: value.detach().float() * scale if ".lora_B." in key else value for key, value in layers.items()}
        config = {**config, "lora_alpha": config["r"]}
    FluxPipeline.save_lora_weights(output_dir, transformer_lora_adapter_metadata=config, weight_name=LORA_WEIGHTS_NAME,
                                   transformer_lora_layers=in_dtype(layers, dtype))
    # Noted beside diffusers' metadata (which must stay a LoraConfig): the trained alpha, so that --init_lora_weights can
    # undo the fold, and the base's pipeline class (the final file), so that the FLUX.1 export can refuse another family's.
    extra = {FOLDED_ALPHA_KEY: repr(float(trained_alpha))} if fold else {}
    if pipeline_class:
        extra[PIPELINE_KEY] = pipeline_class
    if extra:
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = os.path.join(output_dir, LORA_WEIGHTS_NAME)
        with safe_open(path, "pt") as f:
            tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
        save_file(tensors, path, metadata={**metadata, **extra})


def lora_state_dict(transformer, state_dict=None, adapter_name: str = "default") -> dict:
    """The adapter's lora_A/lora_B weights with the adapter name dropped from the keys, as peft's
    get_peft_model_state_dict returns them. Selected by key here because peft finds LoRA layers
    by module path, and under FSDP those paths carry `_fsdp_wrapped_module` while the gathered
    state's keys do not, so peft would return nothing."""
    state_dict = transformer.state_dict() if state_dict is None else state_dict
    tag = f".{adapter_name}."
    return {
        key.replace(tag, "."): value for key, value in state_dict.items()
        if (".lora_A" + tag in key or ".lora_B" + tag in key)
    }


def save_full_model(output_dir: str, transformer, state_dict=None, max_shard_size: str = "10GB", dtype=None):
    """Writes a diffusers model folder (config.json + safetensors shards) that
    FluxTransformer2DModel.from_pretrained reads. `state_dict`: the gathered state (FSDP);
    diffusers' save_pretrained ignores one passed in and calls state_dict() itself, which under
    FSDP is a collective that only the main process would enter."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from huggingface_hub import save_torch_state_dict

    os.makedirs(output_dir, exist_ok=True)
    transformer.save_config(output_dir)
    state_dict = in_dtype(transformer.state_dict() if state_dict is None else state_dict, dtype)
    pattern = SAFETENSORS_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    save_torch_state_dict(state_dict, output_dir, filename_pattern=pattern, max_shard_size=max_shard_size)  # + index when sharded


def load_lora_into(transformer, input_dir: str, weight_name: str = LORA_WEIGHTS_NAME, complete: bool = False):
    """The adapters' weights from a LoRA file in any format FluxPipeline.load_lora_weights reads
    (ours and diffusers' trainers'; kohya's, converted by diffusers with its alphas applied to the
    weights). `complete`: every adapter of the model must be in the file (--init_lora_weights: an
    adapter left at its initialisation would silently train from scratch)."""
    from diffusers import FluxPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    from .errors import ConfigurationError

    state = FluxPipeline.lora_state_dict(input_dir, weight_name=weight_name)
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    layers = f"pass its layers, --lora_layers {lora_layers_of(state)}"
    incompatible = set_peft_model_state_dict(transformer, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise ConfigurationError(f"the LoRA in {input_dir} has layers this model's adapters lack, e.g. {unexpected[:3]}; {layers}")
    missing = [key for key in getattr(incompatible, "missing_keys", []) if ".lora_" in key]
    if complete and missing:
        raise ConfigurationError(f"the LoRA in {input_dir} lacks {len(missing)} adapter weights of this run, e.g. {missing[:2]}; {layers}")
    _trainable_to_fp32(transformer)
    folded = _folded_alpha(input_dir, weight_name)
    if folded is not None:  # a final file with alpha / rank in its lora_B: back to the adapters as trained (same --lora_alpha)
        config = transformer.peft_config["default"]
        with torch.no_grad():
            for name, parameter in transformer.named_parameters():
                if ".lora_B." in name:
                    parameter.mul_(config.r / folded)


def _folded_alpha(input_dir: str, weight_name: str) -> float | None:
    """The trained alpha of a LoRA file written with save_lora(fold_alpha=True), else None."""
    from safetensors import safe_open

    path = os.path.join(input_dir, weight_name) if os.path.isdir(input_dir) else input_dir
    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        value = (f.metadata() or {}).get(FOLDED_ALPHA_KEY)
    return None if value is None else float(value)


def lora_layers_of(state: dict) -> str:
    """The --lora_layers value that adapts the layers of a LoRA state dict (diffusers' keys): each
    module's name within its block (attn.to_q, ff.net.0.proj, ...; peft matches names by suffix)."""
    import re

    modules = {key.split(".lora_")[0] for key in state if ".lora_" in key}
    return ",".join(sorted({re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", module) for module in modules}))


def lora_file_config(path: str) -> tuple[str, str, int, float | None]:
    """(folder, file name, rank, alpha or None) of a LoRA file, or of a folder holding
    pytorch_lora_weights.safetensors, read from its header alone: the rank from the adapters'
    shapes (one rank for all, as a run's adapters have), alpha from the adapter config diffusers'
    trainers (and ours) put in the metadata. A file in kohya's format (lora_down / lora_up keys)
    loads with its alphas applied to the weights, so it acts as alpha = rank."""
    import json

    from safetensors import safe_open

    folder, name = (os.path.dirname(path) or ".", os.path.basename(path)) if os.path.isfile(path) else (path, LORA_WEIGHTS_NAME)
    with safe_open(os.path.join(folder, name), "pt") as f:
        down = [key for key in f.keys() if key.endswith((".lora_A.weight", ".lora_down.weight"))]
        ranks = sorted({f.get_slice(key).get_shape()[0] for key in down})
        config = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        folded = (f.metadata() or {}).get(FOLDED_ALPHA_KEY)
    if not ranks:
        raise ValueError("no lora_A / lora_down weights in it")
    if len(ranks) > 1:
        raise ValueError(f"its adapters have ranks {ranks}; a run trains adapters of one --rank")
    kohya = down[0].endswith(".lora_down.weight")
    if folded is not None:  # its lora_B carry alpha / rank; the adapters it starts are the trained ones, at that alpha
        return folder, name, ranks[0], float(folded)
    return folder, name, ranks[0], float(ranks[0]) if kohya else config.get("transformer.lora_alpha")  # diffusers prefixes the config


def register_save_load_hooks(accelerator, use_lora: bool):
    """accelerator.save_state / load_state write and read the transformer in diffusers format:
    LoRA as pytorch_lora_weights.safetensors, a full model as a transformer/ folder.
    Under FSDP accelerate saves and loads the sharded model itself; no hooks then."""
    from accelerate.utils import DistributedType
    from diffusers import FluxTransformer2DModel

    if accelerator.distributed_type == DistributedType.FSDP:
        return

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for model in models:
            model = accelerator.unwrap_model(model)
            if use_lora:
                save_lora(output_dir, model)
            else:
                save_full_model(os.path.join(output_dir, "transformer"), model)
            if weights:
                weights.pop()  # saved here; stop accelerate from saving it again

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            if use_lora:
                load_lora_into(model, input_dir)
            else:
                loaded = FluxTransformer2DModel.from_pretrained(os.path.join(input_dir, "transformer"))
                target = model.state_dict()
                model.load_state_dict({k: v.to(target[k].dtype) for k, v in loaded.state_dict().items()})
                del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
