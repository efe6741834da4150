"""Pieces of the evaluation (evaluate_flux.py): benchmark prompts, model variants, metrics, and
the report files (CSV, markdown table, side-by-side grids, score distributions)."""

import csv
import json
import os
import re
from collections import defaultdict

import torch

from .errors import ConfigurationError
from .hub import fetch_trained_output
from .models import LORA_WEIGHTS_NAME

HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
METRICS = ("hpsv2", "pickscore", "aesthetic", "imagereward", "clip", "sgp_hps")
METRIC_NOTES = {
    "hpsv2": "HPSv2.1: human preference, cosine of image and prompt (about 0.2-0.35)",
    "pickscore": "PickScore: human preference, scaled cosine (about 20-23)",
    "aesthetic": "Aesthetic Predictor v2.5: image-only aesthetics (about 1-10)",
    "imagereward": "ImageReward: human preference, normalised (about -2 to 2)",
    "hpsv3": "HPSv3: human preference from Qwen2-VL-7B, mu of its head (about 1-15); a 16 GB model, so not in the default list",
    "clip": "CLIP score: text-image agreement, cosine of CLIP ViT-H-14 features",
    "sgp_hps": 'SGP-HPS: HPSv2.1 with "Realistic photo" minus with "CG Render" prepended (paper 4.2): realism',
    "toy_colour": "analytic: cosine of the image's mean colour with the colour words of the prompt (rewards/analytic.py)",
    "toy_brightness": "analytic: the mean pixel (rewards/analytic.py)",
}
SGP_WANTED, SGP_UNWANTED = "Realistic photo", "CG Render"


def known_metrics() -> list[str]:
    """METRICS, the analytic toy rewards and those registered with --reward_module (each scores as its forward() does)."""
    from rewards.registry import REWARD_LOADERS

    return [*METRICS, *(name for name in REWARD_LOADERS if name not in METRICS)]


def load_benchmark(hpdv2_benchmark_dir=None, prompt_file=None, prompts_per_style=None):
    """[(style, index, prompt)]: HPDv2's benchmark (one json list of prompts per style: anime,
    concept-art, paintings, photo; 800 each) or any prompt file the trainers read (style 'prompts')."""
    from .data import load_prompts

    if hpdv2_benchmark_dir:
        items = []
        for style in HPDV2_STYLES:
            path = os.path.join(hpdv2_benchmark_dir, f"{style}.json")
            if not os.path.exists(path):
                raise ConfigurationError(f"--hpdv2_benchmark_dir {hpdv2_benchmark_dir}: missing {style}.json (download benchmark/ from zhwang/HPDv2)")
            try:
                with open(path) as f:
                    prompts = json.load(f)
            except (ValueError, UnicodeDecodeError) as error:
                raise ConfigurationError(f"--hpdv2_benchmark_dir {hpdv2_benchmark_dir}: {style}.json is not JSON ({error}); "
                                         "download it again from zhwang/HPDv2's benchmark/") from None
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ConfigurationError(f"--hpdv2_benchmark_dir {hpdv2_benchmark_dir}: {style}.json should be a list of "
                                         "prompts (strings), as HPDv2's benchmark/ has them")
            items += [(style, i, p) for i, p in enumerate(prompts[:prompts_per_style])]
        return items
    prompts = load_prompts(prompt_file)
    return [("prompts", i, p) for i, p in enumerate(prompts[:prompts_per_style])]


def parse_model_specs(specs: list[str], cache_dir: str | None = None) -> list[tuple[str, str]]:
    """['srpo=output/srpo', 'hub=me/flux-srpo-lora', ...] -> [('srpo', 'output/srpo'), ...]: a trainer's
    --output_dir, or a Hub repository it was pushed to (its weights are downloaded, into `cache_dir`
    if given); a bare path or id is named by its last part."""
    models = []
    for spec in specs or []:
        name, _, path = spec.rpartition("=") if "=" in spec else (os.path.basename(os.path.normpath(spec)), "", spec)
        if not os.path.isdir(path):
            path = fetch_trained_output(path, cache_dir, f"--models {spec}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):  # it names a folder of images and a column of the report
            raise ConfigurationError(f"--models {spec}: name the model with letters, digits, '.', '_' or '-', e.g. srpo=output/srpo")
        if name == "base" or any(name == seen for seen, _ in models):
            raise ConfigurationError(f"--models {spec}: the name '{name}' is taken; write name=path")
        models.append((name, path))
    return models


class ModelVariant:
    """Applies a trained output to a loaded base pipeline and restores the base afterwards:
    a LoRA folder (pytorch_lora_weights.safetensors) or a full fine-tune (transformer/)."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.is_lora = path is not None and os.path.exists(os.path.join(path, LORA_WEIGHTS_NAME))
        if path is not None and not self.is_lora:
            folder = os.path.join(path, "transformer")
            if not os.path.exists(os.path.join(folder, "config.json")):
                from .checkpoints import list_checkpoints

                newest = list_checkpoints(path)[-1:]  # a run still going, or stopped: its checkpoints hold weights
                hint = f"; to evaluate its newest checkpoint, name {newest[0]}" if newest else ""
                raise ConfigurationError(f"{path}: neither pytorch_lora_weights.safetensors nor transformer/ found{hint}")

    def apply(self, pipe):
        self._base = pipe.transformer
        if self.path is None:
            return pipe
        if self.is_lora:
            pipe.load_lora_weights(self.path)
        else:  # the base's own transformer class: FluxTransformer2DModel, QwenImageTransformer2DModel
            pipe.transformer = type(self._base).from_pretrained(
                os.path.join(self.path, "transformer"), dtype=self._base.dtype
            ).to(self._base.device)
        return pipe

    def restore(self, pipe):
        if self.is_lora:
            pipe.unload_lora_weights()
        pipe.transformer = self._base


GENERATION_RECORD = "generation.json"


def weights_fingerprint(variant: ModelVariant) -> str | None:
    """A short hash that changes when a trained output's weights do (retrained under the same
    name): each weight file's size and 64 evenly spaced 64 KiB pieces of it, so a 24 GB full
    fine-tune is fingerprinted in a moment; a copy of the same files keeps it."""
    import glob
    import hashlib

    if variant.path is None:
        return None
    if variant.is_lora:
        files = [os.path.join(variant.path, LORA_WEIGHTS_NAME)]
    else:
        files = sorted(glob.glob(os.path.join(variant.path, "transformer", "*.safetensors")))
    digest = hashlib.sha256()
    for file in files:
        size = os.path.getsize(file)
        digest.update(f"{os.path.basename(file)}:{size};".encode())
        with open(file, "rb") as f:
            for piece in range(64):
                f.seek(size * piece // 64)
                digest.update(f.read(65536))
    return digest.hexdigest()[:16]


def check_and_record_generation(folder: str, settings: dict, items, image_exists) -> str | None:
    """An interrupted evaluation continues from the images on disk, which is right only if they were
    rendered as this run would render them. `folder`/generation.json records the settings (base model,
    resolution, steps, guidance, seed, weights' fingerprint, ...) and the prompt of each image; a run
    whose settings differ, or whose prompt file gives an existing image another prompt, is refused
    (those images would be scored as this run's). Returns a warning for images made before records
    were kept (adopted unchecked)."""
    path = os.path.join(folder, GENERATION_RECORD)
    existing = [(style, index, prompt) for style, index, prompt in items if image_exists(style, index)]
    warning = None
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        for key, value in settings.items():
            if record["settings"].get(key) != value:
                raise ConfigurationError(
                    f"{folder} holds images rendered with {key} {record['settings'].get(key)!r}, this run's is {value!r}: "
                    "pass another --output_dir, or delete that folder to render them again")
        for style, index, prompt in existing:
            earlier = record["prompts"].get(f"{style}/{index}")
            if earlier is not None and earlier != prompt:
                raise ConfigurationError(
                    f"{folder}/{style}/{index:05d}.png was rendered for the prompt {earlier!r}, this run's is {prompt!r}: "
                    "pass another --output_dir, or delete that folder to render them again")
    else:
        record = {"settings": settings, "prompts": {}}
        if existing:
            warning = f"{folder}: {len(existing)} images without a {GENERATION_RECORD} (an older run's) are kept unchecked"
    prompts = {f"{style}/{index}": prompt for style, index, prompt in items}
    if os.path.exists(path) and prompts.items() <= record["prompts"].items():
        return warning  # nothing new to record
    record["prompts"].update(prompts)
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    return warning


def score_images(metric_models, images, prompts) -> dict[str, list[float]]:
    """Every metric of a batch of images in [0, 1]."""
    from rewards.relative import with_control

    scores = {}
    with torch.no_grad():
        for name, model in metric_models.items():
            if name == "sgp_hps":
                wanted = model(images, [with_control(SGP_WANTED, p) for p in prompts])
                unwanted = model(images, [with_control(SGP_UNWANTED, p) for p in prompts])
                scores[name] = (wanted - unwanted).tolist()
            else:
                scores[name] = model(images, prompts).tolist()
    return scores


def write_csv(path, rows, metrics):
    fields = ["model", "style", "index", "seed", "prompt", "image", *metrics]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def summary_table(rows, metrics, models) -> str:
    """Markdown: mean of each metric per model, overall and per style (the paper's Table 1 layout)."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], "all")].append(row)
        groups[(row["model"], row["style"])].append(row)
    styles = sorted({row["style"] for row in rows})
    styles = ["all"] + (styles if len(styles) > 1 else [])  # one style: its table would be "all prompts" again
    lines = []
    for style in styles:
        lines += [f"### {style}" if style != "all" else "### all prompts", "",
                  "| model | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for model in models:
            group = groups.get((model, style), [])
            means = [sum(float(r[m]) for r in group) / len(group) if group else float("nan") for m in metrics]
            lines.append(f"| {model} | {len(group)} | " + " | ".join(f"{v:.4f}" for v in means) + " |")
        lines.append("")
    lines += ["Metrics:", ""] + [f"- `{m}`: {METRIC_NOTES.get(m, 'a reward of your own (--reward_module)')}" for m in metrics]
    return "\n".join(lines) + "\n"


def side_by_side_grid(image_paths_by_row: list[list[str]], labels: list[str]):
    """Rows of image files (one row per prompt, one column per model, same seed) -> one PIL image."""
    from PIL import Image, ImageDraw

    first = Image.open(image_paths_by_row[0][0])
    width, height = first.size
    grid = Image.new("RGB", (width * len(labels), height * len(image_paths_by_row)))
    for r, row in enumerate(image_paths_by_row):
        for c, path in enumerate(row):
            tile = Image.open(path).convert("RGB").resize((width, height))
            if r == 0:
                ImageDraw.Draw(tile).text((2, 2), labels[c], fill=(255, 255, 255))
            grid.paste(tile, (c * width, r * height))
    return grid


def distribution_plot(rows, metrics, models, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for model in models:
            values = [float(r[metric]) for r in rows if r["model"] == model]
            axis.hist(values, bins=20, alpha=0.5, label=model)
        axis.set_title(metric)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def run_checkpoint_specs(run_dir: str) -> list[tuple[str, str]]:
    """--run_checkpoints: (step-N, folder) of each complete checkpoint of a trainer's --output_dir, in
    step order, then (final, run_dir) when its final weights are there: every stage of one run, to
    see where a held-out metric turned (the step before reward hacking)."""
    from .checkpoints import list_checkpoints, read_training_state

    if not os.path.isdir(run_dir):
        raise ConfigurationError(f"--run_checkpoints {run_dir}: no such folder (a trainer's --output_dir)")
    specs = [(f"step-{state['global_step']}", path) for path in list_checkpoints(run_dir)
             if (state := read_training_state(path)) is not None]
    if os.path.exists(os.path.join(run_dir, LORA_WEIGHTS_NAME)) or os.path.isdir(os.path.join(run_dir, "transformer")):
        specs.append(("final", run_dir))
    if not specs:
        raise ConfigurationError(f"--run_checkpoints {run_dir}: no checkpoint-N folders or final weights in it")
    return specs


def plot_by_step(rows, metrics, steps: dict, path, best_step: int | None = None):
    """Each metric's mean per model against the training step of the model (`steps`: model name ->
    step; the base model at 0), one panel per metric; `best_step`: the run's best held-out step, marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    ordered = sorted(steps, key=steps.get)
    for axis, metric in zip(axes[0], metrics):
        means = [sum(float(r[metric]) for r in rows if r["model"] == model) / max(1, sum(r["model"] == model for r in rows))
                 for model in ordered]
        axis.plot([steps[model] for model in ordered], means, marker="o")
        if best_step is not None:
            axis.axvline(best_step, color="green", linestyle="--", linewidth=1)
        axis.set_title(metric)
        axis.set_xlabel("training step")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def run_steps(run_dir: str, specs: list[tuple[str, str]]) -> tuple[dict, int | None]:
    """({model name: training step} for --run_checkpoints' models, base at 0; the run's best held-out
    step or None). The final weights sit at the run's last step, or at its best step when the run was
    stopped for reward hacking (it published the best step's weights)."""
    from .checkpoints import list_checkpoints, read_json, read_training_state

    steps = {"base": 0}
    for name, _ in specs:
        if name.startswith("step-"):
            steps[name] = int(name.removeprefix("step-"))
    best = read_json(os.path.join(run_dir, "best_checkpoint.json"))
    newest = read_training_state(list_checkpoints(run_dir)[-1]) if list_checkpoints(run_dir) else None
    if any(name == "final" for name, _ in specs):
        if newest and newest.get("stopped_for_hacking") and best:
            steps["final"] = best["step"]
        else:
            steps["final"] = int((newest or {}).get("config", {}).get("max_train_steps", max(steps.values())))
    return steps, best and best.get("step")
