"""Prepare HPDv2 (the paper's data) on a connected machine, without its hub loading script
(datasets >= 4 no longer runs dataset scripts).

    python -m flux_rl.hpdv2 --output_dir data/hpdv2

writes data/hpdv2/prompts.txt (the unique training prompts, one per line, for --dataset_name) and
data/hpdv2/benchmark/{anime,concept-art,paintings,photo}.json (for evaluate_flux.py
--hpdv2_benchmark_dir). `--train_json` uses an already downloaded train.json instead.
"""

import argparse
import json
import os
import sys

TRAIN_REPO, TRAIN_FILE = "ymhao/HPDv2", "train.json"
BENCHMARK_REPO = "zhwang/HPDv2"
STYLES = ("anime", "concept-art", "paintings", "photo")


def unique_prompts(train_json: str) -> list[str]:
    """train.json is a list of {"prompt", "file_path", "human_preference"}: one prompt per image pair."""
    with open(train_json) as f:
        records = json.load(f)
    return sorted({r["prompt"].strip() for r in records if r.get("prompt", "").strip()})


def write_prompts(prompts: list[str], path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(p.replace("\n", " ") for p in prompts) + "\n")
    return path


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/hpdv2")
    parser.add_argument("--train_json", default=None, help="A local train.json (default: download it from ymhao/HPDv2).")
    parser.add_argument("--skip_benchmark", action="store_true")
    args = parser.parse_args(input_args)
    from huggingface_hub import hf_hub_download

    from .hub import first_line

    def fetch(repo, filename, **kwargs):
        try:
            return hf_hub_download(repo, filename, repo_type="dataset", **kwargs)
        except Exception as error:  # offline, a proxy, a moved file: one line saying which file and why
            sys.exit(f"error: could not fetch {filename} of the dataset {repo} ({type(error).__name__}: {first_line(error)}); run this on "
                     "a machine that reaches huggingface.co, or pass an already downloaded --train_json")

    train_json = args.train_json or fetch(TRAIN_REPO, TRAIN_FILE)
    prompts = unique_prompts(train_json)
    path = write_prompts(prompts, os.path.join(args.output_dir, "prompts.txt"))
    print(f"{len(prompts)} unique prompts -> {path}")
    if not args.skip_benchmark:
        for style in STYLES:
            fetch(BENCHMARK_REPO, f"benchmark/{style}.json", local_dir=args.output_dir)
        print(f"benchmark prompts -> {os.path.join(args.output_dir, 'benchmark')}")


if __name__ == "__main__":
    main()
