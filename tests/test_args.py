"""Bad input fails in one line that says what to change, before any model is loaded."""

import math

import pytest

import train_direct_align
import train_srpo_flux

BASE = ["--pretrained_model_name_or_path", "does/not-matter-it-is-never-loaded"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], None),
        (["--resolution", "100"], "multiple of 16"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        (["--reward", "hpsv9:1"], "unknown reward 'hpsv9'"),
        (["--train_window", "30,5"], "--train_window 30,5"),
        (["--train_window", "0,25"], "step 0 is pure noise"),
        (["--train_window", "a,b"], "two comma-separated numbers"),
        (["--gt_ratio", "1.5"], "--gt_ratio"),
        (["--push_to_hub"], "--hub_model_id"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit"),
        (["--dataset_name", "./missing.json"], "no such file"),
        (["--dataset_name", "someone/prompts-v1.5"], None),  # a Hub id with a dot, not a missing file
        (["--init_lora_weights", "someone/srpo-FLUX.1-lora"], None),  # a Hub id: checked once downloaded
        (["--init_lora_weights", "./missing-lora"], "--init_lora_weights ./missing-lora: no such file or folder"),
        (["--resume_from_checkpoint", "checkpoint-9"], "no such checkpoint"),
        (["--num_injections", "0"], "--num_injections"),
        (["--discount", "2,-1"], "--discount 2,-1: lambda.t. of Eq. 6 weighs the reward, so both must be non-negative"),
        (["--discount", "0,0"], "--discount 0,0: .* and one positive"),
        (["--reward_models_dir", "/no/such/rewards"], "--reward_models_dir /no/such/rewards: no such folder"),
        (["--full_finetune", "--merge_lora_in_rollout"], "--merge_lora_in_rollout is for LoRA training"),
        (["--gradient_checkpointing", "--gradient_checkpointing_ratio", "1.5"], "--gradient_checkpointing_ratio must lie in"),
        (["--gradient_checkpointing_ratio", "0.5"], "--gradient_checkpointing_ratio needs --gradient_checkpointing"),
        (["--attention_backend", "cudnn"], "--attention_backend cudnn: choose one of diffusers' backends: .*_native_cudnn"),
        (["--rollout_attention_backend", "_native_cudnn"], "--rollout_attention_backend _native_cudnn needs a CUDA GPU"),
        (["--rollout_attention_backend", "cudnn"], "--rollout_attention_backend cudnn: choose one of diffusers' backends"),
        (["--attention_backend", "flash"], "--attention_backend flash: .*install `flash-attn"),
        # Numbers that would fail only once the models are loaded, or train nothing without a word.
        (["--seed", "-1"], r"--seed must be in \[0, 4294967295\], got -1"),
        (["--max_grad_norm", "0"], "--max_grad_norm must be positive, got 0.0 .*trains nothing"),
        (["--lora_alpha", "0"], "--lora_alpha must be positive"),
        (["--loss_scale", "-1"], "--loss_scale must be positive"),
        (["--adam_beta2", "1"], r"--adam_beta2 must be in \[0, 1\)"),
        (["--max_sequence_length", "600"], r"--max_sequence_length must be in \[1, 512\]"),
        (["--rollout_guidance", "-2"], "--rollout_guidance must be non-negative"),
        (["--lr_warmup_steps", "-5"], "--lr_warmup_steps must be non-negative"),
        (["--window_shift", "0"], "--window_shift must be positive"),
        (["--lr_num_cycles", "0"], "--lr_num_cycles must be positive"),
        (["--validation_steps", "5"], "--validation_steps renders --validation_prompt, which is not given"),
        (["--lr_power", "-1"], "--lr_power must be positive"),
        (["--lr_scheduler", "polynomial", "--learning_rate", "1e-8"], "--lr_scheduler polynomial decays to 1e-7, so --learning_rate"),
        # peft refuses only a list where nothing matches; a typo beside a good name would go unnoticed.
        (["--lora_target_modules", "to_q,to_vv"], "--lora_target_modules: 'to_vv' names no linear layer of the FLUX transformer"),
        (["--lora_target_modules", "attn"], "'attn' names no linear layer"),
        (["--lr_scheduler", "cosine_annealing"], "--lr_scheduler cosine_annealing: choose one of linear, cosine"),
        (["--compile", "--compile_mode", "max_autotune"], "--compile_mode max_autotune: choose one of .*max-autotune-no-cudagraphs"),
        (["--compile_vae", "--compile_backend", "inductr"], "--compile_backend inductr: choose one of torch.compile's backends"),
    ],
)
def test_argument_validation(extra, message, tmp_path):
    args = BASE + ["--output_dir", str(tmp_path)] + extra
    if message is None:
        assert train_direct_align.parse_args(args).train_window == (5, 25)
        return
    with pytest.raises(ValueError, match=message) as error:
        train_direct_align.parse_args(args)
    assert "\n" not in str(error.value)


def test_range_edges_that_mean_something_are_accepted(tmp_path):
    """0 is a meaning, not a mistake, for these: diffusers' dynamic shift, no cache, no decay, seed 0."""
    edges = ["--rollout_shift", "0", "--text_cache_size", "0", "--adam_weight_decay", "0", "--seed", "0",
             "--lr_warmup_steps", "0", "--adam_beta1", "0", "--max_sequence_length", "512"]
    args = train_direct_align.parse_args(BASE + ["--output_dir", str(tmp_path)] + edges)
    assert (args.rollout_shift, args.text_cache_size, args.seed) == (0, 0, 0)


def test_learning_rate_schedule_flags(tmp_path):
    """diffusers' --scale_lr, --lr_power (polynomial) and --lr_num_cycles (cosine_with_restarts), to their formulas."""
    import torch

    from flux_rl import training

    def schedule(*flags, processes=1):
        args = train_direct_align.parse_args(BASE + ["--output_dir", str(tmp_path), "--learning_rate", "1e-3",
                                                     "--max_train_steps", "10", *flags])
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = training.make_optimizer(args, [parameter], training.initial_learning_rate(args, processes))
        scheduler = training.make_lr_scheduler(args, optimizer)
        lrs = []
        for _ in range(10):
            optimizer.step()
            scheduler.step()
            lrs.append(scheduler.get_last_lr()[0])
        return lrs

    progress = [s / 10 for s in range(1, 11)]
    assert schedule("--lr_scheduler", "polynomial", "--lr_power", "2") == pytest.approx(
        [(1e-3 - 1e-7) * (1 - p) ** 2 + 1e-7 for p in progress])
    restarts = schedule("--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2")
    assert restarts[:-1] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * (2 * p % 1))) for p in progress[:-1]])
    assert restarts[4] == pytest.approx(1e-3)  # the restart, halfway
    # 2 processes x batch 3 x accumulation 2 images per optimiser step
    scaled = schedule("--scale_lr", "--train_batch_size", "3", "--gradient_accumulation_steps", "2", processes=2)
    assert scaled == pytest.approx([1.2e-2] * 10)
    assert schedule("--train_batch_size", "3") == pytest.approx([1e-3] * 10)


@pytest.mark.parametrize("extra, message", [
    (["--monitor_steps", "-1"], "--monitor_steps must be non-negative"),
    (["--aesthetic_noise_std", "0"], "--aesthetic_noise_std must be positive"),
])
def test_srpo_argument_validation(extra, message, tmp_path):
    assert train_srpo_flux.parse_args(BASE + ["--output_dir", str(tmp_path), "--monitor_steps", "0"]).monitor_steps == 0
    with pytest.raises(ValueError, match=message):
        train_srpo_flux.parse_args(BASE + ["--output_dir", str(tmp_path)] + extra)


@pytest.mark.parametrize("flag, expected", [
    ("to_q, proj_mlp", {f"transformer_blocks.{i}.attn.to_q" for i in range(2)}
     | {f"single_transformer_blocks.{i}.{layer}" for i in range(3) for layer in ("attn.to_q", "proj_mlp")}),
    # a * is one part of the path: the single blocks' proj_out without the transformer's own output layer "proj_out"
    ("single_transformer_blocks.*.proj_out,transformer_blocks.1.attn.to_q",
     {f"single_transformer_blocks.{i}.proj_out" for i in range(3)} | {"transformer_blocks.1.attn.to_q"}),
])
def test_lora_target_modules_adapt_exactly_the_named_layers(flag, expected, tmp_path):
    """Spaces after the commas are fine; every named layer gets an adapter and no other does."""
    from diffusers import FluxTransformer2DModel

    from flux_rl import models, tiny_models

    args = train_direct_align.parse_args(BASE + ["--output_dir", str(tmp_path), "--lora_target_modules", flag])
    transformer = FluxTransformer2DModel(**dict(tiny_models.TINY_TRANSFORMER, num_layers=2, num_single_layers=3))
    models.prepare_for_training(transformer, args)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A" in name}
    assert adapted == expected
    with pytest.raises(ValueError, match="'single_transformer_blocks.\\*.proj_outt' names no linear layer"):
        train_direct_align.parse_args(BASE + ["--output_dir", str(tmp_path), "--lora_layers", "single_transformer_blocks.*.proj_outt"])
    # A block this model does not have passes the parse-time table (FLUX.1's block 0) and is refused once it is built.
    args = train_direct_align.parse_args(BASE + ["--output_dir", str(tmp_path), "--lora_layers", "transformer_blocks.7.attn.to_q"])
    with pytest.raises(ValueError, match="'transformer_blocks.7.attn.to_q' names no linear layer of the FluxTransformer2DModel"):
        models.prepare_for_training(FluxTransformer2DModel(**dict(tiny_models.TINY_TRANSFORMER, num_layers=2)), args)


@pytest.mark.parametrize("preset, layers_of_a_double_block, layers_of_a_single_block", [
    ("attention", {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                   "attn.to_add_out"}, {"attn.to_q", "attn.to_k", "attn.to_v"}),
    (None, {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
            "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"},
     {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"}),
    ("all-linear", None, None),
])
def test_lora_layer_presets(preset, layers_of_a_double_block, layers_of_a_single_block, tmp_path):
    """The default adapts what diffusers' FLUX LoRA trainer does plus the single blocks' proj_mlp and proj_out
    (their attention output is fused into proj_out); 'attention' is the earlier default; 'all-linear' every linear layer."""
    import torch
    from diffusers import FluxTransformer2DModel

    from flux_rl import models, tiny_models

    args = train_direct_align.parse_args(BASE + ["--output_dir", str(tmp_path)] + (["--lora_layers", preset] if preset else []))
    transformer = FluxTransformer2DModel(**dict(tiny_models.TINY_TRANSFORMER, num_layers=2, num_single_layers=3))
    linear = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    models.prepare_for_training(transformer, args)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A" in name}
    if preset == "all-linear":
        assert adapted == linear
        return
    expected = {f"transformer_blocks.{i}.{layer}" for i in range(2) for layer in layers_of_a_double_block}
    expected |= {f"single_transformer_blocks.{i}.{layer}" for i in range(3) for layer in layers_of_a_single_block}
    assert adapted - {"proj_out"} == expected  # "proj_out" also names the transformer's output layer
    assert ("proj_out" in adapted) == (preset is None)


@pytest.mark.parametrize("saved, flags, message", [
    ({"rank": 4}, ["--rank", "8"], "checkpoint-3 was trained with --rank 4, this run has 8"),
    ({"lora_alpha": 8.0}, ["--lora_alpha", "64"], "--lora_alpha 8.0"),
    ({"lora_target_modules": "to_q,to_k"}, ["--lora_target_modules", "to_q"], "--lora_target_modules to_q,to_k"),
    ({"full_finetune": False}, ["--full_finetune"], "--full_finetune False"),
    ({"use_8bit_adam": True}, [], "--use_8bit_adam True"),
    ({}, ["--max_train_steps", "2"], "checkpoint-3 is at step 3, past --max_train_steps 2; raise --max_train_steps"),
    ({}, ["--max_train_steps", "3"], None),  # nothing left to train: the run publishes that checkpoint's weights
    ({"rank": 4, "lora_alpha": 8, "lora_target_modules": "to_q, to_k", "learning_rate": 1.0}, ["--rank", "4", "--lora_alpha", "8",
     "--lora_target_modules", "to_q,to_k"], None),  # same structure (an int alpha, spaces); other flags may change
    ({"lora_target_modules": None}, ["--lora_target_modules", "to_k, to_q,to_v,to_out.0,add_k_proj,add_q_proj,add_v_proj,to_add_out"],
     None),  # a checkpoint from before the presets (None: the attention projections), its layers named out loud
    ({"lora_target_modules": None}, ["--lora_layers", "attention"], None),
    ({"lora_target_modules": None}, [], "trained with --lora_target_modules attention \\(the default before 2026-12-05\\), this run has default"),
    ({"lora_target_modules": "default"}, [], None),
])
def test_resume_refuses_a_checkpoint_of_another_structure(saved, flags, message, tmp_path):
    """Before loading: a checkpoint written with another rank, alpha, LoRA targets or optimizer kind
    would fail in accelerate's load_state with a size mismatch, or load and mean something else;
    one at or past --max_train_steps would train nothing and overwrite the final weights with its own."""
    import json

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "training_state.json").write_text(json.dumps({"global_step": 3, "config": saved}))
    args = BASE + ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"] + flags
    if message is None:
        assert train_direct_align.parse_args(args).resume_from_checkpoint == "latest"
        return
    with pytest.raises(ValueError, match=message) as error:
        train_direct_align.parse_args(args)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("earlier, flags, message", [
    (["checkpoint-500"], [], "holds an earlier run's checkpoint-500: continue it with --resume_from_checkpoint latest"),
    (["pytorch_lora_weights.safetensors"], [], "holds an earlier run's pytorch_lora_weights.safetensors: start over with"),
    (["transformer"], ["--resume_from_checkpoint", "latest"], "holds an earlier run's transformer: start over"),  # nothing to resume
    (["checkpoint-500", "pytorch_lora_weights.safetensors"], ["--overwrite_output_dir"], None),
    (["logs", "validation"], [], None),  # nothing trained in there
])
def test_new_run_refused_where_an_earlier_run_left_weights(earlier, flags, message, tmp_path):
    """A new run in the same --output_dir would replace checkpoint-N folders of the same names,
    rotate the earlier run's newer ones away and overwrite its final weights."""
    for name in earlier:
        if name.endswith(".safetensors"):
            (tmp_path / name).write_bytes(b"")
        else:
            (tmp_path / name).mkdir()
    args = BASE + ["--output_dir", str(tmp_path), *flags]
    if message is None:
        train_direct_align.parse_args(args)
        return
    with pytest.raises(ValueError, match=message) as error:
        train_direct_align.parse_args(args)
    assert "--overwrite_output_dir" in str(error.value) and "\n" not in str(error.value)


def test_overwrite_refused_where_it_would_remove_the_lora_to_start_from(lora_run, tmp_path):
    """Starting a second stage from the first one's weights, in the same --output_dir with
    --overwrite_output_dir, would remove them before they are read."""
    import shutil

    out = tmp_path / "stage"
    shutil.copytree(lora_run, out, ignore=shutil.ignore_patterns("logs", "validation"))
    flags = BASE + ["--output_dir", str(out), "--overwrite_output_dir", "--rank", "4", "--lora_alpha", "8"]
    for init in (out, out / "pytorch_lora_weights.safetensors", out / "checkpoint-4"):
        with pytest.raises(ValueError, match=f"--init_lora_weights {init} and {out}/.*, which --overwrite_output_dir removes at start, overlap"):
            train_direct_align.parse_args(flags + ["--init_lora_weights", str(init)])
    elsewhere = tmp_path / "first-stage"
    shutil.copytree(out, elsewhere)
    train_direct_align.parse_args(flags + ["--init_lora_weights", str(elsewhere)])  # from another folder: fine


def test_overwrite_refused_in_a_model_folder(tiny_flux, tmp_path):
    """--output_dir pointed at FLUX's own folder by mistake: without the flag refused (it holds a
    transformer/), with it FLUX's transformer/ and README.md would be removed."""
    import shutil

    flux = tmp_path / "flux"
    shutil.copytree(tiny_flux, flux)
    flags = ["--pretrained_model_name_or_path", str(flux), "--output_dir", str(flux), "--report_to", "none"]
    with pytest.raises(ValueError, match="holds an earlier run's transformer"):
        train_direct_align.parse_args(flags)
    with pytest.raises(ValueError, match=f"--pretrained_model_name_or_path {flux} and {flux}/transformer, .* overlap"):
        train_direct_align.parse_args(flags + ["--overwrite_output_dir"])


@pytest.mark.parametrize("logging_dir", ["logs", ".", "../elsewhere"])
def test_overwrite_removes_what_the_earlier_run_wrote(logging_dir, tmp_path):
    """--overwrite_output_dir (checkpoints.remove_earlier_run, called at start): the earlier run's
    outputs go, also its unfinished saves; the user's own files, and logs outside the folder, stay."""
    from flux_rl.checkpoints import remove_earlier_run

    run = tmp_path / "run"
    earlier = ["checkpoint-5/optimizer.bin", "checkpoint-10.tmp/x", "pytorch_lora_weights.safetensors", "transformer/config.json",
               "README.md", "validation/step-000010.png", "logs/srpo/events.out.tfevents.1", ".transformer.tmp/transformer/x"]
    kept = ["notes.txt", "data/prompts.txt", "checkpoint-notes.md"]
    for name in earlier + kept + ["../elsewhere/srpo/events.out.tfevents.1"]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    remove_earlier_run(str(run), logging_dir)
    left = sorted(str(path.relative_to(run)) for path in run.rglob("*") if path.is_file())
    expected_logs = ["logs/srpo/events.out.tfevents.1"] if logging_dir != "logs" else []  # another folder's logs are not these
    assert left == sorted(kept + expected_logs)
    assert (tmp_path / "elsewhere" / "srpo" / "events.out.tfevents.1").exists()


@pytest.mark.parametrize("report_to, message", [
    ("tensorboard,wandb", None),
    ("mlflw", r"--report_to mlflw: choose from tensorboard, wandb, comet_ml, mlflow, .* \(several comma-separated\), all or none"),
    ("all,wandb", "--report_to all,wandb: choose from"),
    ("mlflow", "--report_to mlflow needs mlflow: pip install mlflow"),  # not installed here; accelerate would drop it silently
])
def test_report_to_takes_accelerates_trackers(report_to, message, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a))
    if message is None:
        assert train_direct_align.parse_args(BASE + ["--report_to", report_to]).report_to == report_to
        return
    with pytest.raises(ValueError, match=message):
        train_direct_align.parse_args(BASE + ["--report_to", report_to])


def test_wandb_missing_fails_early(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="--report_to wandb needs wandb"):
        train_direct_align.parse_args(BASE + ["--report_to", "wandb"])


@pytest.mark.parametrize("flags, message", [(["--full_finetune", "--bf16_weights", "--mixed_precision", "bf16"],
                                             "under FSDP the sharded weights are fp32"),
                                            (["--rollout_dtype", "fp8"], "--rollout_dtype fp8 quantises whole weights"),
                                            (["--full_finetune", "--use_8bit_adam"], "does not run on FSDP's sharded parameters"),
                                            (["--merge_lora_in_rollout"], "does not run on FSDP's sharded weights"),
                                            (["--batch_rollout_modulations"], "which FSDP shards")])
def test_single_gpu_memory_flags_refused_under_fsdp(flags, message, monkeypatch, tmp_path):
    args = BASE + ["--output_dir", str(tmp_path), *flags]
    assert train_direct_align.parse_args(args)  # fine on one GPU or under DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(ValueError, match=message):
        train_direct_align.parse_args(args)


def test_lora_merged_in_the_rollout_by_default_where_it_can_be(monkeypatch, tmp_path):
    """On for LoRA on the attention projections on one GPU or DDP (the copies stay under the step's peak); off for the
    default layers (16 GiB of copies), a full fine-tune, an FP8 rollout and under FSDP; each way can be asked for."""
    base = BASE + ["--output_dir", str(tmp_path)]
    attention = base + ["--lora_layers", "attention"]
    assert train_direct_align.parse_args(attention).merge_lora_in_rollout is True
    assert train_direct_align.parse_args(base + ["--lora_layers", "to_q,to_v"]).merge_lora_in_rollout is True
    assert train_direct_align.parse_args(base).merge_lora_in_rollout is False  # the default layers
    assert train_direct_align.parse_args(base + ["--merge_lora_in_rollout"]).merge_lora_in_rollout is True
    assert train_direct_align.parse_args(attention + ["--no_merge_lora_in_rollout"]).merge_lora_in_rollout is False
    assert train_direct_align.parse_args(attention + ["--full_finetune"]).merge_lora_in_rollout is False
    assert train_direct_align.parse_args(attention + ["--rollout_dtype", "fp8"]).merge_lora_in_rollout is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert train_direct_align.parse_args(attention).merge_lora_in_rollout is False


def test_speed_options_on_by_default_where_they_can_be(monkeypatch, tmp_path):
    """Timed on an H200 (benchmarks/RESULTS.md, 2026-11-27): the rollout's modulations batched (not under FSDP), the VAE
    decoder and the rewards' image towers compiled with --compile, SRPO's branches in one batch; each can be turned off."""
    from flux_rl.args import compiles_reward

    base = BASE + ["--output_dir", str(tmp_path)]
    plain = train_direct_align.parse_args(base)
    assert plain.batch_rollout_modulations is True and plain.compile_vae is False and compiles_reward(plain) is False
    compiled = train_direct_align.parse_args(base + ["--compile"])
    assert compiled.compile_vae is True and compiles_reward(compiled) is True
    assert compiled.compile_reward is None  # not asked for by name: rewards without an image_tower() stay eager
    kept_eager = train_direct_align.parse_args(base + ["--compile", "--no_compile_vae", "--no_compile_reward"])
    assert kept_eager.compile_vae is False and compiles_reward(kept_eager) is False
    assert compiles_reward(train_direct_align.parse_args(base + ["--compile_reward"])) is True
    assert train_direct_align.parse_args(base + ["--no_batch_rollout_modulations"]).batch_rollout_modulations is False
    assert train_srpo_flux.parse_args(base).batch_branches is True
    assert train_srpo_flux.parse_args(base + ["--no_batch_branches"]).batch_branches is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert train_direct_align.parse_args(base).batch_rollout_modulations is False


def test_cudnn_attention_refused_for_training_but_not_for_the_rollout(monkeypatch, tmp_path):
    """cuDNN's attention backward crashed FLUX training on an H200 (torch 2.11); its forward ran the rollout."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = BASE + ["--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="use --rollout_attention_backend _native_cudnn"):
        train_direct_align.parse_args(base + ["--attention_backend", "_native_cudnn"])
    cudnn_rollout = base + ["--rollout_attention_backend", "_native_cudnn"]
    assert train_direct_align.parse_args(cudnn_rollout + ["--mixed_precision", "bf16"]).rollout_attention_backend == "_native_cudnn"
    # fp32, as without --mixed_precision and without accelerate's setting: cuDNN's attention would refuse it at the rollout
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(ValueError, match="takes bf16 or fp16 only; add --mixed_precision bf16"):
        train_direct_align.parse_args(cudnn_rollout)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # `accelerate launch --mixed_precision bf16`
    assert train_direct_align.parse_args(cudnn_rollout).rollout_attention_backend == "_native_cudnn"


def test_missing_model_path_fails():
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path is required"):
        train_direct_align.parse_args([])
    with pytest.raises(ValueError, match="no such folder"):
        train_direct_align.parse_args(["--pretrained_model_name_or_path", "./tiny-models/nope"])


def test_command_line_error_is_one_line(tiny_rewards, tmp_path):
    """Each script run as `python script.py` would run it (in one interpreter: torch imported
    once, not six times); also errors found once running, which must come before FLUX loads
    (FLUX's folder here is empty, so loading it first would fail with another error): a dataset
    without the prompt column, --push_to_hub on a machine that cannot reach the Hub (offline
    here, HF_HUB_OFFLINE=1, as a GPU node without network), --report_to wandb without a
    wandb login, and FLUX or a reward model that is neither local nor cached, offline."""
    import json
    import os
    import subprocess
    import sys

    from flux_rl.hub import REWARD_DOWNLOAD_ADVICE
    from tests.conftest import REPO_ROOT

    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"caption": "a red car"}\n')
    empty = tmp_path / "no-flux-here"
    empty.mkdir()
    (empty / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')  # passes the parse-time look, fails any load
    scripts = ("train_srpo_flux.py", "train_direct_align.py", "train_refl_baseline.py", "train_draft_baseline.py")
    runs = [[script, "--pretrained_model_name_or_path", "x", "--resolution", "100"] for script in scripts]
    runnable = ["train_srpo_flux.py", "--pretrained_model_name_or_path", str(empty), "--reward_models_dir", tiny_rewards,
                "--report_to", "none"]
    runs.append([*runnable, "--dataset_name", str(captions), "--output_dir", str(tmp_path / "column")])
    runs.append([*runnable, "--push_to_hub", "--hub_model_id", "tiny-org/tiny-flux-srpo-lora", "--output_dir", str(tmp_path / "push")])
    runs.append([*runnable[:-2], "--report_to", "wandb", "--output_dir", str(tmp_path / "wandb")])
    # Offline (a GPU node without network): FLUX by a Hub id not in the cache; a reward not in --reward_models_dir.
    runs.append(["train_direct_align.py", "--pretrained_model_name_or_path", "tiny-org/tiny-flux", "--reward_models_dir", tiny_rewards,
                 "--report_to", "none", "--output_dir", str(tmp_path / "hub-flux")])
    runs.append([*runnable[:3], "--reward", "pickscore", "--report_to", "none", "--output_dir", str(tmp_path / "hub-reward")])
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="online", NETRC=str(tmp_path / "no-netrc"), WANDB_CONFIG_DIR=str(tmp_path),
               WANDB_DIR=str(tmp_path))
    driver = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit:
        print(f"{argv[0]} exited with {exit.code}", file=sys.stderr)
"""
    result = subprocess.run([sys.executable, "-c", driver, json.dumps(runs)], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or " exited with " in line]
    resolution = "error: --resolution 100: each side must be a positive multiple of 16 (FLUX packs 2x2 latents of an 8x VAE)"
    expected = [line for script in scripts for line in (resolution, f"{script} exited with 2")]
    expected += [f"error: --prompt_column 'prompt' not in {captions}; its columns are ['caption']", "train_srpo_flux.py exited with 2"]
    *parse_time, push, push_exit, wandb, wandb_exit, hub_flux, hub_flux_exit, hub_reward, hub_reward_exit = lines
    assert parse_time == expected and push_exit == wandb_exit == hub_reward_exit == "train_srpo_flux.py exited with 2", result.stderr
    assert hub_flux_exit == "train_direct_align.py exited with 2"
    offline = "not in the Hugging Face cache, and the Hub is out of reach (offline, or HF_HUB_OFFLINE=1); "
    assert hub_flux.startswith(f"error: --pretrained_model_name_or_path tiny-org/tiny-flux: {offline}download it on a connected machine")
    assert hub_reward == f"error: --reward pickscore: {offline}{REWARD_DOWNLOAD_ADVICE}"
    assert push.startswith("error: --push_to_hub: cannot create or reach tiny-org/tiny-flux-srpo-lora on the Hub (OfflineModeIsEnabled")
    assert push.endswith("log in with `hf auth login`, or drop --push_to_hub and upload later")
    assert wandb.startswith("error: --report_to wandb: wandb did not start (No API key configured.")
    assert wandb.endswith("set WANDB_MODE=offline to log to disk and `wandb sync` later, or use --report_to tensorboard")
    assert "Traceback" not in result.stderr


def test_cuda_only_attention_backend_refused_without_a_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flag in ("--attention_backend", "--rollout_attention_backend"):
        with pytest.raises(ValueError, match=f"{flag} _native_efficient needs a CUDA GPU"):
            train_direct_align.parse_args(BASE + ["--output_dir", str(tmp_path), flag, "_native_efficient"])
    with pytest.raises(ValueError, match="--rollout_attention_backend _native_cudnn needs a CUDA GPU"):
        train_direct_align.parse_args(BASE + ["--output_dir", str(tmp_path), "--rollout_attention_backend", "_native_cudnn",
                                              "--mixed_precision", "bf16"])


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "-1e-4"], "expected one argument (a negative number? write --learning_rate=-1e-4, with '=')"),
    (["--learning_rate=-1e-4"], "--learning_rate must be positive, got -0.0001"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1; `python "),
    (["--reward", "hpsv2=1.0"], "write each reward as name:weight, e.g. hpsv2:1.0"),
    (["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a CUDA GPU; on this machine use bf16 or no"),
    (["--pretrained_model_name_or_path", "tiny-models/flx"], "--pretrained_model_name_or_path tiny-models/flx: no such folder"),
])
def test_small_mistakes_are_one_line(flags, message, tmp_path, monkeypatch):
    """argparse's own errors without its usage dump; a typo'd local folder is not asked of the Hub (its first
    part, tiny-models/, is a folder here); fp16 refused where no GPU runs it."""
    import torch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-models").mkdir()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as error:
        train_srpo_flux.parse_args(BASE + ["--output_dir", str(tmp_path / "out")] + flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_tables_written_out_to_check_flags_fast_are_diffusers_own():
    """--lora_layers and --lr_scheduler are checked against tables written out in flux_rl (so that a mistake
    is reported without importing diffusers); they must be what the pinned diffusers has."""
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.optimization import SchedulerType

    from flux_rl.args import LR_SCHEDULERS
    from flux_rl.models import FLUX_LINEAR_LAYERS
    from flux_rl.tiny_models import TINY_TRANSFORMER

    with torch.device("meta"):
        skeleton = FluxTransformer2DModel(**TINY_TRANSFORMER)  # one block of each kind, FLUX.1-dev's names
    assert sorted(FLUX_LINEAR_LAYERS) == sorted(name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear))
    assert LR_SCHEDULERS == [kind.value for kind in SchedulerType]


def test_help_and_flag_mistakes_do_not_import_diffusers(tmp_path):
    """`--help` and a mistyped flag answer before diffusers (3 s to import) or any model loads."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    probe = ("import runpy, sys\n"
             "sys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as end:\n    print('exit', end.code, 'diffusers' in sys.modules, 'transformers' in sys.modules)\n")
    for script in ("train_srpo_flux.py", "train_direct_align.py", "train_refl_baseline.py", "train_draft_baseline.py"):
        for flags, status in ((["--help"], 0), (["--pretrained_model_name_or_path", "tiny-models/flux", "--output_dir", str(tmp_path),
                                                 "--lora_layers", "to_qq"], 2)):
            result = subprocess.run([sys.executable, "-c", probe, script, *flags], cwd=REPO_ROOT, capture_output=True, text=True)
            assert result.stdout.splitlines()[-1] == f"exit {status} False False", (script, flags, result.stdout[-500:], result.stderr[-2000:])
