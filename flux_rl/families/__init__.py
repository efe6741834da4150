"""The model families the trainers train: one adapter module each, which knows how the family
encodes prompts, where its image tokens sit, how its transformer is called at (x, sigma,
conditioning, guidance), how its VAE decodes and encodes, and which layers LoRA adapts. The
family of a checkpoint is its model_index.json's pipeline class.

| module        | pipeline           | guidance                                      |
|---------------|--------------------|-----------------------------------------------|
| flux1         | FluxPipeline       | embedded (FLUX.1-dev's guidance input), 1 pass |
| flux2_klein   | Flux2KleinPipeline | true CFG against "", 2 passes when > 1        |
| qwen_image    | QwenImagePipeline  | true CFG against " ", 2 passes when > 1       |
| sd3           | StableDiffusion3Pipeline | true CFG against "", 2 passes when > 1  |
| zimage        | ZImagePipeline     | CFG pos + g (pos - neg) against "", 2 passes when > 0 |

Each module has the same names: PIPELINE, NAME, EXAMPLE_CHECKPOINT, GUIDANCE, LORA_PRESETS,
TABULATES_MODULATIONS, prompt_encoder(), text_encoders(), initial_noise(), positions(), velocity(),
dynamic_mu(), pipeline_guidance(), decode(), encode(). FLUX.1 and Qwen-Image pack latents alike
(2 x 2 patches into tokens: flux_rl/latents.py); FLUX.2 patchifies into channels and packs them last;
SD3's and Z-Image's latents stay unpacked (their transformers patchify them).
"""

from . import flux1, flux2_klein, qwen_image, sd3, zimage

FAMILIES = {module.PIPELINE: module for module in (flux1, flux2_klein, qwen_image, sd3, zimage)}
SUPPORTED_PIPELINES = tuple(FAMILIES)


def family_of(pipeline_or_class):
    """The adapter of a pipeline object or of its class name."""
    name = pipeline_or_class if isinstance(pipeline_or_class, str) else type(pipeline_or_class).__name__
    return FAMILIES[name]


# The transformer class of each family, for code that holds the model only (models.prepare_for_training).
TRANSFORMERS = {"FluxTransformer2DModel": flux1, "Flux2Transformer2DModel": flux2_klein, "QwenImageTransformer2DModel": qwen_image,
                "SD3Transformer2DModel": sd3, "ZImageTransformer2DModel": zimage}


def family_of_model(transformer):
    """The adapter of a (possibly wrapped: DDP, torch.compile) transformer."""
    while type(transformer).__name__ not in TRANSFORMERS and hasattr(transformer, "module"):
        transformer = transformer.module
    return TRANSFORMERS[type(transformer).__name__]
