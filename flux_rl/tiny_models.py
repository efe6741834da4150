"""Write tiny, randomly initialised stand-ins for every model this project loads.

    python -m flux_rl.tiny_models --output_dir tiny-models

writes, fully offline:

    tiny-models/flux/                 a FluxPipeline folder (FluxTransformer2DModel, AutoencoderKL with
                                      FLUX's 16 latent channels / 0.3611 scale / 0.1159 shift, CLIP + T5
                                      text encoders and tokenizers, FlowMatchEulerDiscreteScheduler)
    tiny-models/qwen-image/           a QwenImagePipeline folder (QwenImageTransformer2DModel, AutoencoderKLQwenImage with
                                      latent mean / std, a Qwen2.5-VL text encoder and BPE tokenizer, Qwen-Image's scheduler)
    tiny-models/flux2-klein/          a Flux2KleinPipeline folder (Flux2Transformer2DModel, AutoencoderKLFlux2 with BatchNorm
                                      latent statistics, a 27-layer Qwen3 text encoder)
    tiny-models/sd3/                  a StableDiffusion3Pipeline folder in SD3.5's layout (SD3Transformer2DModel, AutoencoderKL,
                                      CLIP-L, CLIP-G and T5 text encoders)
    tiny-models/zimage/               a ZImagePipeline folder (ZImageTransformer2DModel, FLUX.1's tiny VAE, a Qwen3 text encoder)
    tiny-models/rewards/hpsv2/        open_clip_config.json + HPS_v2.1_compressed.pt ({"state_dict": ...})
    tiny-models/rewards/clip/         open_clip_config.json + open_clip_model.safetensors (open_clip hub layout)
    tiny-models/rewards/pickscore/    a transformers CLIPModel + CLIPProcessor folder
    tiny-models/rewards/aesthetic/    siglip/ (SiglipVisionModel + processor) + aesthetic_predictor_v2_5.pth
    tiny-models/rewards/imagereward/  ImageReward.pt in the original BLIP layout + med_config.json
                                      (+ vision_config.json and a BERT tokenizer, which the real one takes from defaults)
    tiny-models/rewards/hpsv3/        HPSv3.safetensors in the release layout + a Qwen2-VL config.json and
                                      byte-level tokenizer (+ hpsv3_config.json: a 112 x 112 image)

Each folder has the layout of the real model, so the project's real loaders read it unchanged
(`FluxPipeline.from_pretrained`, open_clip `local-dir:`, transformers `from_pretrained`). The
tests and the README's smoke run use these folders; nothing here touches the network.
"""

import argparse
import gzip
import json
import os

import torch

# One small width for every text/image tower keeps the whole set at a few MB and each forward
# pass at milliseconds on a CPU.
TINY_WIDTH = 32
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_clip_tokenizer():
    """A transformers CLIPTokenizer identical to open_clip's, built from the BPE file open_clip ships."""
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges_text = f.read().split("\n")
    # Same slice open_clip's SimpleTokenizer takes: 49152 - 256 - 2 merges after the header line.
    merges = [tuple(line.split()) for line in merges_text[1 : 49152 - 256 - 2 + 1]]
    from open_clip.tokenizer import bytes_to_unicode

    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer():
    """A small T5 unigram tokenizer from a hand-made vocabulary (no sentencepiece training)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,-'"]
    pieces += [("\u2581" + c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    words = ["a", "the", "of", "photo", "cat", "dog", "real", "detail", "painting", "anime", "art"]
    pieces += [("\u2581" + w, -3.0) for w in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# FLUX.1-dev's transformer and VAE configurations, and the tiny ones with the same structure.
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=[16, 56, 56])
TINY_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=TINY_WIDTH, pooled_projection_dim=TINY_WIDTH,
                        axes_dims_rope=[4, 4, 8])  # in_channels 64 = 4 x the VAE's 16 latent channels (2x2 packing)
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                    latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False)
# A CLIP text tower with the real token ids (49406 start, 49407 end and padding).
TINY_CLIP_TEXT = dict(hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TINY_VAE = dict(FLUX_DEV_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8)


def write_flux_pipeline(path, seed=0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**TINY_CLIP_TEXT, vocab_size=len(clip_tokenizer), projection_dim=TINY_WIDTH)
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=TINY_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )
    # FLUX.1-dev's scheduler config: resolution-dependent shift between 0.5 and 1.15.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path)


def tiny_open_clip_config():
    return {
        "model_cfg": {
            "embed_dim": TINY_WIDTH,
            "vision_cfg": {"image_size": 224, "layers": 1, "width": TINY_WIDTH, "head_width": 16, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TINY_WIDTH, "heads": 2, "layers": 1},
        },
        # HPSv2 / laion CLIP preprocessing: 224, bicubic, OpenAI CLIP mean/std.
        "preprocess_cfg": {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "interpolation": "bicubic"},
    }


def _tiny_open_clip_model(config):
    import open_clip

    return open_clip.CLIP(**config["model_cfg"])


def write_hpsv2(path, seed=1):
    """Layout of the real HPSv2.1 release: a `HPS_v2.1_compressed.pt` holding {"state_dict": ...}.
    The real architecture is open_clip's ViT-H-14; here `open_clip_config.json` names a tiny one."""
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    config = tiny_open_clip_config()
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    model = _tiny_open_clip_model(config)
    torch.save({"state_dict": model.state_dict()}, os.path.join(path, "HPS_v2.1_compressed.pt"))


def write_open_clip(path, seed=2):
    """Layout of an open_clip hub repo (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    config = tiny_open_clip_config()
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    model = _tiny_open_clip_model(config)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "open_clip_model.safetensors"))


def write_pickscore(path, seed=3):
    """Layout of yuvalkirstain/PickScore_v1 (CLIPModel) with the laion CLIP-H processor beside it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(**TINY_CLIP_TEXT, vocab_size=49408),
        vision_config=dict(
            hidden_size=TINY_WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=TINY_WIDTH,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        resample=3,  # bicubic
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())
    model.save_pretrained(path)
    processor.save_pretrained(path)


def write_aesthetic(path, seed=4):
    """Aesthetic Predictor v2.5 layout: a SigLIP vision tower folder + the MLP head's state dict."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from rewards.aesthetic import AestheticHead

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=384, patch_size=48,
    )
    SiglipVisionModel(config).save_pretrained(os.path.join(path, "siglip"))
    SiglipImageProcessor(
        size={"height": 384, "width": 384}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(os.path.join(path, "siglip"))
    head = AestheticHead(TINY_WIDTH)
    torch.save(head.state_dict(), os.path.join(path, "aesthetic_predictor_v2_5.pth"))


def build_bert_tokenizer():
    """A small uncased WordPiece tokenizer with BLIP's two extra tokens ([DEC] as bos, [ENC])."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "the", "of", "photo", "cat", "dog",
             "real", "detail", "painting", "anime", "art", "car", "red"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = words + letters + ["##" + c for c in letters]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def original_blip_vision_key(key: str) -> str:
    """transformers BlipVisionModel name -> the original BLIP ViT (timm) name, written out by hand
    from BLIP's vit.py so the loader's forward mapping is checked against an independent list."""
    fixed = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    if key in fixed:
        return fixed[key]
    _, _, layer, module, *rest = key.split(".")  # encoder.layers.N.<module>...
    module = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp": "mlp"}.get(module, module)
    if module == "self_attn":
        module, rest = "attn", [{"projection": "proj"}.get(rest[0], rest[0]), *rest[1:]]
    return ".".join(["blocks", layer, module, *rest])


def write_image_reward(path, seed=5):
    """ImageReward's release layout: ImageReward.pt (blip.visual_encoder.*, blip.text_encoder.*,
    mlp.layers.*) and BLIP's med_config.json."""
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from rewards.image_reward import ImageRewardHead

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_bert_tokenizer()
    # The ViT is wider than the text encoder, as in the release (1024 vs 768), and med_config.json's
    # encoder_width is the release's stale 768, which BLIP replaces with the ViT's width.
    vision_width = TINY_WIDTH + 16
    vision = dict(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=224, patch_size=32, layer_norm_eps=1e-6)
    med_config = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": TINY_WIDTH, "intermediate_size": 64,
                  "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
                  "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(tokenizer),
                  "encoder_width": 768, "add_cross_attention": True,
                  "bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id}
    vision_model = BlipVisionModel(BlipVisionConfig(**vision))
    text_model = BlipTextModel(BlipTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        encoder_hidden_size=vision_width, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
        # BERT's 0.02 makes the tiny text side all but blind to the image (score gradients ~1e-11 in the
        # pixels): a wider initialisation lets the gradient tests see a direction.
        initializer_range=0.3,
    ), add_pooling_layer=False)
    head = ImageRewardHead(TINY_WIDTH)
    state = {f"blip.visual_encoder.{original_blip_vision_key(k)}": v for k, v in vision_model.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text_model.state_dict().items()})
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.zeros(8, vision_width)  # present in the release, unused for scoring
    torch.save(state, os.path.join(path, "ImageReward.pt"))
    with open(os.path.join(path, "med_config.json"), "w") as f:
        json.dump(med_config, f, indent=2)
    with open(os.path.join(path, "vision_config.json"), "w") as f:
        json.dump(vision, f, indent=2)
    tokenizer.save_pretrained(path)


QWEN2VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's chat_template.json (what its processor's apply_chat_template renders).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_tokenizer():
    """A byte-level BPE tokenizer in Qwen2's format, bytes only (no merges), with Qwen2-VL's special
    tokens; <|Reward|> is not in it, as it is not in Qwen2-VL's: the HPSv3 loader adds it."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import Qwen2Tokenizer

    vocab = {token: i for i, token in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2VL_SPECIAL_TOKENS})
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen2vl_config(tokenizer, vocab_size):
    from transformers import Qwen2VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2VL_SPECIAL_TOKENS}
    return Qwen2VLConfig(
        # head_dim 8: M-RoPE's sections (t, h, w) split its 4 frequencies 1 + 1 + 2, as 7B's 64 split 16 + 24 + 24.
        text_config=dict(hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, rms_norm_eps=1e-6, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=2, embed_dim=TINY_WIDTH, hidden_size=TINY_WIDTH, num_heads=4, mlp_ratio=2,
                           initializer_range=0.2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def write_hpsv3(path, seed=6):
    """HPSv3's release layout: HPSv3.safetensors as the hpsv3 package's Qwen2VLRewardModelBT saves it
    under transformers 4.45 (visual.*, model.* for the language model, lm_head, rm_head.{0,3,5}),
    beside a Qwen2-VL config.json and tokenizer (which the real loader takes from
    Qwen/Qwen2-VL-7B-Instruct) and hpsv3_config.json with a smaller image (112 x 112: 16 image
    tokens, the release's 448 x 448 gives 256)."""
    from safetensors.torch import save_file
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, Qwen2VLTextModel

    from rewards.hpsv3 import REWARD_TOKEN, SETTINGS_FILE, RankNetHead

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_qwen2_tokenizer()
    config = tiny_qwen2vl_config(tokenizer, vocab_size=len(tokenizer) + 1)  # + <|Reward|>, as the release resizes
    visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
    language_model = Qwen2VLTextModel._from_config(config.get_text_config())
    head = RankNetHead(TINY_WIDTH)
    for layer in (head[0], head[3], head[5]):  # wide enough that scores differ visibly between images
        torch.nn.init.normal_(layer.weight, std=1.0 / layer.in_features**0.5)
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state.update({f"model.{k}": v for k, v in language_model.state_dict().items()})
    state["lm_head.weight"] = torch.zeros(config.get_text_config().vocab_size, TINY_WIDTH)  # in the release, unused for scoring
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "HPSv3.safetensors"))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, SETTINGS_FILE), "w") as f:
        json.dump({"image_pixels": 112 * 112}, f)
    assert REWARD_TOKEN not in tokenizer.get_vocab()


def build_qwen_image_tokenizer():
    """Qwen2's byte-level BPE format with merges learnt here (offline) from Qwen-Image's prompt
    template, so that the template's head before the prompt is 34 tokens, as with Qwen2.5-VL's own
    tokenizer: QwenImagePipeline drops exactly its first 34 token states (prompt_template_encode_start_idx)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    template = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
    corpus = [template.format("")] * 20 + ["a photo of a cat", "a red car", "a lighthouse", "a painting of a dog"] * 5
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=380, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2VL_SPECIAL_TOKENS})
    return tokenizer


# Qwen/Qwen-Image's scheduler_config.json: an exponential, resolution-dependent shift (0.5 to 0.9), ending at 0.02.
QWEN_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


# diffusers' defaults of QwenImageTransformer2DModel and AutoencoderKLQwenImage are Qwen-Image's (20.4B); the tiny ones:
TINY_QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                   num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
TINY_QWEN_IMAGE_VAE = dict(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                           latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])


def write_qwen_image_pipeline(path, seed=7):
    """A QwenImagePipeline folder: diffusers' own test sizes (transformer 2 layers of 3 x 16 heads, a video VAE
    with 4 latent channels and 4x downsampling) with latent statistics that are not 0 / 1, so that their use
    is tested, a tiny Qwen2.5-VL text encoder and Qwen-Image's scheduler config."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_qwen_image_tokenizer()
    transformer = QwenImageTransformer2DModel(**TINY_QWEN_IMAGE_TRANSFORMER)
    vae = AutoencoderKLQwenImage(**TINY_QWEN_IMAGE_VAE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2VL_SPECIAL_TOKENS}
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=len(tokenizer), rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                                     "rope_theta": 1e6},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(path)


# A chat template in Qwen3's shape for the tiny tokenizer: Flux2KleinPipeline renders each prompt as a user turn
# with thinking turned off (enable_thinking=False adds the empty think block, as Qwen3's own template does).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


# FLUX.2 [klein] base 4B's transformer (its config.json's values; the benchmark builds it with random weights) and the
# tiny one; AutoencoderKLFlux2's defaults are FLUX.2's VAE.
KLEIN_4B_TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                            axes_dims_rope=[32, 32, 32, 32], guidance_embeds=False)
TINY_KLEIN_TRANSFORMER = dict(KLEIN_4B_TRANSFORMER, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=[4, 4, 4, 4])
KLEIN_VAE = {}
TINY_KLEIN_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                      latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False)


def write_flux2_klein_pipeline(path, seed=8):
    """A Flux2KleinPipeline folder (a non-distilled klein "base", so guidance > 1 is classifier-free):
    diffusers' test sizes for the transformer (1 double + 1 single block), a 27-layer Qwen3 of width
    16 (the pipeline reads its layers 9, 18 and 27: text width 48), a 3-level AutoencoderKLFlux2 with 4
    latent channels whose BatchNorm statistics are not 0 / 1, so that their use is tested."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_qwen_image_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
        vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
    )).eval()
    transformer = Flux2Transformer2DModel(**TINY_KLEIN_TRANSFORMER)
    vae = AutoencoderKLFlux2(**TINY_KLEIN_VAE)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                       is_distilled=False).save_pretrained(path)


def write_sd3_pipeline(path, seed=9):
    """A StableDiffusion3Pipeline folder as SD3.5 is laid out (patch 2, 16 latent channels, VAE scale 1.5305 and
    shift 0.0609, CLIP-L + CLIP-G + T5, a fixed shift of 3), at the tiny widths of the FLUX.1 folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    clip_l, clip_g = (CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_TEXT, vocab_size=len(clip_tokenizer),
                                                                 projection_dim=TINY_WIDTH)) for _ in range(2))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=2 * TINY_WIDTH, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0))
    # joint_attention_dim = T5's width, which CLIP-L | CLIP-G (2 x 32) is padded to; pooled = 32 + 32.
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=2 * TINY_WIDTH,
                                        caption_projection_dim=32, pooled_projection_dim=2 * TINY_WIDTH, pos_embed_max_size=16)
    vae = AutoencoderKL(**dict(TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609))
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=clip_g, tokenizer_2=clip_tokenizer,
                             text_encoder_3=t5, tokenizer_3=t5_tokenizer).save_pretrained(path)


def write_zimage_pipeline(path, seed=10):
    """A ZImagePipeline folder: diffusers' test sizes for the transformer (2 layers, 1 refiner layer each, width 32),
    a 2-layer Qwen3 of width 16, FLUX.1's tiny VAE (Z-Image uses FLUX.1's), a fixed shift of 3."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = build_qwen_image_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512,
                                          pad_token_id=tokenizer.pad_token_id)).eval()
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                           n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4],
                                           axes_lens=[256, 32, 32])
    with torch.no_grad():  # made with torch.empty: fixed, as diffusers' own tests do
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**TINY_VAE), text_encoder=text_encoder,
                   tokenizer=tokenizer, transformer=transformer).save_pretrained(path)


def write_all(output_dir):
    write_flux_pipeline(os.path.join(output_dir, "flux"))
    write_qwen_image_pipeline(os.path.join(output_dir, "qwen-image"))
    write_flux2_klein_pipeline(os.path.join(output_dir, "flux2-klein"))
    write_sd3_pipeline(os.path.join(output_dir, "sd3"))
    write_zimage_pipeline(os.path.join(output_dir, "zimage"))
    rewards_dir = os.path.join(output_dir, "rewards")
    write_hpsv2(os.path.join(rewards_dir, "hpsv2"))
    write_open_clip(os.path.join(rewards_dir, "clip"))
    write_pickscore(os.path.join(rewards_dir, "pickscore"))
    write_aesthetic(os.path.join(rewards_dir, "aesthetic"))
    write_image_reward(os.path.join(rewards_dir, "imagereward"))
    write_hpsv3(os.path.join(rewards_dir, "hpsv3"))
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="tiny-models")
    args = parser.parse_args()
    write_all(args.output_dir)
    print(f"wrote tiny models to {args.output_dir}/flux and {args.output_dir}/rewards")


if __name__ == "__main__":
    main()
