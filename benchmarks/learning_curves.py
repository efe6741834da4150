"""Does each trainer learn? Reward against step for every trainer and reward kind, on the tiny models
with analytic rewards of known optimum (rewards/analytic.py), measured on held-out prompts and seeds.
tests/test_learning.py asserts the end points of the same runs; this draws their curves into one
figure (the README shows it).

    python -m flux_rl.tiny_models --output_dir tiny-models
    python benchmarks/learning_curves.py --tiny_models tiny-models --output_dir benchmarks/learning_curves

The measures: `red_minus_blue`, mean R minus mean B of the image (what SRP with wanted "red" and
unwanted "blue" on `toy_colour` raises, and the swapped phrases lower), and `brightness`, the
mean pixel (the `toy_brightness` reward itself). Each point is the mean over the held-out images of
(trained - base) for the same prompt and seed; the tests judge it in standard errors of that mean.
"""

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Never trained on: the trainers draw from flux_rl/assets/smoke_prompts.txt with seeds from --seed 7.
HELDOUT_PROMPTS = ["a lighthouse at night", "a bowl of soup", "a mountain lake", "a busy city street"]
HELDOUT_SEEDS = [1000, 1001, 1002, 1003]

COLOUR = ["--reward", "toy_colour:1.0", "--wanted_controls", "red", "--unwanted_controls", "blue"]
SWAPPED = ["--reward", "toy_colour:1.0", "--wanted_controls", "blue", "--unwanted_controls", "red"]
BRIGHTNESS = ["--reward", "toy_brightness:1.0"]
FULL = ["--full_finetune", "--learning_rate", "1e-2"]
LORA = ["--rank", "8", "--lora_alpha", "8", "--learning_rate", "5e-2"]


@dataclass(frozen=True)
class LearningRun:
    script: str  # the trainer's module name
    flags: tuple  # its flags beyond the tiny models' common ones
    measure: str  # "red_minus_blue" or "brightness"
    direction: int  # +1: training must raise the measure; -1: lower it (swapped phrases)


def _srpo(*flags, measure="red_minus_blue", direction=1):
    return LearningRun("train_srpo_flux", tuple(flags), measure, direction)


LEARNING_RUNS = {
    # SRPO in each reward form, with and without the inversion branch (text-image reward, wanted red / unwanted blue),
    # and with the phrases swapped, which must move the image the other way.
    "srpo-release": _srpo(*COLOUR, *FULL),
    "srpo-release-swapped": _srpo(*SWAPPED, *FULL, direction=-1),
    "srpo-release-no-inversion": _srpo(*COLOUR, *FULL, "--no_inversion"),
    "srpo-srp": _srpo(*COLOUR, *FULL, "--reward_form", "srp"),
    "srpo-srp-swapped": _srpo(*SWAPPED, *FULL, "--reward_form", "srp", direction=-1),
    "srpo-srp-no-inversion": _srpo(*COLOUR, *FULL, "--reward_form", "srp", "--no_inversion"),
    "srpo-cfg": _srpo(*COLOUR, *FULL, "--reward_form", "cfg"),
    "srpo-cfg-swapped": _srpo(*SWAPPED, *FULL, "--reward_form", "cfg", direction=-1),
    "srpo-cfg-no-inversion": _srpo(*COLOUR, *FULL, "--reward_form", "cfg", "--no_inversion"),
    "srpo-sgp-no-inversion": _srpo(*COLOUR, *FULL, "--reward_form", "sgp", "--no_inversion"),
    "srpo-sgp-swapped": _srpo(*SWAPPED, *FULL, "--reward_form", "sgp", "--no_inversion", direction=-1),
    # An image-only reward (appendix S1), alone and beside a text-image one.
    "srpo-image-only": _srpo(*BRIGHTNESS, *FULL, measure="brightness"),
    "srpo-image-only-no-inversion": _srpo(*BRIGHTNESS, *FULL, "--no_inversion", measure="brightness"),
    "srpo-mixed": _srpo("--reward", "toy_brightness:1.0,toy_colour:1.0", "--wanted_controls", "red", "--unwanted_controls",
                        "blue", *FULL, measure="brightness"),
    "srpo-lora": _srpo(*COLOUR, *LORA),
    # QLoRA: the adapters trained over a 4-bit (NF4) copy of the base, then judged on the full-precision base they ship for.
    "srpo-lora-nf4": _srpo(*COLOUR, *LORA, "--quantize_base", "nf4"),
    # Offline SRPO: real images (a folder written by write_offline_images) replace the rollout.
    "srpo-offline": _srpo(*COLOUR, *FULL, "--train_data_dir", "{offline_images}", "--train_batch_size", "2", "--num_injections", "4"),
    "direct-align": LearningRun("train_direct_align", (*BRIGHTNESS, *FULL), "brightness", 1),
    "direct-align-lora": LearningRun("train_direct_align", (*BRIGHTNESS, *LORA), "brightness", 1),
    # The rollout's linear layers as FP8 matmuls (--rollout_dtype fp8), the branches in full precision.
    "direct-align-lora-fp8-rollout": LearningRun("train_direct_align", (*BRIGHTNESS, *LORA, "--rollout_dtype", "fp8"), "brightness", 1),
    # A full fine-tune with bf16 weights and 8-bit moments (--bf16_weights --use_8bit_adam): 4 bytes of state per parameter.
    "direct-align-bf16-8bit": LearningRun("train_direct_align", (*BRIGHTNESS, *FULL, "--bf16_weights", "--use_8bit_adam",
                                                                "--mixed_precision", "bf16"), "brightness", 1),
    "refl": LearningRun("train_refl_baseline", (*BRIGHTNESS, *FULL), "brightness", 1),
    "draft-k": LearningRun("train_draft_baseline", (*BRIGHTNESS, *FULL, "--draft_k", "2"), "brightness", 1),
    "draft-lv": LearningRun("train_draft_baseline", (*BRIGHTNESS, *FULL, "--draft_lv"), "brightness", 1),
}


def tiny_flags(tiny_models: str, output_dir: str, steps: int, checkpointing_steps: int | None = None) -> list[str]:
    """What every learning run shares: the tiny models at 64 px, 3 rollout steps, no tracker."""
    return [
        "--pretrained_model_name_or_path", os.path.join(tiny_models, "flux"),
        "--reward_models_dir", os.path.join(tiny_models, "rewards"),
        "--resolution", "64", "--num_inference_steps", "3", "--max_sequence_length", "32", "--max_grad_norm", "1.0",
        "--seed", "7", "--max_train_steps", str(steps), "--checkpointing_steps", str(checkpointing_steps or steps),
        "--report_to", "none", "--output_dir", output_dir,
    ]


def write_offline_images(folder: str) -> str:
    """Offline SRPO's image folder: plain-colour fields with prompts, as metadata.jsonl lists them."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i, colour in enumerate([(120, 120, 120), (90, 140, 110), (150, 110, 90), (100, 100, 160)]):
            Image.new("RGB", (64, 64), colour).save(os.path.join(folder, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "prompt": f"a plain field of colour number {i}"}) + "\n")
    return folder


def train(run: LearningRun, tiny_models: str, output_dir: str, steps: int = 30, checkpointing_steps: int | None = None) -> str:
    """Runs the trainer in this process (its parse_args and main, as `accelerate launch` would on one
    CPU process) and returns its output folder."""
    shutil.rmtree(output_dir, ignore_errors=True)
    images = output_dir + "-images"
    flags = [flag.format(offline_images=images) for flag in run.flags]
    if "--train_data_dir" in flags:
        write_offline_images(images)
    from accelerate.state import AcceleratorState, GradientState

    def reset_accelerate():  # accelerate keeps one state per process, whose precision the first Accelerator sets
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    trainer = importlib.import_module(run.script)
    reset_accelerate()  # as a process of its own: not in the precision an earlier Accelerator here (a test's) left
    try:
        trainer.main(trainer.parse_args(tiny_flags(tiny_models, output_dir, steps, checkpointing_steps) + flags))
    finally:
        reset_accelerate()  # and a later Accelerator (another test, other precision) starts afresh
    return output_dir


def measure(images: torch.Tensor, name: str) -> torch.Tensor:
    """The held-out measure of each image: the colour margin, or the toy_brightness reward itself."""
    from rewards.analytic import ToyBrightness, colour_margin

    if name == "red_minus_blue":
        return colour_margin(images, "red", "blue")
    if name == "brightness":
        return ToyBrightness()(images)
    raise ValueError(f"unknown measure {name}")


def heldout_images(pipe, trained_output: str | None) -> torch.Tensor:
    from flux_rl import heldout

    return heldout.render_images(pipe, trained_output, HELDOUT_PROMPTS, HELDOUT_SEEDS, resolution=64, num_inference_steps=3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny_models", default="tiny-models")
    parser.add_argument("--output_dir", default="benchmarks/learning_curves")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5, help="Evaluate a checkpoint every N steps.")
    parser.add_argument("--runs", default=",".join(LEARNING_RUNS))
    args = parser.parse_args()

    from flux_rl import heldout

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.output_dir, exist_ok=True)
    pipe = heldout.load_base(os.path.join(args.tiny_models, "flux"))
    base = heldout_images(pipe, None)
    curves = {}
    for name in args.runs.split(","):
        run = LEARNING_RUNS[name]
        started = time.time()
        output = train(run, args.tiny_models, os.path.join(args.output_dir, "runs", name), args.steps, args.every)
        steps, gains = [0], [0.0]
        for step in range(args.every, args.steps + 1, args.every):
            trained = heldout_images(pipe, os.path.join(output, f"checkpoint-{step}"))
            mean, standard_error, z = heldout.paired_gain(measure(base, run.measure), measure(trained, run.measure))
            steps.append(step)
            gains.append(mean)
        curves[name] = {"measure": run.measure, "direction": run.direction, "steps": steps, "gain": gains,
                        "final_z": z, "seconds": round(time.time() - started, 1)}
        print(f"{name:32s} {run.measure:15s} gain {gains[-1]:+.4f} ({z:+.1f} standard errors) in {curves[name]['seconds']} s")
    with open(os.path.join(args.output_dir, "curves.json"), "w") as f:
        json.dump(curves, f, indent=1)

    plot(curves, os.path.join(args.output_dir, "learning_curves.png"))


def plot(curves: dict, path: str):
    """The two panels (colour margin, brightness) of the runs' held-out gains against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    colours = plt.get_cmap("tab20").colors
    for index, (name, curve) in enumerate(curves.items()):
        axis = axes[0] if curve["measure"] == "red_minus_blue" else axes[1]
        style = "--" if curve["direction"] < 0 else "-"
        axis.plot(curve["steps"], curve["gain"], style, marker="o", markersize=3, color=colours[index % len(colours)],
                  label=f"{name} ({curve['final_z']:+.0f} SE)")
    axes[0].set_title("SRPO on toy_colour (wanted red, unwanted blue; dashed: swapped)")
    axes[0].set_ylabel("held-out mean(R) - mean(B), trained - base")
    axes[1].set_title("image-only toy_brightness: SRPO (S1 form) and the baselines")
    axes[1].set_ylabel("held-out mean pixel, trained - base")
    for axis in axes:
        axis.set_xlabel("optimiser step")
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    figure.suptitle(f"Tiny models, {len(HELDOUT_PROMPTS)} held-out prompts x {len(HELDOUT_SEEDS)} seeds, gain in the "
                    "measure and (in the legend) in standard errors at step 30 (benchmarks/learning_curves.py)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
