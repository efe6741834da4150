#!/usr/bin/env python
"""Evaluate FLUX and trained outputs on the paper's Table 1 metrics (HPSv2.1, PickScore,
Aesthetic 2.5, ImageReward, CLIP score, SGP-HPS), on HPDv2's benchmark or any prompt file.

    python evaluate_flux.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --models srpo=output/srpo-hps-lora direct-align=output/direct-align-hps \
        --hpdv2_benchmark_dir data/hpdv2/benchmark --output_dir eval/hpdv2

Same prompts and seeds for every model (the base model is always included as `base`). Images
already in output_dir/images are kept, so an interrupted run continues where it stopped; a rerun
with other settings, weights or prompts than those images had is refused. Writes
scores.csv (per image), table.md (mean per metric per model, overall and per style), grids/
(side-by-side images, same prompt and seed), distributions.png.

On several GPUs, `accelerate launch --num_processes 8 evaluate_flux.py ...`: each process
generates its share of the images (every 8th, same seeds as on one GPU), then the main process
scores them all and writes the report.
"""

import argparse
import os
import sys

import torch
from tqdm.auto import tqdm

import rewards
from flux_rl import evaluation, families, hub, models
from flux_rl.args import COMMON_RANGES, check_ranges, one_line_errors, parse_size, run_cli
from flux_rl.errors import ConfigurationError
from flux_rl.launcher import add_launch_args


def parse_args(input_args=None):
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    a = parser.add_argument
    a("--pretrained_model_name_or_path", type=str, required=True)
    a("--cache_dir", type=str, default=None, help="Where FLUX is downloaded and cached (default: the Hugging Face cache).")
    a("--models", type=str, nargs="*", default=[],
      help="Trained outputs as name=folder or name=hub-id (LoRA or full fine-tune, as the trainers save and push them).")
    a("--run_checkpoints", type=str, default=None,
      help="A trainer's --output_dir: every checkpoint of it (as step-N) and its final weights are evaluated too, and "
           "by_step.png plots each metric against the step (the run's best held-out step marked), to pick the step before "
           "reward hacking.")
    a("--hpdv2_benchmark_dir", type=str, default=None, help="Folder with anime/concept-art/paintings/photo.json.")
    a("--prompt_file", type=str, default=None, help="Any prompt file the trainers read (txt/json/csv/...).")
    a("--prompts_per_style", type=int, default=None, help="First N prompts of each style (the human study used 125).")
    a("--metrics", type=str, default=",".join(evaluation.METRICS))
    a("--reward_models_dir", type=str, default=None)
    a("--reward_module", type=str, nargs="+", default=[],
      help="Python file(s) or module(s) registering rewards of your own (as the trainers take it); their names can "
           "then be used in --metrics.")
    a("--output_dir", type=str, default="eval")
    a("--resolution", type=str, default="1024", help="One number for a square (1024), or HEIGHT,WIDTH (e.g. 768,1344).")
    a("--num_inference_steps", type=int, default=50, help="50, as the paper's evaluation.")
    a("--guidance_scale", type=float, default=3.5)
    a("--max_sequence_length", type=int, default=512)
    a("--seed", type=int, default=0, help="Image i of every model uses seed + i.")
    a("--batch_size", type=int, default=4)
    a("--num_grid_prompts", type=int, default=4, help="Prompts per style in the side-by-side grids.")
    a("--mixed_precision", type=str, default="bf16", choices=["no", "fp16", "bf16"])
    a("--verbose", action="store_true", help="Show the libraries' own loading bars and warnings too.")
    add_launch_args(parser)
    args = parser.parse_args(input_args)
    if bool(args.hpdv2_benchmark_dir) == bool(args.prompt_file):
        raise ValueError("give exactly one of --hpdv2_benchmark_dir and --prompt_file")
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    rewards.import_reward_modules(args.reward_module)
    known = evaluation.known_metrics()
    unknown = [m for m in args.metrics if m not in known]
    if unknown:
        raise ValueError(f"unknown metric '{unknown[0]}'; choose from {', '.join(known)} (or register your own with --reward_module)")
    args.resolution = parse_size(args.resolution, "resolution")
    for flag in ("num_inference_steps", "batch_size", "num_grid_prompts", "prompts_per_style"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    check_ranges(args, [
        ("guidance_scale", "non-negative", "FLUX's guidance embedding is trained on non-negative values"),
        *[entry for entry in COMMON_RANGES if entry[0] == "max_sequence_length"],
    ])
    args.model_specs = evaluation.parse_model_specs(args.models, args.cache_dir)
    if args.run_checkpoints:
        taken = {name for name, _ in args.model_specs}
        for name, path in evaluation.run_checkpoint_specs(args.run_checkpoints):
            if name in taken:
                raise ValueError(f"--models names '{name}', as --run_checkpoints does; name it otherwise")
            args.model_specs.append((name, path))
    args.benchmark_items = evaluation.load_benchmark(args.hpdv2_benchmark_dir, args.prompt_file, args.prompts_per_style)
    return args


def image_path(args, model, style, index):
    return os.path.join(args.output_dir, "images", model, style, f"{index:05d}.png")


def model_variants(args):
    """The base model, then each --models entry, in the table's order."""
    return [evaluation.ModelVariant("base", None)] + [evaluation.ModelVariant(n, p) for n, p in args.model_specs]


def check_earlier_images(args, variants, items, dtype):
    """Images already on disk are kept only if this run would render them the same way
    (evaluation.check_and_record_generation): same base, settings, weights and prompts."""
    height, width = args.resolution
    resolution = height if height == width else [height, width]  # a square's as one number, as images made before recorded it
    for variant in variants:
        settings = {"pretrained_model_name_or_path": args.pretrained_model_name_or_path, "resolution": resolution,
                    "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                    "seed": args.seed, "max_sequence_length": args.max_sequence_length, "dtype": str(dtype),
                    "weights": evaluation.weights_fingerprint(variant)}
        warning = evaluation.check_and_record_generation(
            os.path.join(args.output_dir, "images", variant.name), settings, items,
            lambda style, index: os.path.exists(image_path(args, variant.name, style, index)))
        if warning:
            print(f"warning: {warning}", file=sys.stderr)


def images_to_generate(args, variants, items, state) -> dict:
    """{variant name: the items whose image is missing}, this process's share of them. Listed by
    every process before any generates, so that all split the same lists."""
    todo = {variant.name: [item for item in items if not os.path.exists(image_path(args, variant.name, item[0], item[1]))]
            for variant in variants}
    state.wait_for_everyone()
    return {name: missing[state.process_index :: state.num_processes] for name, missing in todo.items()}


def generate(args, pipe, variants, todo, device, show_progress=True):
    for variant in variants:
        todo_of_variant = todo[variant.name]
        if not todo_of_variant:
            continue
        variant.apply(pipe)
        for start in tqdm(range(0, len(todo_of_variant), args.batch_size), desc=f"generating {variant.name}",
                          disable=not show_progress):
            batch = todo_of_variant[start : start + args.batch_size]
            generators = [torch.Generator("cpu").manual_seed(args.seed + index) for _, index, _ in batch]
            images = pipe(
                prompt=[prompt for _, _, prompt in batch], height=args.resolution[0], width=args.resolution[1],
                num_inference_steps=args.num_inference_steps, generator=generators, max_sequence_length=args.max_sequence_length,
                **families.family_of(pipe).pipeline_guidance(args.guidance_scale, len(batch)),
            ).images
            for (style, index, _), image in zip(batch, images):
                path = image_path(args, variant.name, style, index)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                image.save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)  # a half-written file never counts as done
        variant.restore(pipe)


def load_metric_models(args, device, dtype):
    needed = {m: ("hpsv2" if m == "sgp_hps" else m) for m in args.metrics}
    loaded = {}
    for name in dict.fromkeys(needed.values()):
        with hub.fetching(f"--metrics {name}", hub.REWARD_DOWNLOAD_ADVICE):
            try:
                loaded[name] = rewards.load_reward_model(name, args.reward_models_dir, device, dtype)
            except rewards.registry.RewardLoadError as error:  # damaged local weights: one line
                raise ConfigurationError(str(error)) from None
    return {metric: loaded[name] for metric, name in needed.items()}


def score(args, metric_models, variants, items, device, dtype):
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    metric_models = {name: model.to(device) for name, model in metric_models.items()}
    rows = []
    for variant in variants:
        for start in tqdm(range(0, len(items), args.batch_size), desc=f"scoring {variant.name}"):
            batch = items[start : start + args.batch_size]
            paths = [image_path(args, variant.name, style, index) for style, index, _ in batch]
            images = torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in paths]).to(device, dtype)
            scores = evaluation.score_images(metric_models, images, [prompt for _, _, prompt in batch])
            for i, ((style, index, prompt), path) in enumerate(zip(batch, paths)):
                row = {"model": variant.name, "style": style, "index": index, "seed": args.seed + index,
                       "prompt": prompt, "image": os.path.relpath(path, args.output_dir)}
                rows.append({**row, **{m: scores[m][i] for m in args.metrics}})
    return rows


def write_report(args, variants, items, rows):
    names = [v.name for v in variants]
    evaluation.write_csv(os.path.join(args.output_dir, "scores.csv"), rows, args.metrics)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(evaluation.summary_table(rows, args.metrics, names))
    os.makedirs(os.path.join(args.output_dir, "grids"), exist_ok=True)
    for style in dict.fromkeys(style for style, _, _ in items):
        chosen = [(s, i) for s, i, _ in items if s == style][: args.num_grid_prompts]
        grid = evaluation.side_by_side_grid([[image_path(args, n, s, i) for n in names] for s, i in chosen], names)
        grid.save(os.path.join(args.output_dir, "grids", f"{style}.png"))
    evaluation.distribution_plot(rows, args.metrics, names, os.path.join(args.output_dir, "distributions.png"))
    if args.run_checkpoints:
        steps, best = evaluation.run_steps(args.run_checkpoints, args.model_specs)
        evaluation.plot_by_step(rows, args.metrics, steps, os.path.join(args.output_dir, "by_step.png"), best)


def main(args):
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from flux_rl.training import quiet_libraries

    # One process (python evaluate_flux.py) or one per GPU (accelerate launch). AcceleratorState reads
    # ACCELERATE_USE_CPU itself; PartialState must be told (processes on the CPU, over gloo).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = state.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32) if device.type == "cuda" else torch.float32
    items = args.benchmark_items
    variants = model_variants(args)
    quiet_libraries(args.verbose)
    # Loaded first so that a missing reward model fails before hours of generation (and before anything is
    # written to --output_dir); kept on the CPU until scoring, so generation has the GPU memory.
    metric_models = load_metric_models(args, "cpu", dtype) if state.is_main_process else None
    if state.is_main_process:
        hub.check_base_model_reachable(args.pretrained_model_name_or_path, cache_dir=args.cache_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        check_earlier_images(args, variants, items, dtype)
    todo = images_to_generate(args, variants, items, state)
    pipe = models.load_pipeline(args.pretrained_model_name_or_path, dtype=dtype, cache_dir=args.cache_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    generate(args, pipe, variants, todo, device, show_progress=state.is_main_process)
    count = sum(len(share) for share in todo.values())
    print(f"process {state.process_index} of {state.num_processes}: generated {count} images", file=sys.stderr)
    del pipe
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    rows = score(args, metric_models, variants, items, device, dtype)
    write_report(args, variants, items, rows)
    print(open(os.path.join(args.output_dir, "table.md")).read())


if __name__ == "__main__":
    run_cli(parse_args, main)
