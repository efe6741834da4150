"""Our reward loaders against the reward authors' own packages, at full size, on the CPU.

    python tools/check_rewards_against_packages.py [--cache /tmp/reward-packages]

No reward weights can be downloaded here, so each check builds the package's own model with random
weights, saves them in the layout of the released file (ImageReward.pt, HPS_v2.1_compressed.pt,
aesthetic_predictor_v2_5.pth + the SigLIP folder, HPSv3.safetensors), loads that file with our loader, and compares the
scores of the same inputs. A wrong name mapping, shape or formula shows as a failed load or a
different score. The packages are fetched as wheels (`pip download --no-deps`, from the package
registry) and imported from their unpacked files, with stubs for the imports they need and current
libraries lack (fairscale, clip, clint, transformers 4.x helpers). Needs about 10 GB of memory and a
few minutes. Exit status 1 if any score differs by more than TOLERANCE.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
PACKAGES = {"image_reward": "image-reward==1.5", "hpsv2": "hpsv2==1.2.0",
            "aesthetic_predictor_v2_5": "aesthetic-predictor-v2-5==2024.12.18.1", "hpsv3": "hpsv3==1.0.0"}
# hpsv3 pins transformers 4.45.2, whose Qwen2-VL classes differ from current ones: its side of the
# check runs in a venv of its own that sees this one's packages behind its transformers.
HPSV3_PINS = ["transformers==4.45.2", "tokenizers<0.21", "huggingface_hub<1.0"]
TOLERANCE = 1e-5
# BLIP's configs/med_config.json, which THUDM/ImageReward ships: encoder_width says 768, and
# BLIP_Pretrain replaces it with its ViT-L's 1024.
BLIP_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True,
}


def unpack_packages(cache):
    """Each package's wheel, unpacked into cache/<name>/ and put on sys.path."""
    wheels = os.path.join(cache, "wheels")
    missing = [spec for name, spec in PACKAGES.items() if not os.path.isdir(os.path.join(cache, name))]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels, *missing], check=True)
    for name in PACKAGES:
        target = os.path.join(cache, name)
        if not os.path.isdir(target):
            (wheel,) = glob.glob(os.path.join(wheels, name + "-*.whl"))
            zipfile.ZipFile(wheel).extractall(target)
        sys.path.insert(0, target)
    # hpsv2's wheel lacks its tokenizer vocabulary: CLIP's BPE file, which open_clip carries.
    import open_clip

    vocab = "bpe_simple_vocab_16e6.txt.gz"
    shutil.copy(os.path.join(os.path.dirname(open_clip.__file__), vocab), os.path.join(cache, "hpsv2", "hpsv2", "src", "open_clip", vocab))


def stub_missing_imports():
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils
    from transformers.utils import ModelOutput

    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations",
                 "clip", "clint", "clint.textui", "transformers.file_utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = lambda module, **kwargs: module
    sys.modules["clint.textui"].progress = None
    sys.modules["transformers.file_utils"].ModelOutput = ModelOutput
    modeling_utils.apply_chunking_to_forward = pytorch_utils.apply_chunking_to_forward
    modeling_utils.prune_linear_layer = pytorch_utils.prune_linear_layer
    modeling_utils.find_pruneable_heads_and_indices = None


def _write_stand_in_blip_tokenizer(folder):
    """A tokenizer of BLIP's size (30522 + [DEC] + [ENC]), since bert-base-uncased's vocabulary is
    not here; the check feeds token ids to both models directly."""
    from transformers import BertTokenizer

    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"word{i}" for i in range(30517)]) + "\n")
    tokenizer = BertTokenizer(vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokenizer.save_pretrained(folder)


def check_image_reward(folder):
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    import ImageReward.models.BLIP.med as med
    from ImageReward.ImageReward import ImageReward

    import rewards.image_reward as ours

    blip_pretrain.init_tokenizer = lambda: None  # bert-base-uncased is not here; both models get the same token ids
    # BLIP's BERT is a transformers 4.x PreTrainedModel: what it calls that transformers 5 dropped.
    med.BertModel.init_weights = lambda self: None  # torch's default init: random, which is all this needs
    med.BertModel.get_head_mask = lambda self, head_mask, layers: [None] * layers
    med.BertModel.invert_attention_mask = lambda self, mask: (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    med_config = os.path.join(folder, ours.MED_CONFIG_FILE)
    json.dump(BLIP_MED_CONFIG, open(med_config, "w"))
    reference = ImageReward(med_config).eval()
    with torch.no_grad():
        for parameter in reference.mlp.parameters():  # the package's MLP init is tiny: give the score some range
            parameter.normal_(0, 0.05)
    torch.save(reference.state_dict(), os.path.join(folder, ours.CHECKPOINT_FILE))
    _write_stand_in_blip_tokenizer(folder)
    model = ours.load_image_reward(folder)
    ids = torch.randint(1000, 30000, (2, 35))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.score_gard(ids, mask, pixels).squeeze(-1)
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        text = model.text_model(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long)).last_hidden_state
        got = (model.head(text[:, 0]).squeeze(-1) - ours.SCORE_MEAN) / ours.SCORE_STD
    return expected, got


def check_hpsv2(folder):
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

    import rewards.open_clip_rewards as ours

    reference = create_model_and_transforms(
        "ViT-H-14", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False,
    )[0].eval()
    torch.save({"state_dict": reference.state_dict()}, os.path.join(folder, ours.HPS_FILE))  # as the release stores it
    model = ours.load_hpsv2(folder)
    prompts = ["a photo of a cat on a red sofa", "an astronaut riding a horse, oil painting"]
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = reference(pixels, get_tokenizer("ViT-H-14")(prompts))
        expected = torch.diagonal(out["image_features"] @ out["text_features"].T)  # hpsv2's img_score.py
        features = model._image_features(pixels)  # encode_image without the resize from the generator's size
        got = model.score_features(features / features.norm(dim=-1, keepdim=True), model.encode_text(prompts))
    return expected, got


def check_aesthetic(folder):
    from aesthetic_predictor_v2_5.siglip_v2_5 import AestheticPredictorV2_5Model
    from transformers import SiglipImageProcessor, SiglipVisionConfig

    import rewards.aesthetic as ours

    # google/siglip-so400m-patch14-384's vision tower
    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=384, patch_size=14)
    reference = AestheticPredictorV2_5Model(config).eval()
    with torch.no_grad():
        for parameter in reference.layers.parameters():
            parameter.normal_(0, 0.05)
    reference.save_pretrained(os.path.join(folder, "siglip"))
    SiglipImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        os.path.join(folder, "siglip"))
    torch.save(reference.layers.state_dict(), os.path.join(folder, ours.HEAD_FILE))  # the released .pth: scoring_head.N.*
    model = ours.load_aesthetic(folder)
    pixels = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits.squeeze(-1)
        features = model._image_features(pixels)
        got = model.head(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)
    return expected, got


def transformers_445_python(cache):
    """A Python with transformers 4.45.2 in front and this environment's other packages behind it."""
    import site

    venv = os.path.join(cache, "transformers-4.45")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, "ready")):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *HPSV3_PINS], check=True)
        own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                             capture_output=True, text=True).stdout.strip()
        with open(os.path.join(own, "zz_outer_environment.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
        open(os.path.join(venv, "ready"), "w").close()
    return python


def check_hpsv3(folder, cache):
    """The package's Qwen2VLRewardModelBT at Qwen2-VL-7B's widths (2 + 2 layers), saved as HPSv3.safetensors
    under transformers 4.45.2 and scored by the package's inference steps (tools/hpsv3_package_side.py);
    the same file and PNGs through our loader. Two 448 x 448 images (no resize: the scores must agree)
    and one 720 x 1280 (resized: PIL's bicubic on uint8 there, antialiased bicubic on floats here;
    its difference is printed, not held to TOLERANCE)."""
    import numpy
    from PIL import Image

    from flux_rl.tiny_models import build_qwen2_tokenizer
    from rewards.hpsv3 import load_hpsv3

    build_qwen2_tokenizer().save_pretrained(folder)  # Qwen2-VL's special tokens; its 151k vocabulary is not here
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i, (height, width) in enumerate([(448, 448), (448, 448), (720, 1280)]):
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).round().to(torch.uint8)
        paths.append(os.path.join(folder, f"image{i}.png"))
        Image.fromarray(pixels.numpy()).save(paths[-1])
    side = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hpsv3_package_side.py")
    subprocess.run([transformers_445_python(cache), side, os.path.join(cache, "hpsv3"), folder, *paths], check=True)
    with open(os.path.join(folder, "package_scores.json")) as f:
        package = json.load(f)
    model = load_hpsv3(folder)
    with torch.no_grad():
        got = torch.cat([model(torch.from_numpy(numpy.array(Image.open(path))).permute(2, 0, 1)[None] / 255.0, [prompt])
                         for path, prompt in zip(paths, package["prompts"])])
    expected = torch.tensor(package["mu"])
    print(f"HPSv3 on a 720 x 1280 image (resized both sides): package {expected[2]:.6f}, ours {got[2]:.6f}, "
          f"difference {abs(expected[2] - got[2]):.2g}", flush=True)
    return expected[:2], got[:2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "reward-packages"))
    parser.add_argument("--only", default=None, help="one check by name: ImageReward, HPSv2.1, 'Aesthetic v2.5' or HPSv3")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    unpack_packages(args.cache)
    stub_missing_imports()
    failed = False
    checks = (("ImageReward", check_image_reward), ("HPSv2.1", check_hpsv2), ("Aesthetic v2.5", check_aesthetic),
              ("HPSv3", lambda folder: check_hpsv3(folder, args.cache)))
    for name, check in checks:
        if args.only and name.lower() != args.only.lower():
            continue
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:
            expected, got = check(folder)
        difference = (expected - got).abs().max().item()
        failed |= difference > TOLERANCE
        print(f"{name}: package {[round(x, 6) for x in expected.tolist()]}, ours {[round(x, 6) for x in got.tolist()]}, "
              f"max difference {difference:.2g}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
