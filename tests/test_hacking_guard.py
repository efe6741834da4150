"""--heldout_reward and --stop_on_hacking on the tiny models: Direct-Align trains toy_brightness
while the held-out reward is its opposite (a trained reward whose optimum hurts the held-out one),
so the held-out reward falls from the first validation on. The guard stops the run, keeps the best
checkpoint through rotation and publishes its weights; with a held-out reward that agrees with the
trained one, the run goes to its end."""

import glob
import json
import os

import torch
from safetensors.torch import load_file

from benchmarks.learning_curves import LearningRun, train
from tests.tensorboard_logs import scalar_tags

DARKNESS = b"""
from rewards import register_reward
from rewards.analytic import ToyBrightness


class ToyDarkness(ToyBrightness):
    name = "toy_darkness"

    def forward(self, images, prompts=None):
        return 1 - super().forward(images, prompts)


register_reward("toy_darkness", lambda source, device, dtype: ToyDarkness().to(device))
"""


def guarded_run(tiny_models, tmp_path, heldout: str, steps: int = 12, extra: tuple = ()):
    module = tmp_path / "darkness.py"
    module.write_bytes(DARKNESS)
    flags = ("--reward", "toy_brightness:1.0", "--reward_module", str(module), "--heldout_reward", heldout, "--stop_on_hacking",
             "--validation_prompt", "a photo of a cat", "a red car", "--validation_steps", "2", "--checkpoints_total_limit", "1",
             "--learning_rate", "3e-2", "--hacking_margin", "0.0005", "--report_to", "tensorboard", *extra)
    output_dir = str(tmp_path / heldout.split(":")[0])
    train(LearningRun("train_direct_align", flags, "brightness", 1), tiny_models, output_dir, steps=steps, checkpointing_steps=100)
    return output_dir


def test_the_guard_stops_a_hacking_run_and_keeps_the_best_checkpoint(tiny_models, tmp_path, capsys):
    output_dir = guarded_run(tiny_models, tmp_path, "toy_darkness:1.0")
    logged = scalar_tags(output_dir)
    heldout, trained = logged["validation/heldout"], logged["validation/reward"]
    best = json.load(open(os.path.join(output_dir, "best_checkpoint.json")))
    assert best["step"] == 2 and best["path"].endswith("checkpoint-2")  # the first validation after step 0, darkness only falls
    # validations at steps 0, 2 (the best), 4 (held-out down, trained up: stop), then the final one of the published weights
    assert len(heldout) == 4 and heldout[2] < heldout[1] and trained[2] > trained[1]
    assert heldout[3] == heldout[1] and trained[3] == trained[1]  # the final render is step 2's weights again
    checkpoints = sorted(os.path.basename(path) for path in glob.glob(os.path.join(output_dir, "checkpoint-*")))
    stopped_at = int(checkpoints[-1].split("-")[1])
    assert checkpoints == ["checkpoint-2", f"checkpoint-{stopped_at}"] and stopped_at < 12  # the best kept beside the newest
    state = json.load(open(os.path.join(output_dir, checkpoints[-1], "training_state.json")))
    assert state["stopped_for_hacking"] and state["best_checkpoint"].endswith("checkpoint-2")
    # The published weights are step 2's (the final file folds alpha / rank into lora_B: here 1, the default 64 / 64).
    final = load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    kept = load_file(os.path.join(output_dir, "checkpoint-2", "pytorch_lora_weights.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    card = open(os.path.join(output_dir, "README.md")).read()
    assert "**Stopped early**" in card and f"stopped at step {stopped_at} for reward hacking" in card
    assert "stopped at step" in capsys.readouterr().out.strip().splitlines()[-1]


def test_a_heldout_reward_that_agrees_lets_the_run_finish(tiny_models, tmp_path, capsys):
    output_dir = guarded_run(tiny_models, tmp_path, "toy_brightness:1.0", steps=6)
    heldout = scalar_tags(output_dir)["validation/heldout"]
    assert len(heldout) == 4 and heldout[-1] > heldout[0]  # steps 0, 2, 4 and the final render at 6
    assert json.load(open(os.path.join(output_dir, "best_checkpoint.json")))["step"] == 4  # the newest validation before the end
    assert "; the best held-out reward was step 4's" in capsys.readouterr().out.strip().splitlines()[-1]
    assert "Stopped early" not in open(os.path.join(output_dir, "README.md")).read()


def test_a_drift_monitor_leaving_its_band_stops_the_run(tiny_models, tmp_path, capsys):
    """An agreeing held-out reward never stops the run, but the validation images' brightness drifting more than
    --drift_band from the untrained model's does: at the first validation past it, with the best step before."""
    output_dir = guarded_run(tiny_models, tmp_path, "toy_brightness:1.0", extra=("--drift_band", "0.001"))
    drift = scalar_tags(output_dir)["validation/drift/brightness"]
    baseline = json.load(open(os.path.join(output_dir, "drift_baseline.json")))["validation/drift/brightness"]
    assert drift[0] == baseline and abs(drift[1] - baseline) <= 0.001 * baseline < abs(drift[2] - baseline)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "stopped at step 4 for reward hacking: a drift monitor of the validation images left its band" in line
    assert "the final weights are step 2's" in line


def test_hpsv3_trains_and_watches_end_to_end(tiny_models, tmp_path):
    """HPSv3 (the tiny Qwen2-VL one) as the trained reward of an SRPO run and as its held-out reward beside
    an analytic one: both logged at every validation, per component too, and the run finishes."""
    flags = ("--reward", "hpsv3:1.0", "--heldout_reward", "hpsv3:1.0,toy_brightness:1.0", "--validation_prompt", "a photo of a cat",
             "--validation_steps", "1", "--report_to", "tensorboard")
    output_dir = train(LearningRun("train_srpo_flux", flags, "brightness", 1), tiny_models, str(tmp_path / "hpsv3"), steps=2)
    logged = scalar_tags(output_dir)
    assert len(logged["validation/heldout"]) == 3 and len(logged["validation/heldout/hpsv3"]) == 3  # steps 0, 1 and the final
    assert logged["validation/heldout/hpsv3"] == logged["validation/reward"]  # the same model on the same images
    assert len(logged["denoise/hpsv3/wanted"]) == 2 and len(logged["inversion/hpsv3/unwanted"]) == 2  # SRPO's phrases, per step
    assert os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
