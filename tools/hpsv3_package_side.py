"""The hpsv3 package's side of `check_rewards_against_packages.py --hpsv3`; run by that tool under a
Python with transformers 4.45.2 (what the package pins), never imported by the project.

    python tools/hpsv3_package_side.py PACKAGE_DIR FOLDER IMAGE.png [IMAGE.png ...]

FOLDER holds a Qwen2-VL tokenizer (written by the caller). This builds the package's own
Qwen2VLRewardModelBT (rm_head "ranknet", reward token "special", as its HPSv3_7B.yaml) at
Qwen2-VL-7B's widths with 2 language and 2 vision layers, random weights, the tokenizer with
<|Reward|> added and the embeddings resized to it (as its create_model_and_processor does), saves
its state dict as FOLDER/HPSv3.safetensors and its config as FOLDER/config.json, then scores the
images as HPSv3RewardInferencer.prepare_batch/reward do and writes FOLDER/package_scores.json (mu).
The package's class and constants are executed from its own files, not imported: the modules
around them import trl, deepspeed and peft, which this check does not need.
"""

import json
import os
import sys
from typing import List, Optional

import torch
from torch import nn


def package_code(package_dir, relative, start, end, namespace):
    """Execute the lines of one of the package's files from `start` up to `end` in `namespace`."""
    with open(os.path.join(package_dir, relative)) as f:
        source = f.read()
    block = source[source.index(start): source.index(end) if end else None]
    exec(compile(block, relative, "exec"), namespace)
    return namespace


def main(package_dir, folder, images):
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    import importlib.util

    # hpsv3/dataset/utils.py alone (the package's __init__ imports its trainer): torchvision, PIL, requests.
    spec = importlib.util.spec_from_file_location("hpsv3_dataset_utils", os.path.join(package_dir, "hpsv3/dataset/utils.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    process_vision_info = utils.process_vision_info

    namespace = package_code(package_dir, "hpsv3/dataset/data_collator_qwen.py", 'INSTRUCTION = """', "class QWen2VLDataCollator", {})
    namespace.update(torch=torch, nn=nn, List=List, Optional=Optional, Qwen2VLForConditionalGeneration=Qwen2VLForConditionalGeneration)
    package_code(package_dir, "hpsv3/model/qwen2vl_trainer.py", "class Qwen2VLRewardModelBT", "def _convert_A_B_to_chosen_rejected", namespace)

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    if tokenizer.chat_template is None:  # transformers 5 writes it beside the tokenizer, 4.45 reads it from the config
        with open(os.path.join(folder, "chat_template.jinja")) as f:
            tokenizer.chat_template = f.read()
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
                                 tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    special_token_ids = processor.tokenizer.convert_tokens_to_ids(["<|Reward|>"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    # Qwen2-VL-7B-Instruct's config.json, 28 -> 2 language layers and 32 -> 2 vision blocks.
    config = Qwen2VLConfig(
        # More embedding rows than tokens, as 7B's 152064 for 151658: the resize to the tokenizer trims them.
        vocab_size=len(tokenizer) + 406, hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_window_layers=28, tie_word_embeddings=False,
        vision_config={"depth": 2, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = namespace["Qwen2VLRewardModelBT"](config, output_dim=2, reward_token="special",
                                              special_token_ids=special_token_ids, rm_head_type="ranknet")
    model.resize_token_embeddings(len(processor.tokenizer))
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    model.eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "HPSv3.safetensors"))
    config.save_pretrained(folder)

    pixels = 256 * 28 * 28  # HPSv3RewardInferencer.prepare_batch
    prompts = [f"prompt {i}: a photo of a cat on a red sofa" * (i + 1) for i in range(len(images))]
    messages = [[{"role": "user", "content": [
        {"type": "image", "image": image, "min_pixels": pixels, "max_pixels": pixels},
        {"type": "text", "text": namespace["INSTRUCTION"].format(text_prompt=text) + namespace["prompt_with_special_token"]},
    ]}] for text, image in zip(prompts, images)]
    image_inputs, _ = process_vision_info(messages)
    batch = processor(text=processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      images=image_inputs, padding=True, return_tensors="pt", videos_kwargs={"do_rescale": True})
    with torch.no_grad():
        mu = model(return_dict=True, **batch)["logits"][:, 0]
    with open(os.path.join(folder, "package_scores.json"), "w") as f:
        json.dump({"prompts": prompts, "mu": mu.tolist(), "sequence_length": batch["input_ids"].shape[1]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
