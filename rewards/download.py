"""Fetch every reward model's real weights into one folder, on a connected machine, so that
training and evaluation can run offline with `--reward_models_dir`.

    python -m rewards.download --output_dir weights/rewards [--names hpsv2,pickscore]

Layout written (what each loader reads from `<dir>/<name>/`):
    hpsv2/HPS_v2.1_compressed.pt                       (architecture: open_clip's built-in ViT-H-14)
    clip/open_clip_config.json + open_clip_model.safetensors
    pickscore/  PickScore_v1 CLIPModel + the laion CLIP-H processor files
    aesthetic/siglip/ (SigLIP so400m) + aesthetic_predictor_v2_5.pth
    imagereward/ImageReward.pt + med_config.json + BLIP's BERT tokenizer (with [DEC], [ENC])
    hpsv3/HPSv3.safetensors + Qwen2-VL-7B-Instruct's config.json and tokenizer files (about 17 GB)
"""

import argparse
import os
import sys

from .aesthetic import HEAD_FILE, HEAD_URL, SIGLIP_MODEL
from .hpsv3 import BASE_MODEL as HPSV3_BASE_MODEL
from .hpsv3 import CHECKPOINT_FILE as HPSV3_FILE
from .hpsv3 import HPSV3_REPO
from .image_reward import CHECKPOINT_FILE, IMAGE_REWARD_REPO, MED_CONFIG_FILE
from .open_clip_rewards import CLIP_H14_HUB, HPS_FILE, HPS_REPO
from .pickscore import PICKSCORE_MODEL, PICKSCORE_PROCESSOR

PROCESSOR_FILES = ["preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json"]


def download_hpsv2(folder):
    from huggingface_hub import hf_hub_download

    hf_hub_download(HPS_REPO, HPS_FILE, local_dir=folder)


def download_clip(folder):
    from huggingface_hub import snapshot_download

    snapshot_download(CLIP_H14_HUB.removeprefix("hf-hub:"), local_dir=folder,
                      allow_patterns=["open_clip_config.json", "open_clip_model.safetensors"])


def download_pickscore(folder):
    from huggingface_hub import snapshot_download

    snapshot_download(PICKSCORE_MODEL, local_dir=folder, allow_patterns=["config.json", "*.safetensors", "*.bin"])
    snapshot_download(PICKSCORE_PROCESSOR, local_dir=folder, allow_patterns=PROCESSOR_FILES)


def download_aesthetic(folder):
    import torch
    from huggingface_hub import snapshot_download

    snapshot_download(SIGLIP_MODEL, local_dir=os.path.join(folder, "siglip"),
                      allow_patterns=["config.json", "*.safetensors", "preprocessor_config.json"])
    torch.hub.download_url_to_file(HEAD_URL, os.path.join(folder, HEAD_FILE))


def download_imagereward(folder):
    from huggingface_hub import hf_hub_download
    from transformers import BertTokenizer

    for filename in (CHECKPOINT_FILE, MED_CONFIG_FILE):
        hf_hub_download(IMAGE_REWARD_REPO, filename, local_dir=folder)
    tokenizer = BertTokenizer.from_pretrained("bert-base-uncased")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.save_pretrained(folder)


def download_hpsv3(folder):
    from huggingface_hub import hf_hub_download, snapshot_download

    hf_hub_download(HPSV3_REPO, HPSV3_FILE, local_dir=folder)
    # Qwen2-VL's own weights are not needed: HPSv3.safetensors holds the whole fine-tuned model.
    snapshot_download(HPSV3_BASE_MODEL, local_dir=folder, allow_patterns=["config.json", *PROCESSOR_FILES])


DOWNLOADERS = {
    "hpsv2": download_hpsv2, "clip": download_clip, "pickscore": download_pickscore,
    "aesthetic": download_aesthetic, "imagereward": download_imagereward, "hpsv3": download_hpsv3,
}


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="weights/rewards")
    parser.add_argument("--names", default=",".join(DOWNLOADERS))
    args = parser.parse_args(input_args)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    unknown = [n for n in names if n not in DOWNLOADERS]
    if unknown:
        parser.error(f"unknown reward '{unknown[0]}'; choose from {', '.join(DOWNLOADERS)}")
    for name in names:
        folder = os.path.join(args.output_dir, name)
        os.makedirs(folder, exist_ok=True)
        try:
            DOWNLOADERS[name](folder)
        except Exception as error:  # offline, a proxy, a moved file: one line saying which model and why
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            sys.exit(f"error: {name}: could not fetch its weights ({type(error).__name__}: {reason}); run this on a machine "
                     f"that reaches huggingface.co{' and github.com' if name == 'aesthetic' else ''}, then copy {args.output_dir}")
        print(f"{name} -> {folder}")


if __name__ == "__main__":
    main()
