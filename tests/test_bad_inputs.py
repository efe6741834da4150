"""Bad input ends in one line that says what to change, exit status 2, before FLUX loads, with
nothing in --output_dir changed: for the four trainers and evaluate_flux.py.

Mistakes in the flags run through the scripts' own entry point (flux_rl.args.run_cli) in this
process, with main() replaced by a guard (none of them may get that far); the ones found while a
run starts (prompt file, image folder, reward weights) run as a user runs them, through
`python train_srpo_flux.py`, with one and two processes (the README's way), and through
`accelerate launch`."""

import importlib
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from flux_rl import args as common
from tests.conftest import REPO_ROOT
from tests.launch import LAUNCH_TIMEOUT, free_port, tiny_args


def write(path, data: bytes = b"") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def folder(path) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def benchmark(tmp: str, photo: bytes) -> str:
    """An HPDv2 benchmark folder whose photo.json holds `photo`."""
    for style in ("anime", "concept-art", "paintings"):
        write(f"{tmp}/benchmark/{style}.json", b'["a cat"]')
    return os.path.dirname(write(f"{tmp}/benchmark/photo.json", photo))


SRPO, DIRECT_ALIGN, REFL, DRAFT, EVALUATE = "train_srpo_flux", "train_direct_align", "train_refl_baseline", "train_draft_baseline", "evaluate_flux"

# (name, script, flags given the temporary folder, what the line must say). Each runs after the script's
# required flags (FLUX folder, --output_dir; evaluate_flux.py: a prompt file), so each row is one mistake.
FLAG_MISTAKES = [
    # Numbers: not numbers, not finite, outside what they mean.
    ("nan learning rate", SRPO, lambda t: ["--learning_rate", "nan"], "--learning_rate nan: give a finite number"),
    ("infinite guidance", SRPO, lambda t: ["--rollout_guidance", "inf"], "--rollout_guidance inf: give a finite number"),
    ("a word for a number", SRPO, lambda t: ["--learning_rate", "fast"], "argument --learning_rate: invalid float value: 'fast'"),
    ("negative number without =", SRPO, lambda t: ["--learning_rate", "-1e-4"], "write --learning_rate=-1e-4, with '='"),
    ("negative learning rate", DIRECT_ALIGN, lambda t: ["--learning_rate=-1e-4"], "--learning_rate must be positive"),
    ("resolution not a multiple of 16", SRPO, lambda t: ["--resolution", "100"], "multiple of 16"),
    ("width not a multiple of 16", DIRECT_ALIGN, lambda t: ["--resolution", "48,81"], "--resolution 48,81: each side must be"),
    ("three sides", SRPO, lambda t: ["--resolution", "48,64,80"], "give one number (720) or HEIGHT,WIDTH (720,1280)"),
    ("a bucket not a multiple of 16", REFL, lambda t: ["--resolution_buckets", "64,64", "50,64"], "--resolution_buckets 50,64: each side"),
    ("validation size", SRPO, lambda t: ["--validation_resolution", "big"], "--validation_resolution 'big': give one number"),
    ("batch size 0", SRPO, lambda t: ["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
    ("accumulation 0", REFL, lambda t: ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    ("no steps", DRAFT, lambda t: ["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    ("no rollout steps", DIRECT_ALIGN, lambda t: ["--num_inference_steps", "0"], "--num_inference_steps must be at least 1"),
    ("checkpoint every 0 steps", SRPO, lambda t: ["--checkpointing_steps", "0"], "--checkpointing_steps must be at least 1"),
    ("no validation images", SRPO, lambda t: ["--num_validation_images", "0"], "--num_validation_images must be at least 1"),
    ("no validation steps", SRPO, lambda t: ["--validation_inference_steps", "0"], "--validation_inference_steps must be at least 1"),
    ("keep 0 checkpoints", SRPO, lambda t: ["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1"),
    ("rank 0", SRPO, lambda t: ["--rank", "0"], "--rank must be at least 1"),
    ("seed below 0", SRPO, lambda t: ["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    ("validation seed above numpy's", SRPO, lambda t: ["--validation_seed", str(2**32)], "--validation_seed must be in [0, 4294967295]"),
    ("no clipping norm", SRPO, lambda t: ["--max_grad_norm", "0"], "--max_grad_norm must be positive, got 0.0"),
    ("lora alpha 0", SRPO, lambda t: ["--lora_alpha", "0"], "--lora_alpha must be positive"),
    ("dropout 1", SRPO, lambda t: ["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    ("negative loss scale", REFL, lambda t: ["--loss_scale", "-1"], "--loss_scale must be positive"),
    ("adam beta 1", SRPO, lambda t: ["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)"),
    ("negative adam beta", SRPO, lambda t: ["--adam_beta1=-0.1"], "--adam_beta1 must be in [0, 1)"),
    ("negative weight decay", SRPO, lambda t: ["--adam_weight_decay=-1"], "--adam_weight_decay must be non-negative"),
    ("negative epsilon", SRPO, lambda t: ["--adam_epsilon=-1"], "--adam_epsilon must be non-negative"),
    ("T5 beyond 512 tokens", SRPO, lambda t: ["--max_sequence_length", "600"], "--max_sequence_length must be in [1, 512]"),
    ("negative text cache", SRPO, lambda t: ["--text_cache_size=-1"], "--text_cache_size must be non-negative"),
    ("negative rollout guidance", SRPO, lambda t: ["--rollout_guidance", "-2"], "--rollout_guidance must be non-negative"),
    ("negative train guidance", SRPO, lambda t: ["--train_guidance=-1"], "--train_guidance must be non-negative"),
    ("negative validation guidance", SRPO, lambda t: ["--validation_guidance=-1"], "--validation_guidance must be non-negative"),
    ("negative shift", SRPO, lambda t: ["--rollout_shift=-3"], "--rollout_shift must be non-negative"),
    ("negative warmup", SRPO, lambda t: ["--lr_warmup_steps", "-5"], "--lr_warmup_steps must be non-negative"),
    ("no cosine cycle", SRPO, lambda t: ["--lr_num_cycles", "0"], "--lr_num_cycles must be positive"),
    ("negative polynomial power", SRPO, lambda t: ["--lr_power", "-1"], "--lr_power must be positive"),
    ("learning rate below the polynomial's end", SRPO, lambda t: ["--lr_scheduler", "polynomial", "--learning_rate", "1e-8"],
     "--lr_scheduler polynomial decays to 1e-7"),
    ("gradient checkpointing ratio 1.5", SRPO, lambda t: ["--gradient_checkpointing", "--gradient_checkpointing_ratio", "1.5"],
     "--gradient_checkpointing_ratio must lie in [0, 1]"),
    ("checkpointing ratio alone", SRPO, lambda t: ["--gradient_checkpointing_ratio", "0.5"], "needs --gradient_checkpointing"),
    # Names: flags, choices, layers, schedulers, backends, trackers.
    ("misspelt flag", SRPO, lambda t: ["--learnig_rate", "1e-4"], "unrecognized arguments: --learnig_rate 1e-4"),
    ("flag without its value", SRPO, lambda t: ["--rank"], "argument --rank: expected one argument"),
    ("precision not offered", SRPO, lambda t: ["--mixed_precision", "fp32"], "argument --mixed_precision: invalid choice: 'fp32'"),
    ("fp16 without a GPU", SRPO, lambda t: ["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a CUDA GPU"),
    ("loss not offered", REFL, lambda t: ["--loss_type", "hinge"], "argument --loss_type: invalid choice: 'hinge'"),
    ("LoRA layer typo", SRPO, lambda t: ["--lora_layers", "to_q,to_vv"], "'to_vv' names no linear layer of the FLUX transformer"),
    ("LoRA on an attention block", DIRECT_ALIGN, lambda t: ["--lora_layers", "attn"], "'attn' names no linear layer"),
    # Another family's layers, checked on its transformer built from its config.json (meta device) before anything loads.
    ("Qwen-Image LoRA layer of FLUX.1", SRPO, lambda t: ["--pretrained_model_name_or_path", "{tiny_models}/qwen-image",
                                                        "--lora_layers", "to_q,proj_mlp"],
     "'proj_mlp' names no linear layer of the QwenImageTransformer2DModel"),
    ("VAE checkpointing of Qwen-Image's video VAE", REFL, lambda t: ["--pretrained_model_name_or_path", "{tiny_models}/qwen-image",
                                                                      "--vae_gradient_checkpointing"],
     "--vae_gradient_checkpointing: Qwen-Image's video VAE"),
    ("FLUX.2 LoRA layer of FLUX.1", DIRECT_ALIGN, lambda t: ["--pretrained_model_name_or_path", "{tiny_models}/flux2-klein",
                                                            "--lora_layers", "ff.net.0.proj"],
     "'ff.net.0.proj' names no linear layer of the Flux2Transformer2DModel"),
    ("scheduler typo", SRPO, lambda t: ["--lr_scheduler", "cosine_annealing"], "--lr_scheduler cosine_annealing: choose one of linear"),
    ("compile mode typo", SRPO, lambda t: ["--compile", "--compile_mode", "max_autotune"], "--compile_mode max_autotune: choose one of"),
    ("compile backend typo", SRPO, lambda t: ["--compile_vae", "--compile_backend", "inductr"], "--compile_backend inductr: choose one of"),
    ("attention backend typo", SRPO, lambda t: ["--attention_backend", "cudnn"], "--attention_backend cudnn: choose one of diffusers' backends"),
    ("cuDNN attention in training", SRPO, lambda t: ["--attention_backend", "_native_cudnn"], "cuDNN's attention backward crashed"),
    ("cuDNN rollout without a GPU", SRPO, lambda t: ["--rollout_attention_backend", "_native_cudnn"], "needs a CUDA GPU"),
    ("flash attention not installed", SRPO, lambda t: ["--attention_backend", "flash"], "install `flash-attn"),
    ("tracker typo", SRPO, lambda t: ["--report_to", "tensorbord"], "--report_to tensorbord: choose from tensorboard"),
    ("none beside a tracker", SRPO, lambda t: ["--report_to", "none,tensorboard"], "--report_to none,tensorboard: choose from"),
    ("unknown reward", SRPO, lambda t: ["--reward", "hpsv9:1"], "unknown reward 'hpsv9'"),
    ("reward weight with =", SRPO, lambda t: ["--reward", "hpsv2=1.0"], "hpsv2:1.0"),
    ("reward weight not a number", DIRECT_ALIGN, lambda t: ["--reward", "hpsv2:high"], "is not a number; write e.g. hpsv2:0.5"),
    ("reward module missing", SRPO, lambda t: ["--reward_module", f"{t}/my_rewards.py"], "my_rewards.py"),
    ("reward module that does not import", SRPO, lambda t: ["--reward_module", write(f"{t}/broken.py", b"import no_such_package_here\n")],
     "broken.py"),
    # Combinations that contradict each other.
    ("push without a repository", SRPO, lambda t: ["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    ("token on the command line", SRPO, lambda t: ["--hub_token", "hf_NotARealTokenButSecret"], "run `hf auth login` once, or set HF_TOKEN"),
    ("merge with a full fine-tune", SRPO, lambda t: ["--full_finetune", "--merge_lora_in_rollout"], "--merge_lora_in_rollout is for LoRA"),
    ("dropout with a full fine-tune", SRPO, lambda t: ["--full_finetune", "--lora_dropout", "0.1"], "--lora_dropout is for LoRA training"),
    ("bf16 weights for LoRA", SRPO, lambda t: ["--bf16_weights"], "--bf16_weights is for --full_finetune"),
    ("bf16 weights in fp32", DIRECT_ALIGN, lambda t: ["--full_finetune", "--bf16_weights"], "add --mixed_precision bf16"),
    ("held-out reward without validation prompts", SRPO, lambda t: ["--heldout_reward", "pickscore:1.0"],
     "--heldout_reward scores the validation images: add --validation_prompt"),
    ("guard without a held-out reward", DIRECT_ALIGN, lambda t: ["--stop_on_hacking", "--validation_prompt", "a cat", "--validation_steps", "5"],
     "--stop_on_hacking compares the held-out and trained rewards"),
    ("drift band without the guard", SRPO, lambda t: ["--drift_band", "0.3"], "--drift_band must be positive and goes with --stop_on_hacking"),
    ("negative hacking margin", SRPO, lambda t: ["--hacking_margin=-0.1"], "--hacking_margin must be non-negative"),
    ("unknown held-out reward", REFL, lambda t: ["--heldout_reward", "hpsv4:1.0", "--validation_prompt", "a cat"], "unknown reward 'hpsv4'"),
    ("validation steps without prompts", SRPO, lambda t: ["--validation_steps", "5"], "--validation_steps renders --validation_prompt"),
    ("LoRA to start from with a full fine-tune", SRPO,
     lambda t: ["--full_finetune", "--init_lora_weights", write(f"{t}/lora.safetensors", b"\x00" * 64)], "drop it with --full_finetune"),
    # Files and folders.
    ("FLUX folder without model_index.json", SRPO, lambda t: ["--pretrained_model_name_or_path", folder(f"{t}/flux")],
     "no model_index.json in it; name a FluxPipeline folder"),
    ("another family's folder", SRPO, lambda t: ["--pretrained_model_name_or_path", os.path.dirname(
        write(f"{t}/sdxl/model_index.json", b'{"_class_name": "StableDiffusionXLPipeline"}'))], "is a StableDiffusionXLPipeline checkpoint"),
    ("missing FLUX folder", SRPO, lambda t: ["--pretrained_model_name_or_path", f"{t}/no-flux"], "no such folder"),
    # A relative path whose first part is a folder here (as tiny-models/flx for tiny-models/flux): not asked of the Hub.
    ("misspelt relative FLUX folder", SRPO, lambda t: ["--pretrained_model_name_or_path", "tests/flx"],
     "--pretrained_model_name_or_path tests/flx: no such folder"),
    ("output dir is a file", SRPO, lambda t: ["--output_dir", write(f"{t}/out.txt")], "is a file; name a folder"),
    ("output dir under a file", SRPO, lambda t: ["--output_dir", write(f"{t}/file") + "/run"], "is a file, so no folder can be made under it"),
    ("garbage LoRA to start from", SRPO, lambda t: ["--init_lora_weights", write(f"{t}/lora.safetensors", b"\x00" * 64)],
     "not a LoRA file that FluxPipeline.load_lora_weights reads"),
    ("missing LoRA to start from", DIRECT_ALIGN, lambda t: ["--init_lora_weights", "./missing-lora"], "no such file or folder"),
    ("missing prompt file", SRPO, lambda t: ["--dataset_name", "./missing.json"], "--dataset_name ./missing.json: no such file"),
    ("missing reward folder", SRPO, lambda t: ["--reward_models_dir", f"{t}/no-rewards"], "no such folder"),
    ("missing image folder", SRPO, lambda t: ["--train_data_dir", f"{t}/no-images"], "--train_data_dir"),
    ("missing checkpoint", SRPO, lambda t: ["--resume_from_checkpoint", "checkpoint-9"], "no such checkpoint"),
    ("missing accelerate config", SRPO, lambda t: ["--accelerate_config", f"{t}/fsdp.yaml"], "--accelerate_config"),
    ("no processes", SRPO, lambda t: ["--num_processes", "0"], "--num_processes must be at least 1"),
    # Method flags.
    ("window the wrong way round", DIRECT_ALIGN, lambda t: ["--train_window", "30,5"], "--train_window 30,5"),
    ("window from pure noise", SRPO, lambda t: ["--train_window", "0,25"], "step 0 is pure noise"),
    ("window not numbers", SRPO, lambda t: ["--train_window", "a,b"], "two comma-separated numbers"),
    ("recovery share above 1", SRPO, lambda t: ["--gt_ratio", "1.5"], "--gt_ratio"),
    ("no injections", DIRECT_ALIGN, lambda t: ["--num_injections", "0"], "--num_injections"),
    ("window shift 0", SRPO, lambda t: ["--window_shift", "0"], "--window_shift must be positive"),
    ("negative discount", DIRECT_ALIGN, lambda t: ["--discount", "2,-1"], "both must be non-negative"),
    ("CFG scale 1", SRPO, lambda t: ["--cfg_scale", "1"], "--cfg_scale"),
    ("negative monitor steps", SRPO, lambda t: ["--monitor_steps", "-1"], "--monitor_steps must be non-negative"),
    ("aesthetic noise 0", SRPO, lambda t: ["--aesthetic_noise_std", "0"], "--aesthetic_noise_std must be positive"),
    ("gradient step after the last", REFL, lambda t: ["--grad_step_range", "20,30"], "--grad_step_range 20,30 must satisfy"),
    ("gradient steps the wrong way round", REFL, lambda t: ["--grad_step_range", "10,5"], "--grad_step_range 10,5 must satisfy"),
    ("DRaFT with no steps", DRAFT, lambda t: ["--draft_k", "0"], "--draft_k"),
    # evaluate_flux.py
    ("two prompt sources", EVALUATE, lambda t: ["--hpdv2_benchmark_dir", folder(f"{t}/bench")], "give exactly one of"),
    ("unknown metric", EVALUATE, lambda t: ["--metrics", "hpsv2,fid"], "unknown metric 'fid'"),
    ("evaluation size", EVALUATE, lambda t: ["--resolution", "1000"], "--resolution 1000: each side must be a positive multiple of 16"),
    ("evaluation batch 0", EVALUATE, lambda t: ["--batch_size", "0"], "--batch_size must be at least 1"),
    ("negative evaluation guidance", EVALUATE, lambda t: ["--guidance_scale=-1"], "--guidance_scale must be non-negative"),
    ("model named base", EVALUATE, lambda t: ["--models", "base=" + folder(f"{t}/other")], "the name 'base' is taken"),
    ("garbage LoRA to evaluate", EVALUATE, lambda t: ["--models", "x=" + write(f"{t}/lora.safetensors", b"\x00" * 64)],
     "is neither a folder"),
    ("benchmark file that is not JSON", EVALUATE, lambda t: ["--prompt_file", "", "--hpdv2_benchmark_dir", benchmark(t, b'["a cat",')],
     "photo.json is not JSON"),
    ("benchmark file of numbers", EVALUATE, lambda t: ["--prompt_file", "", "--hpdv2_benchmark_dir", benchmark(t, b"[1, 2]")],
     "photo.json should be a list of prompts"),
    ("empty prompt file to evaluate", EVALUATE, lambda t: ["--prompt_file", write(f"{t}/empty.txt")], "the file is empty"),
    ("evaluation flag typo", EVALUATE, lambda t: ["--guidanse_scale", "3"], "unrecognized arguments: --guidanse_scale"),
]


def required_flags(script: str, tiny_flux: str, tmp: str) -> list[str]:
    flags = ["--pretrained_model_name_or_path", tiny_flux, "--output_dir", f"{tmp}/run"]
    if script == EVALUATE:
        flags += ["--prompt_file", write(f"{tmp}/prompts.txt", b"a photo of a cat\n")]
    return flags


def test_the_table_is_long_and_covers_every_script():
    assert len(FLAG_MISTAKES) + len(STARTUP_MISTAKES) >= 80
    assert {row[1] for row in FLAG_MISTAKES} == {SRPO, DIRECT_ALIGN, REFL, DRAFT, EVALUATE}


@pytest.mark.parametrize("name, script, flags, message", FLAG_MISTAKES, ids=[row[0] for row in FLAG_MISTAKES])
def test_flag_mistakes_are_one_line(name, script, flags, message, tiny_flux, tmp_path, monkeypatch, capsys):
    module = importlib.import_module(script)
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    monkeypatch.setattr(module, "main", lambda args: pytest.fail(f"{name}: the run started"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the rows about GPU-only flags, on any machine
    # The row's own value of a flag given twice wins (argparse keeps the last), e.g. its own FLUX folder.
    row_flags = [flag.replace("{tiny_models}", os.path.dirname(tiny_flux)) for flag in flags(str(tmp_path))]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *required_flags(script, tiny_flux, str(tmp_path)), *row_flags])
    started = time.perf_counter()
    with pytest.raises(SystemExit) as end:
        common.run_cli(module.parse_args, module.main)
    seconds = time.perf_counter() - started
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert end.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert "hf_NotARealTokenButSecret" not in stderr
    assert os.listdir(output_dir) == ["notes.txt"] and (output_dir / "notes.txt").read_text() == "mine"
    assert seconds < 30, f"{name}: {seconds:.1f} s to the line"  # no model loads: well under a second here
    print(f"{name}: {seconds:.2f} s to the line")


def test_too_little_disk_for_a_checkpoint(tiny_flux, tmp_path, monkeypatch, capsys):
    """The disk is checked against this run's checkpoint size (read from the transformer's safetensors
    headers): a full disk must not surface as torch's 'unexpected pos' at the first checkpoint."""
    import train_srpo_flux
    from flux_rl.checkpoints import checkpoint_bytes

    argv = ["--pretrained_model_name_or_path", tiny_flux, "--output_dir", str(tmp_path / "run")]
    lora = checkpoint_bytes(train_srpo_flux.parse_args(argv))
    full = checkpoint_bytes(train_srpo_flux.parse_args(argv + ["--full_finetune"]))
    # The tiny model: 114,688 LoRA parameters (rank 64, default layers), 81,664 transformer parameters; weights and
    # AdamW's two moments in fp32.
    assert (lora, full) == (114_688 * 12, 81_664 * 12)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=lora))
    monkeypatch.setattr(train_srpo_flux, "main", lambda args: pytest.fail("the run started"))
    monkeypatch.setattr(sys, "argv", ["train_srpo_flux.py", *argv])
    with pytest.raises(SystemExit) as end:
        common.run_cli(train_srpo_flux.parse_args, train_srpo_flux.main)
    line = capsys.readouterr().err.strip()
    assert end.value.code == 2 and "a checkpoint of this run takes about 0.00 GB and its disk has 0.00 GB free" in line, line


def corrupt_hps(tiny_models, tmp):
    """A copy of the tiny reward folders whose HPSv2.1 file is cut short, as a failed download leaves it."""
    folder = f"{tmp}/rewards"
    shutil.copytree(os.path.join(tiny_models, "rewards", "hpsv2"), f"{folder}/hpsv2")
    path = f"{folder}/hpsv2/HPS_v2.1_compressed.pt"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return ["--reward_models_dir", folder, "--reward", "hpsv2:1.0"]


STARTUP_MISTAKES = [
    ("empty prompt file", lambda models, tmp: ["--dataset_name", write(f"{tmp}/prompts.txt")], "prompts.txt: the file is empty"),
    ("corrupt json prompts", lambda models, tmp: ["--dataset_name", write(f"{tmp}/prompts.json", b'{"prompt": "a cat"')],
     "prompts.json: not a readable json file"),
    ("prompt column missing", lambda models, tmp: ["--dataset_name", write(f"{tmp}/prompts.csv", b"caption\na cat\n")], "prompt"),
    ("empty image folder", lambda models, tmp: ["--train_data_dir", os.path.dirname(write(f"{tmp}/images/.keep"))],
     "not an image folder datasets reads"),
    ("damaged reward weights", corrupt_hps, "reward 'hpsv2': its weights in"),
    ("a reward loader returning None", lambda models, tmp: [
        "--reward_module", write(f"{tmp}/mine.py", b"from rewards import register_reward\nregister_reward('nothing', lambda source, device, dtype: None)\n"),
        "--reward", "nothing:1.0"], "reward 'nothing': its loader returned NoneType, not a rewards.RewardModel"),
]


def run_as_user(launcher: list[str], tiny_models: str, output_dir: str, flags: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    command = [*launcher, "train_srpo_flux.py", *tiny_args(tiny_models, output_dir), *flags]
    started = time.time()
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT),
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    return result, time.time() - started


# Runs `python train_srpo_flux.py <flags>` once per command line given as JSON, all in one interpreter (torch and
# datasets imported once: the whole table in the time of two runs), as the script's own entry point does; after each,
# its exit status and the seconds it took, on stderr after a marker line.
AS_SCRIPT = """
import json, runpy, sys, time
from accelerate.state import AcceleratorState, GradientState
for argv in json.loads(sys.argv[1]):
    sys.argv, started = argv, time.time()
    try:
        runpy.run_path(argv[0], run_name="__main__")
        status = 0
    except SystemExit as end:
        status = end.code
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    print(f"=== exit {status} after {time.time() - started:.1f} s", file=sys.stderr, flush=True)
"""


def test_mistakes_found_at_start_are_one_line(tiny_models, tmp_path):
    """As the README runs it (TensorBoard logging on): the inputs are read before anything is written."""
    import json

    runs = []
    for index, (name, flags, message) in enumerate(STARTUP_MISTAKES):
        output_dir = tmp_path / f"run-{index}"
        output_dir.mkdir()
        (output_dir / "notes.txt").write_text("mine")
        runs.append(["train_srpo_flux.py", *tiny_args(tiny_models, str(output_dir)), *flags(tiny_models, str(tmp_path / f"in-{index}"))])
    result = subprocess.run([sys.executable, "-c", AS_SCRIPT, json.dumps(runs)], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT), timeout=LAUNCH_TIMEOUT)
    # stderr: run 0's lines, "=== exit S after T s", run 1's lines, "=== exit ...", ...
    chunks = result.stderr.split("=== ")
    assert len(chunks) == len(STARTUP_MISTAKES) + 1, result.stderr[-3000:]
    outputs = [chunks[0]] + [chunk.split("\n", 1)[1] for chunk in chunks[1:-1]]
    statuses = [chunk.split("\n", 1)[0] for chunk in chunks[1:]]
    for index, ((name, _, message), output, status) in enumerate(zip(STARTUP_MISTAKES, outputs, statuses)):
        lines = output.strip().splitlines()
        assert status.startswith("exit 2 after") and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            f"{name}: {status}\n{output[-2000:]}"
        assert sorted(os.listdir(tmp_path / f"run-{index}")) == ["notes.txt"], f"{name}: nothing may be written before the input is known good"
        print(f"{name}: {status.split(' after ')[1]} to the line")


@pytest.mark.parametrize("processes", [1, 2])
def test_one_line_with_several_processes(processes, tiny_models, tmp_path):
    """`python train_srpo_flux.py --num_processes N`: a mistake in the flags is found once, in the launching
    process; one every worker finds at start (here an empty prompt file) reads once too, with the worker's status."""
    for flags, message in ((["--hub_token", "hf_NotARealTokenButSecret"], "run `hf auth login` once"),
                           (["--dataset_name", write(f"{tmp_path}/prompts.txt")], "the file is empty")):
        output_dir = tmp_path / f"run-{len(message)}"
        result, seconds = run_as_user([sys.executable], tiny_models, str(output_dir),
                                      [*flags, "--num_processes", str(processes), "--main_process_port", str(free_port())])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-3000:]
        assert "hf_NotARealTokenButSecret" not in result.stderr + result.stdout
        assert not output_dir.exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_under_accelerate_launch_the_line_is_there_and_no_secret(processes, tiny_models, tmp_path):
    """`accelerate launch` itself still works: the worker prints the line (the prompts are read by rank 0
    first, so the others never reach them), then the launcher adds its own report (its traceback, exit
    status 1), which a script cannot change: README's way is `python train_srpo_flux.py --num_processes N`."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", str(processes)]
    launcher += ["--cpu"] if processes == 1 else ["--multi_gpu", "--main_process_port", str(free_port())]
    env_cpu = {"ACCELERATE_USE_CPU": "1"} if processes > 1 else {}
    command = [*launcher, "train_srpo_flux.py", *tiny_args(tiny_models, str(tmp_path / "run")), "--dataset_name",
               write(f"{tmp_path}/prompts.txt")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT, **env_cpu),
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(lines) == 1 and "the file is empty" in lines[0], result.stderr[-3000:]


def test_a_mistake_only_one_worker_finds_is_shown(tiny_models, tmp_path):
    """Rank 1 alone refuses its reward (rank 0 waits for it at the next collective): its line is the one shown,
    once, with its status; rank 0's stop adds nothing."""
    module = write(f"{tmp_path}/rank_one.py", b"import os\nfrom rewards import register_reward\n"
                   b"from rewards.analytic import load_toy_brightness\n"
                   b"register_reward('rank_one', lambda source, device, dtype: None if os.environ['RANK'] == '1' "
                   b"else load_toy_brightness(source, device, dtype))\n")
    result, seconds = run_as_user([sys.executable], tiny_models, str(tmp_path / "run"),
                                  ["--reward_module", module, "--reward", "rank_one:1.0", "--num_processes", "2",
                                   "--main_process_port", str(free_port())])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == ["error: reward 'rank_one': its loader returned NoneType, not a rewards.RewardModel"], \
        result.stderr[-3000:]


def test_two_processes_started_by_the_script_train(tiny_models, tmp_path):
    """`python train_srpo_flux.py --num_processes 2` runs two data-parallel workers to the end: exit 0, the
    weights, and the final line once."""
    output_dir = tmp_path / "run"
    result, seconds = run_as_user([sys.executable], tiny_models, str(output_dir),
                                  ["--max_train_steps", "2", "--num_processes", "2", "--main_process_port", str(free_port())])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), effective batch 2" in result.stderr
    assert result.stdout.count("saved LoRA weights to") == 1 and (output_dir / "pytorch_lora_weights.safetensors").exists()
    assert "Loading pipeline components" not in result.stderr  # the libraries' bars: only with --verbose
